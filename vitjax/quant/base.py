"""Simulated (fake-quant) post-training quantization of any vitjax model, and its int8 path.

A quantizer (one file per method, see `registry`) decides how each *site* is quantized:
  weights      every Dense kernel (and the patch embedding's), per output channel (last axis);
  activations  the input of every Dense, named by what feeds it (KINDS): post-LayerNorm
               (`qkv`, `fc1`, ...), post-GELU (`fc2`), other linear inputs (`proj`, `head`); the
               attention core's matmul inputs (query, key, value; softmax or other weights;
               the factors of linear attention) through `Attention.quant_point`; the LayerNorm
               inputs (only quantizers that ask for them: FQ-ViT's power-of-two factor,
               I-ViT, which also computes the LayerNorm itself, `Quantizer.layer_norm`); fc1's
               output (`pre_gelu`, only where a quantizer computes the GELU, `Quantizer.gelu`).
Nothing in the model changes: Dense and LayerNorm calls are intercepted (`flax.linen.
intercept_methods`) and the attention core calls the identity hook `quant_point`, which the
quantized apply intercepts too.

Calibration runs the model once (jit-compiled) on N images; each activation site calibrates on
the first tensor it sees, with the sites before it already quantized (the sequential order of the official
PTQ codes, where a quantizer initialises itself on its first forward pass). It is deterministic:
the same images give the same state. A quantizer may then reparameterise the float parameters
(RepQ-ViT) and recalibrate what that changed.

The state is a plain pytree of arrays ({"weights": {path: ...}, "acts": {site: ...}}): it jits,
saves (`save` / `restore`, next to the parameters written by `vitjax.checkpoints`) and restores.

Integer path (`QuantConfig.integer=True`): every quantized Dense runs as an int8 x int8 -> int32
dot_general (qwix's `dot_general` on `QArray`s, which applies the activation's zero point) plus
the weight zero-point correction; the result equals fake-quant up to float rounding. It needs
uniform per-tensor quantizers at the Dense inputs (`Quantizer.uniform_dense_inputs`).
"""
import dataclasses
import json
import os
import re
from typing import Callable, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# what feeds an activation site
KINDS = ("post_ln", "post_gelu", "linear", "query", "key", "value", "softmax", "weights",
         "left", "right", "norm_input", "pre_gelu")
# layers that may stay in full precision (weights and inputs): the patch embedding and the head
FP_LAYERS = ("embedding", "head")
BIT_WIDTHS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A4": (4, 4)}
POST_LN_DENSE = ("qkv", "fc1", "q", "kv")  # Dense layers whose input is a LayerNorm's output
POST_GELU_DENSE = ("fc2",)


class QuantError(ValueError):
  """A quantization choice that cannot work; the message says what would."""


# ----------------------------------------------------------------------------- the numerics
def round_clip(x, lo, hi):
  return jnp.clip(jnp.round(x), lo, hi)


def uniform(x, scale, zero, bits: int):
  """Asymmetric uniform fake-quant: (clip(round(x / s) + z, 0, 2^b - 1) - z) s."""
  q = round_clip(x / scale + zero, 0, 2 ** bits - 1)
  return (q - zero) * scale


def uniform_codes(x, scale, zero, bits: int):
  """The integer codes of `uniform` (0 .. 2^b - 1) as float32."""
  return round_clip(x / scale + zero, 0, 2 ** bits - 1)


def minmax_params(lo, hi, bits: int) -> dict:
  """Scale and zero point that map [lo, hi] onto 0 .. 2^b - 1 (the zero point is rounded, as in
  the official codes; a range without width gets scale 1e-8 instead of 0)."""
  lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
  scale = jnp.maximum((hi - lo) / (2 ** bits - 1), 1e-8)
  return {"scale": scale, "zero": jnp.round(-lo / scale)}


def symmetric_params(absmax, bits: int) -> dict:
  """Signed symmetric quantization as unsigned codes: scale = max|x| / (2^(b-1) - 1), zero point
  2^(b-1), so codes - zero run over -2^(b-1) .. 2^(b-1) - 1."""
  absmax = jnp.asarray(absmax, jnp.float32)
  scale = jnp.maximum(absmax / (2 ** (bits - 1) - 1), 1e-8)
  return {"scale": scale, "zero": jnp.full_like(scale, 2 ** (bits - 1))}


