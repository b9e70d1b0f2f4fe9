"""G24 `normalized`: normalized attention pooling, NAP (Richter & Wattenhofer 2020, "Normalized
Attention Without Probability Cage", arXiv 2005.09561).

The abstract: "We propose to replace the softmax in self-attention with normalization". The
definition below is the authors' official code
(https://github.com/OliverRichter/normalized-attention, models.py: `normalize_masked`,
`NormalizeAttention`, `AttentionLayer`, `create_model` with model='NAP'), the implementation
behind the paper's experiments; no section or equation number of the paper is cited because the
formula was checked against that code, not against the paper's text:

  S_h     = Q_h K_h^T                       (no 1/sqrt(d): "not needed in NAP due to
                                              normalization afterwards")
  mu_i    = mean_j S_ij,   sigma_i = sqrt(mean_j (S_ij - mu_i)^2)   (population std, over keys)
  W_ij    = g_h (S_ij - mu_i) / (sigma_i + eps) + b_h,    eps = 1e-3 (added to the std)
  O_h     = W_h V_h
  y       = proj(GELU(LayerNorm(concat_h O_h)))

g_h, b_h: one learned gain and shift per head, initialised to 1 and 0, so at initialisation every
row has mean 0 and standard deviation ~1 (exactly g * sigma / (sigma + eps)). The weights are
signed and do not sum to one ("without probability cage"): the [CLS] row is raw and EViT reads it
with `cls_score_norm="abs_row"` (zoo R4), as for `cog`.

The LayerNorm + GELU on the concatenated heads before the output projection is the official NAP
block's default (flags `-ln` and `-no_gelu` of its train.py remove them; its softmax baseline MTE
has them too). They keep the output at a fixed scale: an unnormalised weighted sum of N values
with unit-std weights grows like sqrt(N). `hidden_norm=False` / `hidden_gelu=False` give the bare
weight rule inside the ViT block; the LayerNorm epsilon is 1e-3, the Keras default the official
code runs with.

Keys, masks and sizes (R2): with key bias beta_j = log s_j, the mean and std are weighted by s_j
and key j enters the sum with weight s_j W_ij, so a size-s token acts exactly like s copies of it;
beta_j = -inf (s_j = 0) removes key j from the statistics and the sum, which is the official code's
masking (`counts`, `(tensor - means) * mask`). Padding keys and dropped tokens therefore change
nothing, whatever the key count.

Deviation: sigma uses a square root with a zero gradient at a zero variance. A constant score
row (an all-zero query, e.g. a zero-initialised [CLS] after LayerNorm) has sigma = 0; the forward
pass is the official one (eps keeps it finite), but d sqrt(v)/dv is infinite at v = 0 and makes
the gradient of the official formula NaN there.

A zero token is a fixed point of the official block at initialisation (shift 0, zero biases): its
query is 0, its row constant, its weights b = 0, its output exactly 0. A zero-initialised [CLS]
that gets no position embedding (posemb="sincos2d") therefore stays exactly zero through every
block, at the steepest point of each LayerNorm it meets (slope 1/sqrt(eps)) and of its own row
(slope 1/eps); the true gradient grows ~1e10 per block (float64 agrees). Softmax moves such a
token off zero (it averages the values); NAP does not. Models with NAP should not carry a token
that starts at exactly zero (e.g. class_token=False with pool="gap").
"""
import flax.linen as nn
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, Capabilities, elementwise, quadratic_macs


def safe_sqrt(v):
  """sqrt(v) with gradient 0 at v = 0 (a subgradient of the std of a constant row)."""
  pos = v > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, v, 1.0)), 0.0)


def normalized_weights(logits, gain, shift, bias=None, eps: float = 1e-3):
  """Official NAP weights times sizes: s_j (g (S - mu) / (sigma + eps) + b), float32 [B,H,N,M].

  logits [B,H,N,M] float32; gain, shift [H]; bias [B,1,1,M] additive key bias (log sizes, -inf
  for masked keys) or None.
  """
  if bias is None:
    mu = logits.mean(axis=-1, keepdims=True)
    var = jnp.square(logits - mu).mean(axis=-1, keepdims=True)
    sizes = None
  else:
    sizes = jnp.exp(bias)
    total = sizes.sum(axis=-1, keepdims=True)
    mu = (sizes * logits).sum(axis=-1, keepdims=True) / total
    var = (sizes * jnp.square(logits - mu)).sum(axis=-1, keepdims=True) / total
  z = (logits - mu) / (safe_sqrt(var) + eps)
  w = gain[:, None, None] * z + shift[:, None, None]
  return w if sizes is None else sizes * w


@registry.register(
    "normalized", caps=Capabilities(cls_probs="exact", cls_score_norm="abs_row"),
    impls=("reference", "xla"),
    paper="Normalized Attention Without Probability Cage (NAP; Richter & Wattenhofer 2020)",
    official="https://github.com/OliverRichter/normalized-attention", complexity="O(N^2 D)",
    macs=quadratic_macs)
class NormalizedAttention(Attention):
  """Softmax replaced by a per-row standardisation with a learned gain and shift per head."""
  eps: float = 1e-3
  hidden_norm: bool = True
  hidden_gelu: bool = True

  def weight_fn(self):
    gain = self.param("gain", nn.initializers.ones, (self.num_heads,))
    shift = self.param("shift", nn.initializers.zeros, (self.num_heads,))
    return elementwise(lambda s, bias: normalized_weights(s, gain, shift, bias, self.eps), 1.0)

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    y, aux = super().mix(x, q, k, v, bias, ctx, need=need, deterministic=deterministic)
    y = y.reshape(*y.shape[:2], -1)
    if self.hidden_norm:
      y = nn.LayerNorm(epsilon=1e-3, dtype=self.dtype, name="hidden_norm")(y)
    if self.hidden_gelu:
      y = nn.gelu(y)  # tanh form, as the official `gelu`
    return y, aux
