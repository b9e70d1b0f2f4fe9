"""The encoder stage every backbone is built from: blocks, their attention contexts and reducers.

Block: x = x + attn(norm(x)); x = x + mlp(norm(x)). A token reducer acts at the hook it declares
(`vitjax.tokens.base`): before the block's attention (reading the previous block's attention, or
this block's attention on the unreduced tokens: MCTF's one step ahead), or after the attention
residual (EViT, ToMe); `after_block` runs when the block is done (TokenLearner's fuser). The stage
builds each block's attention context (token grid, prefix count, token state, training progress),
records the token state after each reduction, and holds the one attention x reducer check.

Seams for hierarchical backbones: windowing / partitioning is a transform of the context and the
tokens around attention, applied here; patch merging between stages is a stage boundary (a
backbone chains stages, each with its own grid).
"""
import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax import attention as attn_lib
from vitjax import tokens as tokens_lib
from vitjax.kernels.depthwise import DepthwiseConv
from vitjax.models.cpe import PEG
from vitjax.tokens import base as tokens_base


def drop_path(module: nn.Module, x, rate, deterministic: bool):
  """Stochastic depth: drops the whole residual branch per example."""
  if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


ACTIVATIONS = ("gelu", "quick_gelu")


class Mlp(nn.Module):
  mlp_dim: int
  dropout: float = 0.0
  gelu_approximate: bool = False
  dtype: Any = jnp.float32
  dwconv_grid: Optional[tuple] = None  # (h, w): PVTv2's depthwise 3x3 conv over the token grid
  dwconv_relu: bool = False  # a ReLU before that conv (PVTv2's linear-SRA models)
  activation: str = "gelu"  # or "quick_gelu": x * sigmoid(1.702 x) (CvT's official models)

  @nn.compact
  def __call__(self, x, deterministic=True):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
    if self.dwconv_grid is not None:  # between fc1 and the activation, as PVTv2
      x = depthwise_conv3x3(nn.relu(x) if self.dwconv_relu else x, self.dwconv_grid, self.dtype)
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown MLP activation {self.activation!r}; valid: "
                       f"{', '.join(ACTIVATIONS)}")
    if self.activation == "quick_gelu":
      x = x * nn.sigmoid(1.702 * x)
    else:
      x = nn.gelu(x, approximate=self.gelu_approximate)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = nn.Dense(width, dtype=self.dtype, name="fc2")(x)
    return nn.Dropout(self.dropout)(x, deterministic=deterministic)


def drawn_as_matrix(init):
  """A fan-in initialiser of conv kernels [..., in, out] that draws the [prod(...) * in, out]
  matrix and reshapes it: the same distribution, and XLA:CPU compiles a rank-2 draw several times
  faster than a rank-4 one."""
  def draw(key, shape, dtype=jnp.float32):
    return init(key, (int(np.prod(shape[:-1])), shape[-1]), dtype).reshape(shape)
  return draw


def fan_out_normal(key, shape, dtype=jnp.float32):
  """timm's conv init (PVTv2, Twins): normal with std sqrt(2 / (k * k * out)); drawn as a matrix
  (XLA:CPU compiles a rank-2 draw several times faster than a rank-4 one)."""
  std = math.sqrt(2.0 / (math.prod(shape[:-2]) * shape[-1]))
  return std * jax.random.normal(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)


def depthwise_conv3x3(x, grid, dtype):
  """[B, h*w, C] tokens in raster order -> a depthwise 3x3 conv (padding 1, bias) of their grid."""
  b, n, c = x.shape
  if n != grid[0] * grid[1]:
    raise ValueError(f"the MLP's depthwise conv got {n} tokens for a {grid[0]}x{grid[1]} grid; "
                     "it needs every grid token (no prefix tokens, no token reduction)")
  conv = DepthwiseConv(3, dtype=dtype, name="dwconv",
                       kernel_init=drawn_as_matrix(nn.initializers.lecun_normal()))
  return conv(x.reshape(b, *grid, c)).reshape(b, n, c)


