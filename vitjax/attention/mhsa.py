"""G1 `mhsa`: softmax multi-head self-attention (ViT, Dosovitskiy et al. 2021; DeiT, Touvron et al.
2021; official code: https://github.com/google-research/vision_transformer).

S_h = Q_h K_h^T / sqrt(d) + bias;  P_h = softmax(S_h);  y = concat_h(P_h V_h) W_o.
`impl="reference"` materialises P; `impl="xla"`/`"cudnn"` use `jax.nn.dot_product_attention` and
`impl="pallas"` the flash kernel; when a reducer needs the [CLS] row, only that row is recomputed
exactly (about 1/N of QK^T). All of it is the softmax core of `base.Attention.attend`.
"""
from vitjax.attention import registry
from vitjax.attention.base import Attention, SOFTMAX_IMPLS, quadratic_macs


@registry.register("mhsa", impls=SOFTMAX_IMPLS,
                   paper="ViT (Dosovitskiy et al. 2021); DeiT (Touvron et al. 2021)",
                   official="https://github.com/google-research/vision_transformer",
                   complexity="O(N^2 D)", macs=quadratic_macs)
class MHSA(Attention):
  """Softmax multi-head self-attention with a backend choice."""
