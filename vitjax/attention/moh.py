"""G14 `moh`: Mixture-of-Head attention (MoH, Jin et al. 2024).

Heads are experts. The first S heads are shared (always on), the other R = H - S are routed: each
token keeps its top-K routed heads. Per token i (gates follow the official code,
https://github.com/SkyworkAI/MoH):
  routed:  p = softmax(W_r x_i) over the R routed heads; keep the top K, renormalise them to sum 1,
           times K  (so uniform routing gives gates of 1);
  shared:  S * softmax(W_s x_i) over the S shared heads (a constant 1 when S == 1);
  mixing:  [a1, a2] = 2 * softmax(W_a x_i); shared gates * a1, routed gates * a2 (only when S, K > 0).
  y_i = W_o concat_h(g_ih * O_ih), with O_h the plain softmax-attention output of head h.
All routers are bias-free linear maps of the attention input. With every head active and zero router
weights all gates are 1, which is MHSA exactly.
Load balance (training only): L_b = R * sum_h f_h * P_h, with f_h the fraction of tokens that picked
routed head h and P_h its mean router probability (official: mean(me*ce) * R^2); sown into the
`losses` collection as `moh_balance` for the training loop to add (weight 0.01 in the paper's LLM
runs; the ViT weight is not verified).
Defaults: S = round(H/4) (at least 1) and round(0.75 H) active heads in total, the ratio of the
official MoH-ViT "75" models (e.g. 16 heads: 4 shared + 8 of 12 routed). This dense reference
computes all heads and masks them: it saves no compute.
"""
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, quadratic_macs


def _round(x: float) -> int:
  return int(math.floor(x + 0.5))


def head_split(num_heads: int, num_shared: Optional[int], num_active: Optional[int]) -> tuple:
  """(S shared, R routed, K active routed) from the options."""
  s = max(1, _round(num_heads / 4)) if num_shared is None else num_shared
  a = _round(0.75 * num_heads) if num_active is None else num_active
  if not 0 <= s <= num_heads:
    raise ValueError(f"num_shared must be in 0..{num_heads}, got {s}")
  a = min(max(a, s), num_heads)
  if a == 0:
    raise ValueError("moh needs at least one active head (num_shared + routed top-k >= 1)")
  return s, num_heads - s, a - s


def routed_gates(logits, k: int):
  """Top-k of softmax(logits), renormalised to sum 1, times k; also the probs and the 0/1 mask."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  _, idx = jax.lax.top_k(probs, k)
  mask = jax.nn.one_hot(idx, probs.shape[-1], dtype=probs.dtype).sum(-2)
  kept = probs * mask
  denom = jnp.maximum(kept.sum(-1, keepdims=True), jnp.finfo(jnp.float32).eps)
  return kept / denom * k, probs, mask


def balance_loss(probs, mask, valid=None):
  """R * sum_h mean_tokens(p_h) * mean_tokens(mask_h) over the routed heads."""
  w = jnp.ones(probs.shape[:-1], jnp.float32) if valid is None else valid.astype(jnp.float32)
  denom = jnp.maximum(w.sum(), 1.0)
  me = (probs * w[..., None]).sum((0, 1)) / denom
  ce = (mask * w[..., None]).sum((0, 1)) / denom
  return probs.shape[-1] * jnp.sum(me * ce)


def moh_macs(n, width, num_heads, *, num_shared, num_active, **_):
  """All heads (this reference computes them) + the routers: shared (S > 1), routed, mixing."""
  s, r, k = head_split(num_heads, num_shared, num_active)
  routers = (s if s > 1 else 0) + (r if k else 0) + (2 if s and k else 0)
  return quadratic_macs(n, width, num_heads) + n * width * routers


@registry.register("moh",
                   paper="MoH: Multi-Head Attention as Mixture-of-Head Attention (Jin et al. 2024)",
                   official="https://github.com/SkyworkAI/MoH",
                   complexity="O(N^2 D) + router O(N D H)", macs=moh_macs)
class MoH(Attention):
  """Softmax attention whose per-head outputs are weighted by a per-token head router."""
  num_shared: Optional[int] = None
  num_active: Optional[int] = None  # shared + routed heads a token uses

  def gates(self, x, ctx, deterministic):
    """[B, N, H] float32 head gates."""
    s, r, k = head_split(self.num_heads, self.num_shared, self.num_active)
    x = x.astype(jnp.float32)
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=jnp.float32, name=name)
    parts = []
    if s:
      shared = jnp.ones(x.shape[:2] + (s,), jnp.float32)
      if s > 1:
        shared = jax.nn.softmax(dense(s, "router_shared")(x), axis=-1) * s
      parts.append(shared)
    if k:
      routed, probs, mask = routed_gates(dense(r, "router_routed")(x), k)
      if not deterministic:
        valid = None if ctx is None else ctx.valid
        self.sow("losses", "moh_balance", balance_loss(probs, mask, valid))
      parts.append(routed)
    if s and k:
      mixing = jax.nn.softmax(dense(2, "router_mix")(x), axis=-1) * 2
      parts = [parts[0] * mixing[..., :1], parts[1] * mixing[..., 1:]]
    gates = jnp.concatenate(parts, axis=-1)
    if gates.shape[-1] != self.num_heads:  # K == 0 with routed heads present: they stay off
      gates = jnp.pad(gates, ((0, 0), (0, 0), (0, self.num_heads - gates.shape[-1])))
    return gates

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    heads, aux = super().mix(x, q, k, v, bias, ctx, need=need, deterministic=deterministic)
    return heads * self.gates(x, ctx, deterministic)[..., None].astype(heads.dtype), aux