def channel_minmax(w):
  """Per-output-channel (last axis) min and max of a kernel."""
  axes = tuple(range(w.ndim - 1))
  return w.min(axis=axes), w.max(axis=axes)


def percentile_search(x, bits: int, pcts: Sequence[float], axis=None) -> dict:
  """Uniform params from the [1 - p, p] quantiles of x for the p in `pcts` with the least squared
  error (RepQ-ViT's activation and weight initialisation). axis: the channel axis kept (None:
  per tensor)."""
  if axis is None:
    return {k: v[0] for k, v in _search_columns(x.reshape(-1, 1), bits, pcts).items()}
  return _search_columns(jnp.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]), bits, pcts)


def _search_columns(cols, bits: int, pcts) -> dict:
  cands = [minmax_params(jnp.quantile(cols, 1.0 - p, axis=0), jnp.quantile(cols, p, axis=0), bits)
           for p in pcts]
  errs = jnp.stack([jnp.mean(jnp.square(cols - uniform(cols, c["scale"], c["zero"], bits)), 0)
                    for c in cands])
  pick = jnp.argmin(errs, axis=0)  # the first of equal errors, as the official strict `<` keeps
  return {k: jnp.stack([c[k] for c in cands])[pick, jnp.arange(cols.shape[1])]
          for k in ("scale", "zero")}


# ----------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """method: a registered quantizer; bits "W8A8" / "W6A6" / "W4A4" (or w_bits / a_bits);
  calib_images: how many images calibrate; full_precision: layers kept in float (FP_LAYERS);
  integer: run the quantized Dense layers as int8 matmuls; options: the method's own."""
  method: str = "minmax"
  w_bits: int = 8
  a_bits: int = 8
  calib_images: int = 32
  full_precision: tuple = FP_LAYERS
  integer: bool = False
  options: Mapping = dataclasses.field(default_factory=dict)

  @property
  def label(self) -> str:
    return f"{self.method} W{self.w_bits}A{self.a_bits}" + (" int8" if self.integer else "")


def parse_bits(bits: str) -> tuple:
  m = re.fullmatch(r"W(\d+)A(\d+)", str(bits).upper())
  if not m:
    raise QuantError(f"bits must look like 'W8A8' (weights, activations), got {bits!r}; "
                     f"the study's widths: {', '.join(BIT_WIDTHS)}")
  return int(m.group(1)), int(m.group(2))


def make_config(spec) -> QuantConfig:
  """A QuantConfig from a mapping (ml_collections ConfigDict or dict): method, bits or w_bits /
  a_bits, calib_images, full_precision, integer, and the method's options."""
  d = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
  fields = {f.name for f in dataclasses.fields(QuantConfig)} - {"options"}
  if "bits" in d:
    d["w_bits"], d["a_bits"] = parse_bits(d.pop("bits"))
  options = dict(d.pop("options", None) or {})
  options.update({k: d.pop(k) for k in list(d) if k not in fields})
  d["full_precision"] = tuple(d.get("full_precision", FP_LAYERS))
  cfg = QuantConfig(options=options, **d)
  check_config(cfg)
  return cfg


def check_config(cfg: QuantConfig):
  from vitjax.quant import registry  # pylint: disable=import-outside-toplevel
  entry = registry.get(cfg.method)
  for what, b in (("w_bits", cfg.w_bits), ("a_bits", cfg.a_bits)):
    if not 2 <= int(b) <= 8:
      raise QuantError(f"{what}={b} is outside 2..8; the int8 containers hold at most 8 bits")
  bad = set(cfg.full_precision) - set(FP_LAYERS)
  if bad:
    raise QuantError(f"full_precision names unknown layers {sorted(bad)}; valid: {FP_LAYERS}")
  if cfg.calib_images < 1:
    raise QuantError(f"calib_images={cfg.calib_images}; calibration needs at least one image")
  entry.make(cfg.options)  # unknown options fail here
  if cfg.integer and not entry.cls.uniform_dense_inputs:
    raise QuantError(f"quantizer {cfg.method!r} does not quantize every Dense input uniformly "
                     f"per tensor, which the int8 path needs; methods with an integer path: "
                     f"{', '.join(registry.integer_methods())}")