class LayerScale(nn.Module):
  init_value: float

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * gamma.astype(x.dtype)


class Block(nn.Module):
  """One pre-norm encoder block, split where a reducer may act (attend | feed_forward)."""
  attention: Any  # attention spec: name or dict(name=..., **options)
  num_heads: int
  mlp_dim: int
  mlp_grid: Optional[tuple] = None  # (h, w): the MLP gets PVTv2's depthwise conv on this grid
  mlp_relu: bool = False  # with mlp_grid: a ReLU before that conv (PVTv2's linear-SRA models)
  # (h, w): DaViT's ConvPosEnc (`cpe1`, `cpe2`: depthwise 3x3 conv + residual on this grid, no
  # prefix tokens) on the residual stream before the attention and before the MLP
  cpe_grid: Optional[tuple] = None
  dropout: float = 0.0
  attn_dropout: float = 0.0
  drop_path_rate: Any = 0.0
  layerscale: Optional[float] = None
  qk_norm: bool = False
  qkv_bias: bool = True
  impl: str = "reference"
  gelu_approximate: bool = False
  norm_epsilon: float = 1e-6  # timm's ViT; its Swin keeps PyTorch's 1e-5
  activation: str = "gelu"  # the MLP's (`Mlp.activation`)
  dtype: Any = jnp.float32

  def setup(self):
    self.norm1 = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype)
    self.attn = attn_lib.build(self.attention, num_heads=self.num_heads, dtype=self.dtype,
                               qk_norm=self.qk_norm, qkv_bias=self.qkv_bias,
                               attn_drop=self.attn_dropout, proj_drop=self.dropout,
                               impl=self.impl)
    self.norm2 = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype)
    self.mlp = Mlp(self.mlp_dim, self.dropout, self.gelu_approximate, self.dtype,
                   dwconv_grid=self.mlp_grid, dwconv_relu=self.mlp_relu,
                   activation=self.activation)
    if self.layerscale is not None:
      self.ls1, self.ls2 = LayerScale(self.layerscale), LayerScale(self.layerscale)
    if self.cpe_grid is not None:
      self.cpe1, self.cpe2 = PEG(dtype=self.dtype), PEG(dtype=self.dtype)

  def attend(self, x, ctx, need=(), deterministic=True):
    if self.cpe_grid is not None:
      x = self.cpe1(x, self.cpe_grid)
    h, aux = self.attn(self.norm1(x), ctx, need=tuple(need), deterministic=deterministic)
    if self.layerscale is not None:
      h = self.ls1(h)
    return x + drop_path(self, h, self.drop_path_rate, deterministic), aux

  def feed_forward(self, x, deterministic=True):
    if self.cpe_grid is not None:
      x = self.cpe2(x, self.cpe_grid)
    h = self.mlp(self.norm2(x), deterministic=deterministic)
    if self.layerscale is not None:
      h = self.ls2(h)
    return x + drop_path(self, h, self.drop_path_rate, deterministic)

  def __call__(self, x, ctx, deterministic=True):
    x, _ = self.attend(x, ctx, (), deterministic)
    return self.feed_forward(x, deterministic)


class ScanBlock(nn.Module):
  """Adapter so that `nn.scan` can carry x and scan over per-layer drop-path rates."""
  block_kwargs: dict
  ctx: Any
  deterministic: bool

  @nn.compact
  def __call__(self, x, rate):
    x = Block(drop_path_rate=rate, name="block", **self.block_kwargs)(x, self.ctx, self.deterministic)
    return x, None


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """What happens at one block: its reducer's kwargs (or None) and the aux its attention returns."""
  reducer: Optional[dict]
  need: tuple


