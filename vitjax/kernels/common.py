"""Shared machinery of the Pallas attention kernels: backend choice, tiling, padding, layouts.

Two lowerings sit behind every kernel, with the same per-head kernel bodies:
  tpu  Mosaic TPU. q/k/v are transposed to [B, H, N, d] so that a block's last two dims are
       (tokens, d), legal under Mosaic's (8, 128) rule; a program handles `heads` heads.
  gpu  Triton lowering (`pltriton.CompilerParams` selects it; Mosaic GPU, the default GPU
       lowering, wants warp-specialised `plgpu.kernel` code). Native [B, N, H, d] layout, one
       head per program, strided loads. Untested on hardware here: no GPU on the dev machines.
On other platforms (CPU) the TPU kernel runs in interpret mode, so tests exercise its body.
`lax.platform_dependent` picks the branch when the program is lowered, so AOT compilation for a
TPU topology on a CPU host takes the Mosaic branch.

Statistics (log-sum-exp, delta) are stored as rows [B, H, 1, N] (lanes = tokens): compact in HBM
and legal as (1, block) blocks; kernels convert rows <-> columns once per program.

Every kernel is three launches around per-head bodies that the kernel module writes: a forward
and a dQ launch with a program per query tile, and a dK/dV launch (plus the key-bias gradient)
with a program per key tile. `Problem` holds those launches and `differentiable` their
custom_vjp wiring, so a kernel module keeps only its bodies and its forward/backward math.

A full (pair) bias [G, H, Nq, Nk] is shared by the examples b with the same b % G (G divides B:
G = 1 for one bias for every example, G = nW for windows as the batch, images x windows). Its
blocks follow the score tiles: (heads, block_q, Nk) rows in the forward and dQ launches, the
transposed bias (heads, block_k, Nq) in the dK/dV launch (built once outside, so the kernel
never transposes a tile). Its gradient, sum over the examples of a group of dS, is accumulated
by the dQ launch: on TPU its grid becomes (G, H // heads, query tiles, B // G) with the last axis
sequential ("arbitrary"), so one (heads, block_q, Nk) output block stays in VMEM while the
examples of its group are summed; GPU programs run concurrently, so there dS is written per
example ([B, H, Nq, Nk] float32, the size of the weights) and summed by XLA.
"""
import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# A finite stand-in for -inf. Logits are clamped to it, so a key block that is masked for a whole
# row gives exp(NEG - m) = 0 once a valid key has been seen, and never inf - inf = NaN.
NEG = -1e30
BACKENDS = ("tpu", "gpu", "tpu_interpret", "gpu_interpret")
NT = (((1,), (1,)), ((), ()))  # dot_general dims of a @ b.T


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Static tiling of one kernel launch."""
  nq_pad: int       # padded query count (a multiple of block_q)
  nk_pad: int       # padded key count (a multiple of block_k)
  block_q: int
  block_k: int
  heads: int = 1    # heads per program (TPU); GPU programs own one head
  num_warps: int = 4
  num_stages: int = 2

  @property
  def num_q(self) -> int:
    return self.nq_pad // self.block_q

  @property
  def num_k(self) -> int:
    return self.nk_pad // self.block_k


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _largest_dividing(n: int, options) -> int:
  return next(b for b in options if n % b == 0)


def tpu_tiling(nq: int, nk: int, h: int, d: int, blocks=None, heads=None) -> Tiling:
  """TPU table: lanes hold tokens, so blocks are multiples of 128 (ViT: 197 -> 256, 577 -> 640).

  Programs take several heads until their K/V rows reach ~2048 (a few hundred KiB of VMEM), which
  amortises the ~0.35 us per-grid-step cost at ViT lengths where one head's tile is tiny.
  """
  if blocks is None:
    nq_pad, nk_pad = round_up(nq, 128), round_up(nk, 128)
    bq = _largest_dividing(nq_pad, (256, 128))
    bk = _largest_dividing(nk_pad, (512, 256, 128))
  else:
    bq, bk = blocks
    nq_pad, nk_pad = round_up(nq, bq), round_up(nk, bk)
  if heads is None:
    heads = max(g for g in range(1, h + 1) if h % g == 0 and g * max(nk_pad, nq_pad) <= 2048
                or g == 1)
  if h % heads:
    raise ValueError(f"heads per program ({heads}) must divide the head count {h}")
  del d
  return Tiling(nq_pad, nk_pad, bq, bk, heads)


def gpu_tiling(nq: int, nk: int, h: int, d: int, blocks=None, backward=False) -> Tiling:
  """GPU table (FA2-like; unmeasured guesses, see experiments/kernels.py): 64-token granularity."""
  del h
  if blocks is None:
    nq_pad, nk_pad = round_up(nq, 64), round_up(nk, 64)
    bq = 128 if (nq_pad % 128 == 0 and not backward) else 64
    bk = 64
  else:
    bq, bk = blocks
    nq_pad, nk_pad = round_up(nq, bq), round_up(nk, bk)
  return Tiling(nq_pad, nk_pad, bq, bk, 1, num_warps=4 if d <= 64 else 8,
                num_stages=2 if d > 64 else 3)


def check_inputs(q, k, v, bias):
  """Validates [B, N, H, d] inputs; returns the bias as [B, Nk] float32 (or None)."""
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"expected q [B,Nq,H,d] and k, v [B,Nk,H,d]; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  if not q.dtype == k.dtype == v.dtype or q.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"q, k, v must share a dtype, float32 or bfloat16; got {q.dtype}, {k.dtype}, "
                     f"{v.dtype}")
  if q.shape[-1] not in (32, 64, 128):
    raise ValueError(f"head dim must be 32, 64 or 128; got {q.shape[-1]}")
  if bias is None:
    return None
  b, nk = k.shape[0], k.shape[1]
  try:
    return jnp.broadcast_to(bias, (b, 1, 1, nk)).reshape(b, nk).astype(jnp.float32)
  except ValueError as e:
    raise ValueError(f"bias must broadcast to [B,1,1,Nk] = {(b, 1, 1, nk)}; got {bias.shape}") from e


def key_bias(bias, b: int, nk: int, nk_pad: int):
  """[B, Nk] bias (or None) -> [B, 1, nk_pad] with -inf on padded keys, or None if not needed."""
  if bias is None and nk == nk_pad:
    return None
  if bias is None:
    bias = jnp.zeros((b, nk), jnp.float32)
  return jnp.pad(bias, ((0, 0), (0, nk_pad - nk)), constant_values=-jnp.inf)[:, None, :]


def check_pair_bias(pair, q, k):
  """Validates a full bias [H, Nq, Nk] or [G, H, Nq, Nk] (G dividing B); returns it as
  [G, H, Nq, Nk] float32 (or None)."""
  if pair is None:
    return None
  b, nq, h, _ = q.shape
  nk = k.shape[1]
  if pair.ndim == 3:
    pair = pair[None]
  if pair.ndim != 4 or pair.shape[1:] != (h, nq, nk) or b % pair.shape[0]:
    raise ValueError(f"pair_bias must be [H, Nq, Nk] = {(h, nq, nk)} or [G, H, Nq, Nk] with G "
                     f"dividing the batch {b}; got {pair.shape}")
  return pair.astype(jnp.float32)


def pad_pair(pair, nq_pad: int, nk_pad: int):
  """[G, H, Nq, Nk] -> [G, H, nq_pad, nk_pad], zeros in the padding (padded keys are masked by the
  key bias, padded queries are cut off)."""
  _, _, nq, nk = pair.shape
  return jnp.pad(pair, ((0, 0), (0, 0), (0, nq_pad - nq), (0, nk_pad - nk)))


def pad_tokens(x, n_pad: int):
  """Zero-pads axis 1 (tokens) to n_pad."""
  return jnp.pad(x, ((0, 0), (0, n_pad - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


def heads_major(x, n_pad: int):
  """[B, N, H, d] -> [B, H, n_pad, d] (TPU layout)."""
  return pad_tokens(x, n_pad).transpose(0, 2, 1, 3)


def stat_rows(x, n_pad: int, fill: float = 0.0):
  """[B, H, N] float32 statistic -> [B, H, 1, n_pad] rows, padded queries set to `fill`."""
  return jnp.pad(x, ((0, 0), (0, 0), (0, n_pad - x.shape[-1])),
                 constant_values=fill)[:, :, None, :]


# ---- rows <-> columns inside kernels (once per program, never per loop step) ----
def tpu_to_col(row):
  """(1, n) -> (n, 1): Mosaic transposes (8,128)-aligned tiles, so go through (128, n)."""
  return jnp.transpose(jnp.broadcast_to(row, (128, row.shape[1])))[:, :1]


def tpu_to_row(col):
  """(n, 1) -> (1, n)."""
  return jnp.transpose(jnp.broadcast_to(col, (col.shape[0], 128)))[:1, :]


def gpu_to_col(row):
  return row.reshape(row.shape[1], 1)


def gpu_to_row(col):
  return col.reshape(1, col.shape[0])


# ---- backend dispatch ----
def resolve(backend: Optional[str]):
  """None -> lowering-time choice; otherwise one of BACKENDS (tests, AOT compilation)."""
  if backend is not None and backend not in BACKENDS:
    raise ValueError(f"unknown kernel backend {backend!r}; valid: None (auto) or {BACKENDS}")
  return backend


def dispatch(backend: Optional[str], tpu_fn: Callable, gpu_fn: Callable, *args):
  """Runs `tpu_fn(*args, interpret=...)` or `gpu_fn(...)` for the backend (None: by platform)."""
  if backend is not None:
    fn = tpu_fn if backend.startswith("tpu") else gpu_fn
    return fn(*args, interpret=backend.endswith("interpret"))
  return lax.platform_dependent(
      *args, tpu=functools.partial(tpu_fn, interpret=False),
      cuda=functools.partial(gpu_fn, interpret=False),
      default=functools.partial(tpu_fn, interpret=True))


def tpu_params(num_parallel: int, vmem_bytes: int, num_sequential: int = 0):
  """Mosaic compiler params: the first grid axes are parallel (the key loop lives in the kernel),
  the last `num_sequential` sequential (a reduction revisiting its output block)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  limit = None
  if vmem_bytes > 12 * 2**20:  # past the 16 MiB scoped default (with headroom for temporaries)
    limit = min(round_up(2 * vmem_bytes, 2**20), 100 * 2**20)
  semantics = ("parallel",) * num_parallel + ("arbitrary",) * num_sequential
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def gpu_params(t: Tiling):
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel
  return pltriton.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)


