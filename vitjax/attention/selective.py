"""G17 `selective`: Selective Self-Attention, SSA (Zhang et al. 2024, "Selective Attention:
Enhancing Transformer through Principled Context Control"; official code:
https://github.com/umich-sota/selective_attention).

`form="position"` (default) is the official code's position temperature (lit_gpt/
model_finetune_att.py, `scaled_dot_product_attention`): the logits of query i are scaled by
  tau(i) = 1 + e^{-e^beta} log i,   i = 1, 2, ... its position in the sequence,
with one learned scalar beta per layer, initialised to 2 (`beta_init`; the official GPT-2 variant,
gpt_2_PTS.py, starts at 1.5), then softmax attention. Scaling the logits of row i equals scaling
q_i, so tau multiplies the queries. The official code is a causal LM, where i is also the number
of keys query i sees; here every query sees all keys and i keeps its meaning as a position: the
1-based index in the plain ViT sequence [prefix tokens, patches in raster order], read from
ctx.pos when the model passes it (prefix tokens, pos = NaN, keep their sequence index; a patch at
(r, c) has i = num_prefix + 1 + r w + c, w from `grid` or ctx.grid), so positions travel with
pruned and merged tokens; without ctx.pos, i is the sequence index.

`form="tanh_gate"` is our own design, not the official code (the spec's reading of the abstract:
a temperature per query token and per value token):
  tau_q(i) = (1 + tanh(w_q^T x_i + c_q)) * (1 + softplus(beta) * log(n / n0)),
  tau_v(j) = 1 + tanh(w_v^T x_j + c_v),
  q_i <- tau_q(i) q_i,  v_j <- tau_v(j) v_j,  then softmax attention.
One (w_q, c_q, w_v, c_v) per head, all initialised to 0 (beta too), so at initialisation the layer
is MHSA. The length term compares n, the token count by size (sum_j s_j over valid keys, so merged
tokens keep it fixed), with n0 = `ref_tokens`; `ref_tokens=None` (default) makes it 1.

Both forms: `temperature` is the global test-time temperature of the robustness study the spec
pairs with SSA (Gu et al. 2022, [002]); logits are divided by it (1 leaves them unchanged).
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import (Attention, AttnContext, Capabilities, grid_size,
                                   quadratic_macs, raster_index)

FORMS = ("position", "tanh_gate")


def length_factor(ctx: Optional[AttnContext], n: int, ref_tokens: Optional[int], beta):
  """1 + softplus(beta) * log(n / n0), [B, 1, 1, 1]; 1 when no reference length is set."""
  if ref_tokens is None:
    return jnp.ones((1, 1, 1, 1), jnp.float32)
  count = jnp.full((1,), float(n), jnp.float32)
  if ctx is not None and ctx.size is not None:
    size = ctx.size.astype(jnp.float32)
    if ctx.valid is not None:
      size = size * ctx.valid
    count = size.sum(-1)
  scale = 1 + jax.nn.softplus(beta) * jnp.log(count / ref_tokens)
  return scale.reshape(-1, 1, 1, 1)


def selective_macs(n, width, num_heads, *, form, **_):
  """MHSA's, + the two per-head temperature maps D -> H of the tanh gate."""
  gates = 2 * n * width * num_heads if form == "tanh_gate" else 0
  return quadratic_macs(n, width, num_heads) + gates


@registry.register(
    "selective", caps=Capabilities(needs_pos=True),
    paper="Selective Attention (Zhang et al. 2024); temperature scaling (Gu et al. 2022)",
    official="https://github.com/umich-sota/selective_attention", complexity="O(N^2 D) + O(N D)",
    macs=selective_macs)
class Selective(Attention):
  """Softmax attention with the official position temperature, or our token temperatures."""
  form: str = "position"
  beta_init: float = 2.0
  grid: Optional[tuple] = None
  ref_tokens: Optional[int] = None
  temperature: float = 1.0

  def positions(self, ctx: Optional[AttnContext], n: int):
    """i [B or 1, N] float32: the 1-based position of each token in the plain sequence."""
    seq = jnp.arange(n, dtype=jnp.float32)[None]
    if ctx is None or ctx.pos is None:
      return 1.0 + seq
    raster, known = raster_index(ctx.pos, grid_size(self.grid, ctx, "selective")[1])
    return 1.0 + jnp.where(known, ctx.num_prefix + raster, seq)

  def temperatures(self, x, ctx):
    """(tau_q [B or 1, N, H or 1, 1], tau_v or None) of the chosen form."""
    if self.form == "position":
      beta = self.param("beta", nn.initializers.constant(self.beta_init), ())
      tau = 1.0 + jnp.exp(-jnp.exp(beta)) * jnp.log(self.positions(ctx, x.shape[1]))
      return tau[:, :, None, None], None
    if self.form != "tanh_gate":
      raise ValueError(f"unknown selective form {self.form!r}; valid: {FORMS}")
    gate = lambda name: nn.Dense(self.num_heads, dtype=jnp.float32, name=name,  # noqa: E731
                                 kernel_init=nn.initializers.zeros)
    xf = x.astype(jnp.float32)
    beta = self.param("beta", nn.initializers.zeros, ())
    tau_q = (1 + jnp.tanh(gate("tau_q")(xf)))[..., None]
    tau_q = tau_q * length_factor(ctx, x.shape[1], self.ref_tokens, beta)
    return tau_q, (1 + jnp.tanh(gate("tau_v")(xf)))[..., None]

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    tau_q, tau_v = self.temperatures(x, ctx)
    q = (q.astype(jnp.float32) * tau_q / self.temperature).astype(q.dtype)
    if tau_v is not None:
      v = (v.astype(jnp.float32) * tau_v).astype(v.dtype)
    return super().mix(x, q, k, v, bias, ctx, need=need, deterministic=deterministic)