class Stage(nn.Module):
  """Runs `blocks` (Block kwargs each, drop-path rate included) on tokens [B, prefix + grid, D].

  Returns (tokens, token state, out) with out["block_{i}"] the tokens after block i (numbered
  from `first_block`, as the blocks' and reducers' names) and
  out["reductions"]["block_{i}"] = {"index", "size", "cls_scores"?} after each reduction: `index`
  [B, N'] is each token's position among the stage's input tokens (-1 for a token made by merging
  or learning), `size` how many patches it stands for, `cls_scores` [B, N] the head-mean [CLS]
  attention row the reducer read (when it read one).
  """
  blocks: Sequence[dict]
  grid: tuple
  num_prefix: int
  class_token: bool = True
  tokens: Any = None
  track_source: bool = False
  scan: bool = False
  remat: bool = False
  # a PEG (`models.cpe`, named `pos_block`) encodes positions after this block of the stage
  # (CPVT and Twins: after block 0), from the grid itself
  pos_conv_after: Optional[int] = None
  first_block: int = 0  # the number of its first block in names (a backbone of several stages)
  dtype: Any = jnp.float32

  # ----- static structure (Python values computed from the fields) -----
  def attention_entries(self) -> list:
    return [attn_lib.registry.check(b["attention"], b.get("impl"))[0] for b in self.blocks]

  def reducer(self):
    name, options = tokens_lib.registry.split_spec(self.tokens)
    return tokens_lib.get(name).cls, options

  def layout(self) -> tokens_base.Layout:
    return tokens_base.Layout(
        depth=len(self.blocks), num_patches=self.grid[0] * self.grid[1],
        num_prefix=self.num_prefix, class_token=self.class_token,
        attention=tuple(e.caps for e in self.attention_entries()),
        dropout=self.blocks[0].get("dropout", 0.0) if self.blocks else 0.0)

  def plan(self) -> tokens_base.Plan:
    cls, options = self.reducer()
    return cls.plan(options, self.layout())

  def warmup(self, steps_per_epoch: int):
    """The reducer's training-time schedule of options (tokens.schedule.Warmup) or None."""
    cls, options = self.reducer()
    return cls.warmup(options, self.layout(), steps_per_epoch=steps_per_epoch)

  def after_update(self):
    """The reducer's constraint on its parameters after each optimizer update (or None)."""
    return self.reducer()[0].after_update()

  def block_plans(self) -> list:
    """Per block: the reducer there and the aux signals the block's attention must return."""
    cls, _ = self.reducer()
    plan = self.plan()
    needs = [set() for _ in self.blocks]
    for i, kw in enumerate(plan.blocks):
      if kw is None:
        continue
      src = i - 1 if (cls.hook == tokens_base.BEFORE_ATTENTION
                      and cls.reads == tokens_base.PREVIOUS_BLOCK) else i
      if cls.needs and src < 0:
        raise ValueError(f"token reducer {cls.name_in_registry!r} at block 0 needs the attention "
                         "of the previous block; place it at block 1 or later")
      if src >= 0:
        needs[src] |= set(cls.needs)
    return [BlockPlan(kw, tuple(sorted(n))) for kw, n in zip(plan.blocks, needs)]

  def check(self) -> list:
    """The attention x reducer compatibility check; returns the block plans."""
    cls, _ = self.reducer()
    name = cls.name_in_registry
    entries = self.attention_entries()
    plans = self.block_plans()
    reduced = False
    for i, (entry, bp) in enumerate(zip(entries, plans)):
      if bp.reducer is not None and cls.hook == tokens_base.BEFORE_ATTENTION:
        reduced = True
      if entry.caps.needs_grid and reduced:
        raise ValueError(f"block {i} uses grid attention {entry.name!r} after a token reduction; "
                         "only grid-free (Tier G) attention may follow a reduction")
      missing = set(bp.need) - set(entry.caps.provides())
      if missing:
        ok = tokens_lib.registry.compatible_attentions(tokens_lib.get(name))
        raise ValueError(f"token reducer {name!r} needs {sorted(missing)} from the attention of "
                         f"block {i}, which {entry.name!r} cannot give; compatible attentions: "
                         f"{', '.join(ok)}")
      if bp.reducer is not None:
        if cls.needs_cls and not self.class_token:
          raise ValueError(f"token reducer {name!r} needs a [CLS] token (class_token=True)")
        if cls.needs_grid and reduced and cls.hook == tokens_base.AFTER_ATTENTION:
          raise ValueError(f"token reducer {name!r} needs the token grid at block {i}")
        reduced = True
    same = [{k: v for k, v in b.items() if k != "drop_path_rate"} for b in self.blocks]
    if self.scan and (any(bp.reducer is not None for bp in plans)
                      or any(b != same[0] for b in same[1:])):
      raise ValueError("scan=True needs identical blocks: no token reduction and no per-layer "
                       "attention overrides")
    if self.scan and self.pos_conv_after is not None:
      raise ValueError("scan=True cannot place a PEG between blocks (pos_conv_after="
                       f"{self.pos_conv_after}); valid: scan=False")
    return plans

  # ----- forward -----
  def context(self, state, reduced: bool, prop_attn: bool, step, progress, global_query=None):
    key_bias = jnp.log(state.size) if (prop_attn and reduced) else None
    return attn_lib.AttnContext(
        key_bias=key_bias, size=state.size, valid=state.valid, pos=state.pos, step=step,
        progress=progress, global_query=global_query, grid=None if reduced else tuple(self.grid),
        num_prefix=self.num_prefix, cls_index=0 if self.class_token else None)

  def initial_state(self, x):
    with_pos = any(e.caps.needs_pos for e in self.attention_entries())
    return tokens_lib.initial_state(x.shape[0], self.num_prefix, tuple(self.grid),
                                    track_source=self.track_source, with_pos=with_pos)

  @nn.compact
  def __call__(self, x, *, train: bool = False, step=None, progress=None, global_query=None):
    """global_query [B, T, D]: handed to every block's attention in its context (GC ViT)."""
    plans = self.check()
    state, out = self.initial_state(x), {}
    if self.scan:
      return self.scanned(x, state, train, step, progress, global_query) + (out,)
    cls, _ = self.reducer()
    prop_attn = self.plan().prop_attn
    attend, feed_forward = Block.attend, Block.feed_forward
    if self.remat:  # recompute activations in the backward pass; the module is argument 0
      attend = nn.remat(Block.attend, static_argnums=(3, 4))
      feed_forward = nn.remat(Block.feed_forward, static_argnums=(2,))
    reduced, prev_aux, det = False, {}, not train
    context = lambda: self.context(state, reduced, prop_attn, step, progress,  # noqa: E731
                                   global_query)
    for i, (kwargs, bp) in enumerate(zip(self.blocks, plans), start=self.first_block):
      blk = Block(name=f"block_{i}", **kwargs)
      need, before = bp.need, (x, state)
      reducer = None
      if bp.reducer is not None:
        reducer = cls(num_prefix=self.num_prefix, dtype=self.dtype, name=f"reduce_{i}",
                      **bp.reducer)
      if reducer is not None and cls.hook == tokens_base.BEFORE_ATTENTION:
        aux = prev_aux
        if cls.reads == tokens_base.OWN_BLOCK:
          # this block's attention on the unreduced tokens feeds the reducer; its output is
          # discarded (XLA drops the unused P.V and projection)
          _, aux = attend(blk, x, context(), need, det)
          need = ()
        x, state = reducer(x, state, aux, deterministic=det)
        reduced = True
        self.record(out, i, state, aux)
      x, aux = attend(blk, x, context(), need, det)
      if reducer is not None and cls.hook == tokens_base.AFTER_ATTENTION:
        x, state = reducer(x, state, aux, deterministic=det)
        reduced = True
        self.record(out, i, state, aux)
      x = feed_forward(blk, x, det)
      if reducer is not None:
        x, state = reducer.after_block(x, state, before, deterministic=det)
      if i - self.first_block == self.pos_conv_after:
        x = PEG(dtype=self.dtype, name="pos_block")(x, self.grid, self.num_prefix)
      prev_aux = aux
      out[f"block_{i}"] = x
    return x, state, out

  def scanned(self, x, state, train, step, progress, global_query=None):
    block = nn.remat(ScanBlock, static_argnums=()) if self.remat else ScanBlock
    scan = nn.scan(block, variable_axes={"params": 0, "batch_stats": 0},
                   split_rngs={"params": True, "dropout": True}, in_axes=0,
                   length=len(self.blocks))
    kwargs = {k: v for k, v in self.blocks[0].items() if k != "drop_path_rate"}
    rates = jnp.asarray([b.get("drop_path_rate", 0.0) for b in self.blocks], jnp.float32)
    # The carry keeps one dtype: a block returns a float32 residual stream (as the unrolled path
    # has after its first block) even when the embedding is computed in bfloat16.
    ctx = self.context(state, False, False, step, progress, global_query)
    x, _ = scan(kwargs, ctx, not train, name="encoder")(x.astype(jnp.float32), rates)
    return x, state

  def record(self, out: dict, block: int, state, aux: dict):
    """The documented per-reduction outputs (see the class docstring)."""
    rec = {"index": state.index, "size": state.size}
    if "cls_probs" in aux:
      rec["cls_scores"] = aux["cls_probs"]
    out.setdefault("reductions", {})[f"block_{block}"] = rec
    if self.track_source:
      out[f"token_state_{block}"] = state


