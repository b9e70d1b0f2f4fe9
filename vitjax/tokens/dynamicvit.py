"""`dynamicvit`: DynamicViT, a learned keep/drop predictor before blocks 3/6/9 (Rao et al. 2021).

Predictor (PredictorLG of the official code): z = GELU(Linear(LN(x))); z = [z_local | z_global];
the global half is averaged over the tokens the policy still keeps; an MLP D -> D/2 -> D/4 -> 2
gives log-probabilities of (keep, drop) per image token.

Training (deterministic=False): a hard Gumbel-softmax draws each token's decision; the policy is
cumulative (m <- m * keep) and the prefix is always kept. No token is removed: the policy rides in
`TokenState.valid` as a {0, 1} float and every later attention treats dropped tokens as padding,
with DynamicViT's straight-through gradient (attention.base.policy_key_bias). The ratio loss is
sown into the "losses" collection; `distill_loss` below is the teacher part of the objective.

Inference (deterministic=True): the floor(N0 * rho^s) tokens with the highest keep score are
gathered (static shapes), in descending score order as in the official code.
"""
import jax
import jax.numpy as jnp
import flax.linen as nn

from vitjax.tokens import registry
from vitjax.tokens.base import (BEFORE_ATTENTION, DEFAULT_LOCATIONS, REQUIRED, Layout, Plan,
                                Reducer, at_blocks, cumulative_counts, take_state, take_tokens)

# timm's _init_weights, applied by the official model to the predictors
_dense = dict(kernel_init=nn.initializers.truncated_normal(0.02), bias_init=nn.initializers.zeros)
DECISIONS = ("gumbel", "topk")


class Predictor(nn.Module):
  """Local-global keep predictor: tokens [B, N, D], policy [B, N] -> log (keep, drop) [B, N, 2]."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, policy):
    d = x.shape[-1]
    h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x)  # torch default eps
    h = nn.gelu(nn.Dense(d, dtype=self.dtype, name="in_proj", **_dense)(h), approximate=False)
    local, glob = h[..., :d // 2], h[..., d // 2:]
    w = policy[..., None].astype(h.dtype)
    glob = (glob * w).sum(1, keepdims=True) / w.sum(1, keepdims=True)
    h = jnp.concatenate([local, jnp.broadcast_to(glob, local.shape[:2] + glob.shape[2:])], -1)
    h = nn.gelu(nn.Dense(d // 2, dtype=self.dtype, name="out_fc1", **_dense)(h), approximate=False)
    h = nn.gelu(nn.Dense(d // 4, dtype=self.dtype, name="out_fc2", **_dense)(h), approximate=False)
    logits = nn.Dense(2, dtype=self.dtype, name="out_fc3", **_dense)(h)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def gumbel_keep(rng, logp):
  """Hard Gumbel-softmax (tau = 1) on log (keep, drop) -> straight-through keep decision [B, N]."""
  soft = jax.nn.softmax(logp + jax.random.gumbel(rng, logp.shape, jnp.float32), axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(soft, -1), 2, dtype=soft.dtype)
  return (hard - jax.lax.stop_gradient(soft) + soft)[..., 0]


def topk_keep(score, prev, count: int):
  """Keeps the `count` best still-kept tokens: the inference decision written as a mask."""
  masked = jnp.where(prev > 0.5, score, -jnp.inf)
  _, idx = jax.lax.top_k(masked, count)
  hard = jnp.zeros_like(score).at[jnp.arange(score.shape[0])[:, None], idx].set(1.0)
  soft = jnp.exp(score)
  return hard + soft - jax.lax.stop_gradient(soft)


@registry.register("dynamicvit", paper="DynamicViT (Rao et al., NeurIPS 2021)",
                   official="https://github.com/raoyongming/DynamicViT (models/dyvit.py)")
class DynamicViT(Reducer):
  """One prediction module; the plan places one before each pruning block."""
  count: int = 1               # tokens kept at inference: floor(N0 * rho^s)
  ratio: float = 1.0           # rho^s, the target kept fraction of this stage
  num_stages: int = 1          # the ratio loss is averaged over the stages
  ratio_weight: float = 2.0    # lambda_r (2.0 for DeiT-S in the official recipe, 5 for DeiT-B)
  train_decision: str = "gumbel"  # "topk": the inference decision as a training mask (tests)

  hook = BEFORE_ATTENTION
  options = {"keep_rate": REQUIRED, "locations": DEFAULT_LOCATIONS, "ratio_weight": 2.0,
             "train_decision": "gumbel"}
  choices = {"train_decision": DECISIONS}

  @classmethod
  def plan(cls, options, layout: Layout) -> Plan:
    opts = cls.parse(options, layout)
    locs = opts.pop("locations")
    ratios, counts = cumulative_counts("dynamicvit", opts.pop("keep_rate"), locs,
                                       layout.num_patches)
    return Plan(at_blocks(layout.depth, {
        loc: dict(count=c, ratio=r, num_stages=len(locs), **opts)
        for loc, r, c in zip(locs, ratios, counts)}))

  @classmethod
  def macs(cls, n: int, width: int, *, num_prefix: int = 1, **kwargs) -> int:
    """The predictor on the image tokens: D -> D, then the MLP D -> D/2 -> D/4 -> 2."""
    del kwargs
    d = width
    return (n - num_prefix) * (d * d + d * (d // 2) + (d // 2) * (d // 4) + (d // 4) * 2)

  @nn.compact
  def __call__(self, x, state, aux, *, deterministic=True):
    p = self.num_prefix
    b = x.shape[0]
    prev = (jnp.ones(x.shape[:2], jnp.float32) if state.valid is None
            else state.valid.astype(jnp.float32))[:, p:]
    logp = Predictor(self.dtype, name="predictor")(x[:, p:], prev)
    if deterministic:
      _, idx = jax.lax.top_k(logp[..., 0], self.count)
      keep = jnp.concatenate([jnp.broadcast_to(jnp.arange(p), (b, p)), idx + p], axis=1)
      return take_tokens(x, keep), take_state(state, keep)
    if self.train_decision == "gumbel":
      keep = gumbel_keep(self.make_rng("dropout"), logp) * prev
    else:
      keep = topk_keep(logp[..., 0], prev, self.count) * prev
    self.sow("losses", "ratio", self.ratio_loss(keep))
    valid = jnp.concatenate([jnp.ones((b, p), jnp.float32), keep], axis=1)
    return x, state.replace(valid=valid)

  def ratio_loss(self, keep):
    """lambda_r / S * mean_b (mean_j m_j - rho^s)^2: this stage's share of the ratio loss."""
    return self.ratio_weight / self.num_stages * jnp.mean((keep.mean(1) - self.ratio) ** 2)