def check_model(model, cfg: QuantConfig):
  """Model x quantizer checks: unscanned blocks, materialised attention, softmax where the
  method needs it."""
  from vitjax.quant import registry  # pylint: disable=import-outside-toplevel
  if getattr(model, "scan", False):
    raise QuantError("quantization calibrates each block on its own: build the model with "
                     "scan=False")
  if getattr(model, "impl", "reference") != "reference":
    raise QuantError(f"quantization reads the attention weights, which impl={model.impl!r} "
                     "fuses away; use impl='reference'")
  quantizer = registry.get(cfg.method).make(cfg.options)
  if quantizer.needs_softmax:
    for spec in attention_specs(model):
      if "softmax" not in weight_kinds(spec):
        name = spec if isinstance(spec, str) else dict(spec)["name"]
        raise QuantError(
            f"quantizer {cfg.method!r} has a post-softmax quantizer and attention {name!r} has "
            f"no softmax; valid pairs: {cfg.method} with {', '.join(registry.softmax_attentions())}"
            f"; or pass option attention_weights='uniform' (uniform weights, the method's other "
            f"parts kept), or a quantizer without softmax parts: "
            f"{', '.join(registry.generic_methods())}")


def attention_specs(model) -> list:
  blocks = model.stage().blocks if hasattr(model, "stage") else []
  return [b["attention"] for b in blocks]


_KINDS_CACHE: dict = {}


def weight_kinds(spec) -> frozenset:
  """The kinds the attention mechanism of `spec` passes to `quant_point`, found by tracing it
  once on a tiny input (what it computes, not a second list of facts)."""
  from vitjax import attention as attn_lib  # pylint: disable=import-outside-toplevel
  key = json.dumps(spec if isinstance(spec, str) else dict(spec), sort_keys=True, default=str)
  if key not in _KINDS_CACHE:
    seen = set()

    def spy(next_fun, args, kwargs, context):
      if context.method_name == "quant_point":
        seen.add(args[0])
      return next_fun(*args, **kwargs)

    layer = attn_lib.build(spec, num_heads=2, dtype=jnp.float32)
    x = jnp.zeros((1, 5, 8), jnp.float32)
    ctx = attn_lib.AttnContext(grid=(2, 2), num_prefix=1)
    with nn.intercept_methods(spy):
      jax.eval_shape(lambda: layer.init_with_output(jax.random.key(0), x, ctx))
    _KINDS_CACHE[key] = frozenset(seen)
  return _KINDS_CACHE[key]


# ----------------------------------------------------------------------------- the quantizer
class Quantizer:
  """A post-training quantization method. Subclasses override what differs:

  calibrate_weight(w, bits) -> params   per output channel (default: RepQ-ViT-style percentile
                                        search, asymmetric)
  calibrate(kind, x, bits) -> params    an activation site's params on its first tensor
  quantize(kind, x, params, bits) -> x  fake-quant of an activation
  reparameterise(...)                   after calibration: a change of the float parameters
  Options are dataclass fields of the subclass; `attention_weights="uniform"` replaces a
  post-softmax quantizer by the uniform one (then any attention is valid).
  """
  name: str = ""
  needs_softmax: bool = False        # has a quantizer made for softmax weights
  uniform_dense_inputs: bool = True  # every Dense input uniform per tensor (the int8 path)
  quantizes_norm_inputs: bool = False
  replaces_gelu: bool = False        # computes fc2's input from fc1's output (`gelu`)

  def __init__(self, **options):
    fields = {f.name: f.default for f in dataclasses.fields(self.options_cls)}
    bad = set(options) - set(fields)
    if bad:
      raise QuantError(f"quantizer {self.name!r} has no option(s) {sorted(bad)}; valid options: "
                       f"{sorted(fields) or 'none'}")
    self.opts = self.options_cls(**options)
    if getattr(self.opts, "attention_weights", "own") not in ("own", "uniform"):
      raise QuantError(f"attention_weights={self.opts.attention_weights!r}; valid: own, uniform")
    if getattr(self.opts, "attention_weights", "own") == "uniform":
      self.needs_softmax = False

  @dataclasses.dataclass(frozen=True)
  class options_cls:  # noqa: N801  (replaced by each method's own)
    attention_weights: str = "own"

  def own_weights(self) -> bool:
    return getattr(self.opts, "attention_weights", "own") == "own"

  # defaults: per-channel weights and per-tensor activations by percentile search (RepQ-ViT's)
  def calibrate_weight(self, w, bits: int) -> dict:
    return percentile_search(w, bits, (0.999, 0.9999, 0.99999), axis=w.ndim - 1)

  def calibrate(self, kind: str, x, bits: int) -> dict:
    return percentile_search(x, bits, (0.999, 0.9999, 0.99999))

  def quantize(self, kind: str, x, params: dict, bits: int):
    return uniform(x, params["scale"], params["zero"], bits)

  def layer_norm(self, x, params: dict, gamma, beta):
    """A LayerNorm of its quantized input x computed by the method; None: the float one."""
    del x, params, gamma, beta
    return None

  def gelu(self, x, params: dict):
    """fc2's input from fc1's quantized output (only where `replaces_gelu`)."""
    raise NotImplementedError

  def reparameterise(self, model, params, state, images, cfg):
    """(params, state) after the first calibration pass; default unchanged."""
    del model, images, cfg
    return params, state


