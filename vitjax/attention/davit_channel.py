"""S10 `davit_channel`: DaViT's channel group attention (Ding et al. 2022, "DaViT: Dual Attention
Vision Transformers"), following the official code (https://github.com/dingmyu/davit) as timm's
davit.py carries it (ChannelAttention).

The channels are the tokens and the spatial positions the features: per head (a group of
d = D / H channels), K and V build a d x d map over all N tokens, and every token's query is
mixed by it:
  A_h = softmax_j( sum_n k_ni v_nj / sqrt(d) ),   y_ni = sum_j A_h[i, j] q_nj,
O(N d^2) per head: linear in N, and no [N, N] weights. Projections `qkv`, `proj`. DaViT alternates
it with its spatial window attention (`davit_window`); the ConvPosEnc before each is a module of
the backbone.

It needs no grid: the sum over tokens makes it a drop-in for any token set (Tier G). Token sizes
and masks weight the sum (own design, also in the README): a token of size s counts as s copies,
a masked token is left out, so ToMe's merged tokens and DynamicViT's dropped ones mean what they
do elsewhere. No token weights exist, so there is no [CLS] row and no ToMe keys.
"""
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, Capabilities, key_weights, projection_macs


def channel_macs(n, width, num_heads, **_):
  """The projections, the d x d map of each head (N d^2) and its product with the queries."""
  d = width // num_heads
  return projection_macs(n, width) + 2 * n * num_heads * d * d


@registry.register(
    "davit_channel", caps=Capabilities(cls_probs="none", key_metric=False, full_attn=False),
    paper="DaViT: Dual Attention Vision Transformers (Ding et al. 2022)",
    official="https://github.com/dingmyu/davit",
    complexity="O(N D^2 / H)", macs=channel_macs)
class DaViTChannel(Attention):
  """Channel group attention: a d x d softmax map per head from K^T V, applied to the queries."""

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    del x, ctx
    if need:
      raise ValueError(f"error: davit_channel gives none of {sorted(need)}; it has no token "
                       "weights")
    k = self.quant_point("key", k)
    v = self.quant_point("value", v)
    weights = key_weights(bias)
    if weights is not None:
      k = k * weights[:, :, None, None].astype(k.dtype)
    logits = jnp.einsum("bnhi,bnhj->bhij", k, v,
                        preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    amap = self.dropout_weights(jax.nn.softmax(logits, axis=-1), deterministic)
    amap = self.quant_point("weights", amap).astype(q.dtype)
    return jnp.einsum("bhij,bnhj->bnhi", amap, self.quant_point("query", q)), {}
