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
"""
import dataclasses
import functools
import math
from typing import Callable, Optional

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


def tpu_params(num_parallel: int, vmem_bytes: int):
  """Mosaic compiler params: every grid axis is parallel (the key loop lives in the kernel)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  limit = None
  if vmem_bytes > 12 * 2**20:  # past the 16 MiB scoped default (with headroom for temporaries)
    limit = min(round_up(2 * vmem_bytes, 2**20), 100 * 2**20)
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * num_parallel,
                              vmem_limit_bytes=limit)


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
  the other token axis is loaded whole and looped over inside the kernel.
  """
  kind: str  # "tpu" | "gpu"
  t: Tiling
  num_heads: int
  head_dim: int
  interpret: bool

  @property
  def tpu(self) -> bool:
    return self.kind == "tpu"

  def grid(self, b: int, tiles: int):
    return (b, self.num_heads // self.t.heads, tiles)

  def tokens(self, block: int, tiled: bool):
    """Spec of a q/k/v-like array: `block` tokens, at grid tile i if `tiled`, else whole."""
    d, hb = self.head_dim, self.t.heads
    if self.tpu:
      return pl.BlockSpec((None, hb, block, d), lambda b, g, i: (b, g, i if tiled else 0, 0))
    return pl.BlockSpec((None, block, None, d), lambda b, g, i: (b, i if tiled else 0, g, 0))

  def rows(self, block: int, tiled: bool):
    """Spec of a [B, H, 1, n] statistic."""
    hb = self.t.heads if self.tpu else None
    return pl.BlockSpec((None, hb, 1, block), lambda b, g, i: (b, g, 0, i if tiled else 0))

  def bias(self, block: int, tiled: bool):
    """Spec of a [B, 1, n] key bias."""
    return pl.BlockSpec((None, 1, block), lambda b, g, i: (b, 0, i if tiled else 0))

  def group_rows(self, block: int):
    """Spec of a [B, H // heads, 1, n] per-program-group output (the key-bias gradient)."""
    return pl.BlockSpec((None, None, 1, block), lambda b, g, i: (b, g, 0, i))

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
      params = tpu_params(3, vmem) if self.tpu else gpu_params(self.t)
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