# ----------------------------------------------------------------------------- sites
def module_path(module) -> tuple:
  return tuple(str(p) for p in module.path)


def dense_kind(path: tuple) -> str:
  name = path[-1] if path else ""
  if name in POST_LN_DENSE:
    return "post_ln"
  if name in POST_GELU_DENSE:
    return "post_gelu"
  return "linear"


def is_full_precision(path: tuple, cfg: QuantConfig) -> bool:
  return "head" in cfg.full_precision and bool(path) and path[-1] in ("head", "head_dist")


def site_key(path: tuple, kind: str) -> str:
  return "/".join(path) + ":" + kind


def weight_paths(params, cfg: QuantConfig) -> list:
  """Param paths ('a/b/kernel') of the kernels to quantize: every 2-D Dense kernel not kept in
  full precision, and the patch embedding unless kept."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  out = []
  for k, v in flat.items():
    parts = tuple(k.split("/"))
    if parts[-1] == "kernel" and v.ndim == 2 and not is_full_precision(parts[:-1], cfg):
      out.append(k)
    elif parts[-1] == "embedding_kernel" and "embedding" not in cfg.full_precision:
      out.append(k)
  return sorted(out)


# ----------------------------------------------------------------------------- apply
@dataclasses.dataclass
class _Run:
  """One quantized forward: calibrating (fills state) or applying it."""
  quantizer: Quantizer
  cfg: QuantConfig
  state: dict
  calibrating: bool = False
  trace: Optional[dict] = None  # site -> (input, output) for tests
  fc1_out: dict = dataclasses.field(default_factory=dict)  # MLP path -> fc1's output (gelu)

  def act(self, kind: str, key: str, x):
    acts = self.state["acts"]
    if key not in acts:
      if not self.calibrating:
        raise QuantError(f"activation site {key} was not calibrated; calibrate with the same "
                         "model (attention, reducer, image size) as the one applied")
      acts[key] = jax.tree_util.tree_map(jnp.asarray,
                                         self.quantizer.calibrate(kind, x, self.cfg.a_bits))
    y = self.quantizer.quantize(kind, x, acts[key], self.cfg.a_bits)
    if self.trace is not None:
      self.trace[key] = (x, y)
    return y

  def method_gelu(self, path: tuple, x):
    """fc2's input as the method computes it from fc1's output, itself a quantized site."""
    pre = self.fc1_out.pop(path[:-1], None)
    if pre is None:
      raise QuantError(f"{'/'.join(path)} has no fc1 before it in the same module; quantizer "
                       f"{self.quantizer.name!r} computes its GELU from fc1's output")
    key = site_key(path[:-1] + ("fc1",), "pre_gelu")
    pre = self.act("pre_gelu", key, pre)
    return self.quantizer.gelu(pre, self.state["acts"][key]).astype(x.dtype)

  def __call__(self, next_fun, args, kwargs, context):
    module, method = context.module, context.method_name
    if method == "quant_point":
      kind, x = args[0], args[1]
      return self.act(kind, site_key(module_path(module), kind), x)
    if isinstance(module, nn.Dense) and method == "__call__":
      path = module_path(module)
      if is_full_precision(path, self.cfg):
        return next_fun(*args, **kwargs)
      kind = dense_kind(path)
      key = site_key(path, kind)
      x = args[0]
      if kind == "post_gelu" and self.quantizer.replaces_gelu:
        x = self.method_gelu(path, x)
      x = self.act(kind, key, x)
      if self.cfg.integer:
        y = integer_dense(module, x, self.state, key, path, self.cfg)
      else:
        y = next_fun(x, *args[1:], **kwargs)
      if path[-1] == "fc1" and self.quantizer.replaces_gelu:
        self.fc1_out[path[:-1]] = y
      return y
    if (isinstance(module, nn.LayerNorm) and method == "__call__"
        and self.quantizer.quantizes_norm_inputs):
      path = module_path(module)
      key = site_key(path, "norm_input")
      x = self.act("norm_input", key, args[0])
      prm = module.variables["params"]
      y = self.quantizer.layer_norm(x, self.state["acts"][key], prm.get("scale", 1.0),
                                    prm.get("bias", 0.0))
      return next_fun(x, *args[1:], **kwargs) if y is None else y.astype(x.dtype)
    return next_fun(*args, **kwargs)


def fake_quant_params(params, state, cfg: QuantConfig):
  """The float parameters with every quantized kernel replaced by its fake-quant value."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  for k, p in state["weights"].items():
    flat[k] = uniform(flat[k], p["scale"], p["zero"], cfg.w_bits).astype(flat[k].dtype)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def input_images(images, state, cfg: QuantConfig, quantizer: Quantizer, calibrating: bool):
  """The patch embedding's input, quantized unless the embedding stays in full precision."""
  if "embedding" in cfg.full_precision:
    return images
  run = _Run(quantizer, cfg, state, calibrating)
  return run.act("linear", site_key(("embedding",), "linear"), images)