def vmem_bytes(*blocks) -> int:
  """Double-buffered VMEM bytes of (shape, dtype) blocks."""
  return 2 * sum(math.prod(s) * jnp.dtype(dt).itemsize for s, dt in blocks)


@dataclasses.dataclass(frozen=True)
class Layout:
  """BlockSpecs, views and layout conversions of one backend (see the module docstring).

  Grids are (B, H // heads, tiles): axis 2 walks query tiles (forward, dQ) or key tiles (dK/dV);
  the other token axis is loaded whole and looped over inside the kernel. With `reduce` = G > 0
  (TPU, the dQ launch summing a pair-bias gradient) the grid is (G, H // heads, tiles, B // G),
  example b = r G + g; index maps are written in (b, g, i) and `_spec` translates them.
  """
  kind: str  # "tpu" | "gpu"
  t: Tiling
  num_heads: int
  head_dim: int
  interpret: bool
  reduce: int = 0

  @property
  def tpu(self) -> bool:
    return self.kind == "tpu"

  @property
  def program_heads(self) -> int:
    return self.t.heads if self.tpu else 1

  def grid(self, b: int, tiles: int):
    if self.reduce:
      return (self.reduce, self.num_heads // self.t.heads, tiles, b // self.reduce)
    return (b, self.num_heads // self.t.heads, tiles)

  def _spec(self, block, index):
    """BlockSpec of `index(b, g, i)` on this layout's grid."""
    if not self.reduce:
      return pl.BlockSpec(block, index)
    groups = self.reduce
    return pl.BlockSpec(block, lambda gb, g, i, r: index(r * groups + gb, g, i))

  def first_visit(self):
    """True in the first program that sees an output block of the reduction (always without)."""
    return pl.program_id(3) == 0 if self.reduce else True

  def tokens(self, block: int, tiled: bool):
    """Spec of a q/k/v-like array: `block` tokens, at grid tile i if `tiled`, else whole."""
    d, hb = self.head_dim, self.t.heads
    if self.tpu:
      return self._spec((None, hb, block, d), lambda b, g, i: (b, g, i if tiled else 0, 0))
    return self._spec((None, block, None, d), lambda b, g, i: (b, i if tiled else 0, g, 0))

  def rows(self, block: int, tiled: bool):
    """Spec of a [B, H, 1, n] statistic."""
    hb = self.t.heads if self.tpu else None
    return self._spec((None, hb, 1, block), lambda b, g, i: (b, g, 0, i if tiled else 0))

  def bias(self, block: int, tiled: bool):
    """Spec of a [B, 1, n] key bias."""
    return self._spec((None, 1, block), lambda b, g, i: (b, 0, i if tiled else 0))

  def pair(self, block: int, n: int, groups: int, per_example: bool = False):
    """Spec of a [G, H, rows, n] pair bias (or its gradient): `block` rows at grid tile i, all n
    columns, group b % G (example b itself if `per_example`: GPU's dS output)."""
    hb = self.t.heads if self.tpu else None
    if per_example:
      return self._spec((None, hb, block, n), lambda b, g, i: (b, g, i, 0))
    if groups == 1:
      return self._spec((None, hb, block, n), lambda b, g, i: (0, g, i, 0))
    return self._spec((None, hb, block, n), lambda b, g, i: (b % groups, g, i, 0))

  def group_rows(self, block: int):
    """Spec of a [B, H // heads, 1, n] per-program-group output (the key-bias gradient)."""
    return self._spec((None, None, 1, block), lambda b, g, i: (b, g, 0, i))

  def view(self, ref, h: int):
    """Head h of a program's block (TPU blocks carry `heads` heads; GPU blocks one)."""
    return ref.at[h] if self.tpu else ref

  def to_col(self, row):
    return tpu_to_col(row) if self.tpu else gpu_to_col(row)

  def to_row(self, col):
    return tpu_to_row(col) if self.tpu else gpu_to_row(col)

  def prepare(self, x, n_pad: int):
    """[B, N, H, d] -> the kernel layout, padded to n_pad tokens."""
    return heads_major(x, n_pad) if self.tpu else pad_tokens(x, n_pad)

  def finish(self, x, n: int):
    """Kernel layout -> [B, N, H, d], padding removed."""
    return x[:, :, :n].transpose(0, 2, 1, 3) if self.tpu else x[:, :n]

  def call(self, kernel, *, tiles, b, in_specs, out_specs, out_shape, vmem, name):
    """pallas_call with this backend's compiler params (none in interpret mode)."""
    params = None
    if not self.interpret:
      params = tpu_params(3, vmem, 1 if self.reduce else 0) if self.tpu else gpu_params(self.t)
    return pl.pallas_call(kernel, grid=self.grid(b, tiles), in_specs=in_specs,
                          out_specs=out_specs, out_shape=out_shape, compiler_params=params,
                          interpret=self.interpret, name=name)


def layout(kind: str, nq: int, nk: int, h: int, d: int, *, interpret: bool, blocks=None,
           heads=None, backward=False) -> Layout:
  if kind == "tpu":
    t = tpu_tiling(nq, nk, h, d, blocks, heads)
  else:
    t = gpu_tiling(nq, nk, h, d, blocks, backward)
  return Layout(kind, t, h, d, interpret)


# ---- the bias of a program's score tiles ----
@dataclasses.dataclass(frozen=True)
class TileBias:
  """The additive bias of one head's score tiles in a program; any part may be None.

  row: a per-key ref (1, n), sliced with the tile (query-tile programs); col: a constant per-key
  column (block_k, 1) (key-tile programs, which work on transposed scores); pair: a pair-bias ref
  (rows, n), sliced with the tile; dpair: the ref (rows, n) the pair-bias gradient accumulates in.
  """
  row: Any = None
  col: Any = None
  pair: Any = None
  dpair: Any = None

  def __call__(self, start, size):
    """The bias of the score tile of columns [start, start + size), or None."""
    cols = pl.ds(start, size)
    parts = [self.col] if self.col is not None else []
    parts += [r[:, cols] for r in (self.row, self.pair) if r is not None]
    return functools.reduce(jnp.add, parts) if parts else None

  def add_grad(self, start, size, ds):
    """Accumulates a score-tile gradient into the pair-bias gradient (when it is wanted)."""
    if self.dpair is not None:
      cols = pl.ds(start, size)
      self.dpair[:, cols] = self.dpair[:, cols] + ds


# ---- backward bodies (one head) of attention whose weights are elementwise in the scores ----
# A kernel gives w = weights(s, *stats) and dL/ds = score_grad(w, dL/dw, *stats), with `stats` its
# query statistics (softmax: lse and delta; sigmoid: none); the loops and accumulations are common.
def logits(a, b, scale, bias):
  """a @ b.T * scale (+ bias), float32, clamped to NEG so masked entries stay finite."""
  s = lax.dot_general(a, b, NT, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    s = s + bias
  return jnp.maximum(s, NEG)


def dq_head(q_ref, k_ref, v_ref, bias, do_ref, *refs, lay, scale, weights, score_grad):
  """dQ of one query tile, looping over key blocks (and the pair-bias gradient rows of the tile,
  dL/ds itself); refs are the stat rows, then dq."""
  *stat_refs, dq_ref = refs
  q, do, t = q_ref[...], do_ref[...], lay.t
  stats = [lay.to_col(r[...]) for r in stat_refs]
  bk = t.block_k

  def step(j, dq):
    start = pl.multiple_of(j * bk, bk)
    k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
    w = weights(logits(q, k, scale, bias(start, bk)), *stats)
    dw = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
    ds = score_grad(w, dw, *stats)
    bias.add_grad(start, bk, ds)
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  dq = lax.fori_loop(0, t.num_k, step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def dkdv_head(q_ref, k_ref, v_ref, bias, do_ref, *refs, lay, scale, weights, score_grad):
  """dK, dV of one key tile, looping over query blocks; refs are the stat rows, then dk, dv.
  Returns the key-bias gradient column (bk, 1).

  Works on transposed scores s^T (keys x queries): the statistics are rows there, so they
  broadcast along lanes with no per-step relayout, and every matmul is a @ b or a @ b.T.
  """
  *stat_refs, dk_ref, dv_ref = refs
  k, v, t = k_ref[...], v_ref[...], lay.t
  bq = t.block_q

  def step(i, carry):
    dk, dv, db = carry
    start = pl.multiple_of(i * bq, bq)
    q, do = q_ref[pl.ds(start, bq), :], do_ref[pl.ds(start, bq), :]
    stats = [r[:, pl.ds(start, bq)] for r in stat_refs]
    wt = weights(logits(k, q, scale, bias(start, bq)), *stats)
    dv = dv + jnp.dot(wt.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dwt = lax.dot_general(v, do, NT, preferred_element_type=jnp.float32)
    dst = score_grad(wt, dwt, *stats)
    dk = dk + jnp.dot(dst.astype(q.dtype), q, preferred_element_type=jnp.float32)
    return dk, dv, db + dst.sum(axis=1, keepdims=True)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv, db = lax.fori_loop(0, t.num_q, step, (zeros, zeros, jnp.zeros((k.shape[0], 1),
                                                                         jnp.float32)))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  return db


# ---- the three launches of a kernel ----
def _split_refs(refs, has_bias: bool, has_pair: bool, want_dpair: bool):
  """q, k, v, [bias], [pair], *rest, [dpair] -> (q, k, v), bias, pair, rest, dpair."""
  q_ref, k_ref, v_ref, *rest = refs
  b_ref = rest.pop(0) if has_bias else None
  p_ref = rest.pop(0) if has_pair else None
  dp_ref = rest.pop() if want_dpair else None
  return (q_ref, k_ref, v_ref), b_ref, p_ref, rest, dp_ref


def _query_tile_kernel(body: Callable, lay: Layout, has_bias: bool, has_pair: bool = False,
                       want_dpair: bool = False):
  """Refs q, k, v, [bias], [pair], *rest, [dpair] -> body(q, k, v, tile_bias, *rest, lay=lay) on
  each program head."""
  def kernel(*refs):
    qkv, b_ref, p_ref, rest, dp_ref = _split_refs(refs, has_bias, has_pair, want_dpair)
    if dp_ref is not None:
      def zero():
        dp_ref[...] = jnp.zeros(dp_ref.shape, dp_ref.dtype)
      if lay.reduce:
        pl.when(lay.first_visit())(zero)
      else:
        zero()
    view = lambda r, h: None if r is None else lay.view(r, h)  # noqa: E731
    for h in range(lay.program_heads):
      bias = TileBias(row=b_ref, pair=view(p_ref, h), dpair=view(dp_ref, h))
      body(*(lay.view(r, h) for r in qkv), bias, *(lay.view(r, h) for r in rest), lay=lay)
  return kernel


def _key_tile_kernel(body: Callable, lay: Layout, has_bias: bool, has_pair: bool, want_db: bool):
  """As `_query_tile_kernel`, with the key bias as a column and the pair bias transposed; bodies
  return their heads' bias-grad columns, summed into the program's one key-bias gradient row."""
  def kernel(*refs):
    qkv, b_ref, p_ref, rest, db_ref = _split_refs(refs, has_bias, has_pair, want_db)
    b_col = None if b_ref is None else lay.to_col(b_ref[...])
    db = 0.0
    for h in range(lay.program_heads):
      bias = TileBias(col=b_col, pair=None if p_ref is None else lay.view(p_ref, h))
      db = db + body(*(lay.view(r, h) for r in qkv), bias, *(lay.view(r, h) for r in rest),
                     lay=lay)
    if db_ref is not None:
      db_ref[...] = lay.to_row(db)
  return kernel


@dataclasses.dataclass(frozen=True)
class Problem:
  """[B, N, H, d] q, k, v in a backend's kernel layout, with the launches over them.

  Query-side arrays (a cotangent `tokens`, statistic `rows`) follow q, v and bias follow k, in
  that order after q, k, v: a launch's refs are q, k, v, [bias], [pair], *tokens, *rows,
  *outputs.
  """
  lay: Layout
  q: Any
  k: Any
  v: Any
  kb: Any           # [B, 1, nk_pad] key bias, or None when there is none and no key is padded
  want_db: bool     # a bias was given, so the backward returns its gradient
  nq: int
  nk: int
  pb: Any = None    # [G, H, nq_pad, nk_pad] pair bias, or None
  pbt: Any = None   # its transpose [G, H, nk_pad, nq_pad] (backward only)

  @property
  def b(self) -> int:
    return self.q.shape[0]

  @property
  def groups(self) -> int:
    return 0 if self.pb is None else self.pb.shape[0]

  def queries(self, x):
    """A [B, Nq, H, d] query-side array in kernel layout."""
    return self.lay.prepare(x, self.lay.t.nq_pad)

  def rows(self, x, fill: float = 0.0):
    """A [B, H, Nq] query statistic as rows."""
    return stat_rows(x, self.lay.t.nq_pad, fill)

  def _inputs(self, tokens, rows, pair):
    bias = [self.kb] if self.kb is not None else []
    return [self.q, self.k, self.v, *bias, *([pair] if pair is not None else []), *tokens, *rows]

  def _vmem(self, q_tokens: int, k_tokens: int, n_q_arrays: int, n_pair: int = 0) -> int:
    """q-sized blocks (q, query-side tokens, token outputs), k and v, one score tile, and n_pair
    pair-bias blocks (the bias, its gradient) of the program's tokens."""
    hb, d, dtype = self.lay.t.heads, self.lay.head_dim, self.q.dtype
    pair = [((hb, q_tokens, k_tokens), jnp.float32)] * n_pair
    return vmem_bytes(*[((hb, q_tokens, d), dtype)] * n_q_arrays,
                      *[((hb, k_tokens, d), dtype)] * 2, ((q_tokens, k_tokens), jnp.float32), *pair)

  def over_queries(self, body: Callable, *, name: str, tokens: Sequence = (), rows: Sequence = (),
                   out_tokens: Sequence = (), out_rows: int = 0, pair_grad: bool = False) -> list:
    """A program per query tile, keys looped inside; returns [B, Nq, H, d] outputs of dtypes
    `out_tokens`, then `out_rows` float32 statistics [B, H, Nq], then with `pair_grad` the
    pair-bias gradient [G, H, Nq, Nk] (the body accumulates dL/ds into its tiles)."""
    lay, groups = self.lay, self.groups
    pair_grad = pair_grad and self.pb is not None
    per_example = pair_grad and not lay.tpu   # GPU: dS per example, summed by XLA
    if pair_grad and lay.tpu:
      lay = dataclasses.replace(lay, reduce=groups)
    t = lay.t
    q_tile, q_rows = lay.tokens(t.block_q, True), lay.rows(t.block_q, True)
    in_specs = [q_tile, lay.tokens(t.nk_pad, False), lay.tokens(t.nk_pad, False)]
    in_specs += [lay.bias(t.nk_pad, False)] if self.kb is not None else []
    in_specs += [lay.pair(t.block_q, t.nk_pad, groups)] if self.pb is not None else []
    in_specs += [q_tile] * len(tokens) + [q_rows] * len(rows)
    row_shape = jax.ShapeDtypeStruct((self.b, lay.num_heads, 1, t.nq_pad), jnp.float32)
    out_shape = [jax.ShapeDtypeStruct(self.q.shape, dt) for dt in out_tokens]
    out_shape += [row_shape] * out_rows
    out_specs = [q_tile] * len(out_tokens) + [q_rows] * out_rows
    if pair_grad:
      out_shape.append(jax.ShapeDtypeStruct(
          (self.b if per_example else groups, lay.num_heads, t.nq_pad, t.nk_pad), jnp.float32))
      out_specs.append(lay.pair(t.block_q, t.nk_pad, groups, per_example))
    kernel = _query_tile_kernel(body, lay, self.kb is not None, self.pb is not None, pair_grad)
    vmem = self._vmem(t.block_q, t.nk_pad, 1 + len(tokens) + len(out_tokens),
                      (self.pb is not None) + pair_grad)
    outs = lay.call(kernel, tiles=t.num_q, b=self.b, in_specs=in_specs, out_specs=out_specs,
                    out_shape=out_shape, vmem=vmem,
                    name=name)(*self._inputs(tokens, rows, self.pb))
    n, m = len(out_tokens), len(out_tokens) + out_rows
    res = [lay.finish(o, self.nq) for o in outs[:n]] + [r[:, :, 0, :self.nq] for r in outs[n:m]]
    if pair_grad:
      dpair = outs[m]
      if per_example:
        dpair = dpair.reshape(self.b // groups, groups, *dpair.shape[1:]).sum(0)
      res.append(dpair[:, :, :self.nq, :self.nk])
    return res

  def over_keys(self, body: Callable, *, name: str, tokens: Sequence = (), rows: Sequence = ()):
    """A program per key tile, queries looped inside; returns dK, dV [B, Nk, H, d] and the key-bias
    gradient [B, Nk] (None when no bias was given)."""
    lay, t = self.lay, self.lay.t
    q_all, k_tile = lay.tokens(t.nq_pad, False), lay.tokens(t.block_k, True)
    in_specs = [q_all, k_tile, k_tile]
    in_specs += [lay.bias(t.block_k, True)] if self.kb is not None else []
    in_specs += [lay.pair(t.block_k, t.nq_pad, self.groups)] if self.pbt is not None else []
    in_specs += [q_all] * len(tokens) + [lay.rows(t.nq_pad, False)] * len(rows)
    out_specs = [k_tile, k_tile]
    out_shape = [jax.ShapeDtypeStruct(self.k.shape, self.k.dtype),
                 jax.ShapeDtypeStruct(self.v.shape, self.v.dtype)]
    if self.want_db:
      out_specs.append(lay.group_rows(t.block_k))
      out_shape.append(jax.ShapeDtypeStruct((self.b, lay.num_heads // t.heads, 1, t.nk_pad),
                                            jnp.float32))
    kernel = _key_tile_kernel(body, lay, self.kb is not None, self.pbt is not None, self.want_db)
    vmem = self._vmem(t.nq_pad, t.block_k, 1 + len(tokens), int(self.pbt is not None))
    outs = lay.call(kernel, tiles=t.num_k, b=self.b, in_specs=in_specs, out_specs=out_specs,
                    out_shape=out_shape, vmem=vmem,
                    name=name)(*self._inputs(tokens, rows, self.pbt))
    dbias = outs[2].sum(axis=(1, 2))[:, :self.nk] if self.want_db else None
    return lay.finish(outs[0], self.nk), lay.finish(outs[1], self.nk), dbias

  def gradients(self, do, rows: Sequence, *, weights: Callable, score_grad: Callable, scale: float,
                name: str):
    """(dq, dk, dv, dbias, dpair) from the output cotangent `do` [B, Nq, H, d] and statistic
    `rows` through `dq_head` and `dkdv_head` (launches `{name}_dq`, `{name}_dkdv`)."""
    math = dict(scale=scale, weights=weights, score_grad=score_grad)
    query_side = dict(tokens=[self.queries(do)], rows=rows)
    dq, *dpair = self.over_queries(functools.partial(dq_head, **math), out_tokens=[self.q.dtype],
                                   name=f"{name}_dq", pair_grad=True, **query_side)
    dk, dv, dbias = self.over_keys(functools.partial(dkdv_head, **math), name=f"{name}_dkdv",
                                   **query_side)
    return dq, dk, dv, dbias, (dpair[0] if dpair else None)


def problem(q, k, v, bias, pair=None, *, kind: str, interpret: bool, blocks=None, heads=None,
            backward=False) -> Problem:
  """q [B, Nq, H, d], k, v [B, Nk, H, d], a [B, Nk] bias (or None) and a [G, H, Nq, Nk] pair bias
  (or None) laid out for `kind`."""
  b, nq, h, d = q.shape
  nk = k.shape[1]
  lay = layout(kind, nq, nk, h, d, interpret=interpret, blocks=blocks, heads=heads,
               backward=backward)
  t = lay.t
  kb = key_bias(bias, b, nk, t.nk_pad)
  pb = None if pair is None else pad_pair(pair, t.nq_pad, t.nk_pad)
  pbt = None if pb is None or not backward else pb.transpose(0, 1, 3, 2)
  return Problem(lay, lay.prepare(q, t.nq_pad), lay.prepare(k, t.nk_pad), lay.prepare(v, t.nk_pad),
                 kb, bias is not None, nq, nk, pb, pbt)


# ---- the differentiable core ----
def run(backend: Optional[str], blocks, heads, scale: float, fn: Callable, *args):
  """fn(*args, scale=..., kind=..., interpret=..., blocks=..., heads=...) on the backend."""
  def tpu(*a, interpret):
    return fn(*a, scale=scale, kind="tpu", interpret=interpret, blocks=blocks, heads=heads)

  def gpu(*a, interpret):
    return fn(*a, scale=scale, kind="gpu", interpret=interpret, blocks=blocks, heads=heads)

  return dispatch(backend, tpu, gpu, *args)


def differentiable(forward: Callable, backward: Callable, *, saves_outputs: bool):
  """core(backend, blocks, heads, scale, q, k, v, bias, pair): a custom VJP over two launchers.

  forward(q, k, v, bias, pair, **launch) -> outputs; backward(q, k, v, bias, pair, [outputs,]
  cotangents, **launch) -> (dq, dk, dv, dbias, dpair). `saves_outputs` keeps the forward's
  outputs as residuals (softmax needs o and lse; sigmoid recomputes everything from q, k, v).
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
  def core(backend, blocks, heads, scale, q, k, v, bias, pair):
    return run(backend, blocks, heads, scale, forward, q, k, v, bias, pair)

  def fwd(backend, blocks, heads, scale, q, k, v, bias, pair):
    out = run(backend, blocks, heads, scale, forward, q, k, v, bias, pair)
    return out, (q, k, v, bias, pair) + ((out,) if saves_outputs else ())

  def bwd(backend, blocks, heads, scale, res, cts):
    return run(backend, blocks, heads, scale, backward, *res, cts)

  core.defvjp(fwd, bwd)
  return core