class WithoutTokenReduction:
  """For a backbone that takes no token reducer: the trainer's reducer hooks, and the config-time
  check that refuses a reducer and scanned blocks in one line."""

  def token_warmup(self, steps_per_epoch: int):
    del steps_per_epoch
    return None

  def after_update(self):
    return None

  def refuse_tokens_and_scan(self, family: str, tokens_why: str, scan_why: str):
    name, _ = tokens_lib.registry.split_spec(self.tokens)
    if name != "none":
      raise ValueError(f"{family} takes no token reducer (tokens={name!r}): {tokens_why}; "
                       "valid: tokens=None or 'none'")
    if self.scan:
      raise ValueError(f"{family} cannot scan its blocks (scan=True): {scan_why}; valid: "
                       "scan=False")


def pyramid(model, x, merge, *, train: bool, step=None, progress=None):
  """The stages of a Swin-like pyramid on the stem's map x [B, h, w, C], then LayerNorm, average
  pooling and a zero-initialised head -> (logits [B, classes], out: named intermediates).

  Called from `model`'s compact `__call__` (the modules it makes are the model's): `model` has
  widths(), stage(s, parent, name), dropout, norm_epsilon, num_classes and dtype; `merge(width,
  norm_epsilon, dtype, name=...)` downsamples between stages (`merge_{s}`)."""
  x = nn.Dropout(model.dropout)(x, deterministic=not train)
  out = {"stem": x}
  for s, width in enumerate(model.widths()):
    if s:
      x = merge(width, model.norm_epsilon, model.dtype, name=f"merge_{s}")(x)
    b, h, w, _ = x.shape
    tokens, _, _ = model.stage(s, model, f"stage_{s}")(x.reshape(b, h * w, width), train=train,
                                                        step=step, progress=progress)
    x = tokens.reshape(b, h, w, width)
    out[f"stage_{s}"] = x
  x = nn.LayerNorm(epsilon=model.norm_epsilon, dtype=model.dtype, name="norm")(x)
  out["encoded"] = x
  x = x.mean(axis=(1, 2))
  out["pre_logits"] = x
  if not model.num_classes:
    return x, out
  head = nn.Dense(model.num_classes, dtype=model.dtype, kernel_init=nn.initializers.zeros,
                  name="head")
  logits = head(x).astype(jnp.float32)
  out["logits"] = logits
  return logits, out


def drop_path_rates(rate: float, depth: int) -> list:
  """Stochastic depth rising linearly from 0 to `rate` over the blocks (DeiT, timm)."""
  return np.linspace(0.0, rate, depth).tolist()