def quantized_apply(model, params, state, images, cfg: QuantConfig, *, calibrating=False,
                    trace=None, **kwargs):
  """model.apply with the quantization of `state` (fake-quant weights, intercepted activations)."""
  from vitjax.quant import registry  # pylint: disable=import-outside-toplevel
  quantizer = registry.get(cfg.method).make(cfg.options)
  run = _Run(quantizer, cfg, state, calibrating, trace)
  variables = {"params": fake_quant_params(params, state, cfg)}
  images = input_images(images, state, cfg, quantizer, calibrating)
  with nn.intercept_methods(run):
    return model.apply(variables, images, train=False, **kwargs)


def calibrate_weights(params, cfg: QuantConfig, quantizer: Quantizer, paths=None) -> dict:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  return {k: jax.tree_util.tree_map(jnp.asarray, quantizer.calibrate_weight(flat[k], cfg.w_bits))
          for k in (paths if paths is not None else weight_paths(params, cfg))}


_COMPILED: dict = {}


def traced_bits(cfg: QuantConfig) -> tuple:
  return jnp.int32(cfg.w_bits), jnp.int32(cfg.a_bits)


def compiled(what: str, model, cfg: QuantConfig, fn: Callable):
  """jax.jit(fn(model, cfg, *args, w_bits, a_bits)), one compile per model and method: the bit
  widths are traced, so W8A8, W6A6 and W4A4 share it."""
  key = (what, repr(model), cfg.method, json.dumps(dict(cfg.options), sort_keys=True),
         cfg.full_precision, cfg.integer, cfg.calib_images)
  if key not in _COMPILED:
    def run(*args):
      *rest, w_bits, a_bits = args
      return fn(model, dataclasses.replace(cfg, w_bits=w_bits, a_bits=a_bits), *rest)
    _COMPILED[key] = jax.jit(run)
  return _COMPILED[key]


def _calibration(model, cfg, params, images):
  from vitjax.quant import registry  # pylint: disable=import-outside-toplevel
  quantizer = registry.get(cfg.method).make(cfg.options)
  weights = calibrate_weights(params, cfg, quantizer)
  # each site calibrates on the first tensor it sees, after the sites before it quantize
  state = {"weights": weights, "acts": {}}
  quantized_apply(model, params, state, images, cfg, calibrating=True)
  return weights, state["acts"]


def _forward(model, cfg, params, state, images):
  return quantized_apply(model, params, state, images, cfg)