def distill_loss(logits, tokens, keep, teacher_logits, teacher_tokens, *, cls_weight=0.5,
                 token_weight=0.5, mse_token=True):
  """The teacher terms of the DynamicViT objective (official DeiT recipe: 0.5, 0.5, MSE tokens).

  logits [B, K] and tokens [B, N0, D] (image tokens after the final norm, `out["encoded"]`) of the
  student in training mode; keep [B, N0], the final policy (`out["token_state"].valid`, image part);
  the teacher's outputs of the same images. KL(teacher || student) on the logits (batch mean) plus
  MSE (or KL) between kept tokens; the token term is 0 when nothing is kept.
  """
  t_logits = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  t_tokens = jax.lax.stop_gradient(teacher_tokens).astype(jnp.float32)
  keep = jax.lax.stop_gradient(keep) > 0.5
  cls_kl = kl_batchmean(logits.astype(jnp.float32), t_logits)
  tokens = tokens.astype(jnp.float32)
  n_kept = keep.sum()
  if mse_token:
    err = ((tokens - t_tokens) ** 2).sum(-1)
    tok = (err * keep).sum() / jnp.maximum(n_kept * tokens.shape[-1], 1)
  else:
    lp, lt = jax.nn.log_softmax(tokens, -1), jax.nn.log_softmax(t_tokens, -1)
    tok = ((jnp.exp(lt) * (lt - lp)).sum(-1) * keep).sum() / jnp.maximum(n_kept, 1)
  tok = jnp.where(n_kept > 0, tok, 0.0)
  return cls_weight * cls_kl + token_weight * tok


def kl_batchmean(logits, teacher_logits):
  """torch's kl_div(log_softmax(s), log_softmax(t), 'batchmean', log_target=True)."""
  lp, lt = jax.nn.log_softmax(logits, -1), jax.nn.log_softmax(teacher_logits, -1)
  return (jnp.exp(lt) * (lt - lp)).sum() / logits.shape[0]