def calibrate(model, params, images, cfg: QuantConfig):
  """(params, state): calibration on `images` [N, H, W, C] (all of them, one eager pass).
  The params differ from the given ones only for quantizers that reparameterise (RepQ-ViT)."""
  from vitjax.quant import registry  # pylint: disable=import-outside-toplevel
  check_config(cfg)
  check_model(model, cfg)
  quantizer = registry.get(cfg.method).make(cfg.options)
  images = jnp.asarray(images, jnp.float32)[:cfg.calib_images]
  weights, acts = compiled("calibrate", model, cfg, _calibration)(params, images, *traced_bits(cfg))
  params, state = quantizer.reparameterise(model, params, {"weights": weights, "acts": acts},
                                           images, cfg)
  return params, state


# ----------------------------------------------------------------------------- int8 path
def weight_codes(w, p, bits: int):
  """Kernel -> (int8 codes - 2^(b-1), int8 zero point - 2^(b-1)) per output channel."""
  half = 2 ** (bits - 1)
  codes = uniform_codes(w, p["scale"], p["zero"], bits) - half
  return codes.astype(jnp.int8), (p["zero"] - half).astype(jnp.int32)


def integer_dense(module: nn.Dense, x, state, key, path, cfg: QuantConfig):
  """y = x W + b with x and W as int8 codes: an int8 x int8 -> int32 dot_general through qwix.

  x is already fake-quantized, so its codes are exact. With codes shifted into int8 (c - 2^(b-1)),
  x = s_x (cx - zx) and W = s_w (cw - zw):  x W = s_x s_w [(cx - zx) cw - zw sum_k (cx - zx)];
  qwix's dot_general computes s_x s_w (cx - zx) cw (the activation's zero point is its own);
  the weight zero point's row-sum term is added here.
  """
  import qwix  # pylint: disable=import-outside-toplevel
  kpath = "/".join(path) + "/kernel"
  wp, ap = state["weights"][kpath], state["acts"][key]
  kernel = module.variables["params"]["kernel"]
  bias = module.variables["params"].get("bias")
  half = 2 ** (cfg.a_bits - 1)
  cx = (uniform_codes(x, ap["scale"], ap["zero"], cfg.a_bits) - half).astype(jnp.int8)
  zx = (ap["zero"] - half).astype(jnp.int8)
  ones = (1,) * x.ndim
  lhs = qwix.QArray(qvalue=cx, scale=jnp.reshape(ap["scale"], ones).astype(jnp.float32),
                    zero_point=jnp.reshape(zx, ones), qtype=jnp.int8)
  # the kernel is stored fake-quantized: its codes come back exactly
  cw, zw = weight_codes(kernel, wp, cfg.w_bits)
  rhs = qwix.QArray(qvalue=cw, scale=wp["scale"][None, :].astype(jnp.float32), qtype=jnp.int8)
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  y = qwix.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)
  rowsum = jnp.sum(cx.astype(jnp.int32) - zx.astype(jnp.int32), axis=-1, keepdims=True)
  y = y - (ap["scale"] * wp["scale"]) * (zw * rowsum).astype(jnp.float32)
  if bias is not None:
    y = y + bias
  return y.astype(module.dtype or x.dtype)


# ----------------------------------------------------------------------------- the model
class QuantizedModel:
  """A model with its quantization: `apply(variables, images, train=False)` like the model's
  (so the trainer's evaluation step and the throughput timer take it), other attributes the
  model's. Build with `quantize`."""

  def __init__(self, model, state, cfg: QuantConfig):
    self.model, self.state, self.cfg = model, state, cfg

  def apply(self, variables, images, train: bool = False, **kwargs):
    if train:
      raise QuantError("a quantized model is for inference; train the float model")
    if kwargs:
      return quantized_apply(self.model, variables["params"], self.state, images, self.cfg,
                             **kwargs)
    return compiled("apply", self.model, self.cfg, _forward)(
        variables["params"], self.state, images, *traced_bits(self.cfg))

  def __getattr__(self, name):
    return getattr(self.model, name)

  def __repr__(self):
    return f"QuantizedModel({self.cfg.label}, {self.model!r})"


def quantize(model, params, images, cfg) -> tuple:
  """(QuantizedModel, params): calibrates `cfg` (a QuantConfig or a mapping) on `images`."""
  cfg = cfg if isinstance(cfg, QuantConfig) else make_config(cfg)
  params, state = calibrate(model, params, images, cfg)
  return QuantizedModel(model, state, cfg), params


# ----------------------------------------------------------------------------- save / restore
def _flat_state(state) -> dict:
  out = {}
  for group in ("weights", "acts"):
    for site, prm in state[group].items():
      for name, v in prm.items():
        out[f"{group}|{site}|{name}"] = np.asarray(v)
  return out


def save(path: str, qmodel: QuantizedModel, params):
  """Writes the (possibly reparameterised) parameters with `vitjax.checkpoints.save` (format from
  the suffix) and the quantization state and config beside them (`<path>.quant.npz`)."""
  from vitjax import checkpoints  # pylint: disable=import-outside-toplevel
  checkpoints.save(path, params, qmodel.model)
  cfg = dataclasses.asdict(qmodel.cfg)
  cfg["full_precision"] = list(cfg["full_precision"])
  arrays = _flat_state(qmodel.state)
  tmp = path + ".quant.tmp.npz"
  np.savez(tmp, __config__=np.asarray(json.dumps(cfg)), **arrays)
  os.replace(tmp, path + ".quant.npz")


def restore(path: str, model) -> tuple:
  """(QuantizedModel, params) written by `save`, for `model` (the same architecture)."""
  from vitjax import checkpoints  # pylint: disable=import-outside-toplevel
  qpath = path + ".quant.npz"
  if not os.path.exists(qpath):
    raise QuantError(f"{qpath} does not exist; it is written by vitjax.quant.save next to the "
                     "parameters")
  params = checkpoints.load(path, model)
  with np.load(qpath) as z:
    cfg = json.loads(str(z["__config__"]))
    state = {"weights": {}, "acts": {}}
    for k in z.files:
      if k == "__config__":
        continue
      group, site, name = k.split("|")
      state[group].setdefault(site, {})[name] = jnp.asarray(z[k])
  cfg["full_precision"] = tuple(cfg["full_precision"])
  return QuantizedModel(model, state, QuantConfig(**cfg)), params


# ----------------------------------------------------------------------------- evaluation
def calibration_images(data_cfg, n: int):
  """The first n images of the config's train split, with the evaluation preprocessing (no
  shuffling, no augmentation: the same n images every time)."""
  from vitjax import data  # pylint: disable=import-outside-toplevel
  split = data_cfg["train_split"]
  out, count = [], 0
  for batch in data.make_eval_batches(data_cfg, global_batch_size=min(n, 256), split=split):
    keep = np.asarray(batch["mask"]).astype(bool)
    out.append(np.asarray(batch["image"])[keep])
    count += int(keep.sum())
    if count >= n:
      break
  images = np.concatenate(out)[:n]
  if len(images) < n:
    raise QuantError(f"calib_images={n} but the split {split!r} has {len(images)} images")
  return images


def from_config(config, model, params, label: str = "") -> tuple:
  """(model, params, label) quantized as `config.quant` says (unchanged without it or with
  method 'none'): calibration on the first calib_images of config.data's train split."""
  spec = config.get("quant") if hasattr(config, "get") else None
  if not spec or spec.get("method", "none") == "none":
    return model, params, label
  cfg = make_config(spec)
  images = calibration_images(config.data, cfg.calib_images)
  qmodel, params = quantize(model, params, images, cfg)
  return qmodel, params, f"{label} [{cfg.label}]".strip()


def kept_overlap(out_fp: Mapping, out_q: Mapping) -> Optional[float]:
  """Mean share of the full-precision model's kept tokens that the quantized model keeps too,
  over the images and the reductions that keep a subset (`out["reductions"]`, index >= 0)."""
  red_fp, red_q = out_fp.get("reductions", {}), out_q.get("reductions", {})
  shares = []
  for block in sorted(red_fp):
    a, b = np.asarray(red_fp[block]["index"]), np.asarray(red_q[block]["index"])
    for ra, rb in zip(a, b):
      kept_a, kept_b = set(ra[ra >= 0].tolist()), set(rb[rb >= 0].tolist())
      if kept_a:
        shares.append(len(kept_a & kept_b) / len(kept_a))
  return float(np.mean(shares)) if shares else None
