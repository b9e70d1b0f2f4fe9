"""NAT and DiNAT: the official models' parameter counts (their state dicts rebuilt with plain shapes
from the official constructor arguments), a tiny model's forward / gradient / bf16, DiNAT with
dilation 1 equal to NAT, config errors, layer ids, logits and gradients equal to the official
code's, and a sharded train step on 8 CPU devices.

The official parity test runs SHI-Labs/Neighborhood-Attention-Transformer's
`classification/nat.py` in the torch interpreter (`VITJAX_TORCH_PYTHON`) from the directory that
`VITJAX_NAT_OFFICIAL` names, with natten's `NeighborhoodAttention2D` replaced by the naive
definition written below (natten is a compiled extension); it skips without either.

The tiny model (embed 16, depths (2, 2), heads (1, 2), kernel 3, layer scale, 32 px) has grids
8 and 4; DiNAT's rule dilates stage 0's second block by 8 // 3 = 2, so that stage's dilation groups
are 4 long and their border windows shift inward.
"""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm_reference

from vitjax import models
from vitjax.checkpoints import common
from vitjax.tokens import macs as macs_lib
from vitjax.train import optim, recipe

OFFICIAL_DIR = os.environ.get("VITJAX_NAT_OFFICIAL")
TINY = dict(name="dinat", embed_dim=16, depths=(2, 2), num_heads=(1, 2), kernel_size=3,
            mlp_ratio=2.0, layerscale=0.5)
OFFICIAL_KWARGS = dict(embed_dim=16, depths=[2, 2], num_heads=[1, 2], kernel_size=3,
                       mlp_ratio=2.0, layer_scale=0.5, dilations=[[1, 2], [1, 1]],
                       num_classes=10, drop_path_rate=0.0)
SIZE = 32


def tiny(dtype="float32", **kw):
  return models.build({**TINY, **kw}, num_classes=10, image_size=SIZE, dtype=dtype)


def random_params(model, seed=0):
  return timm_reference.random_params(model, seed, offsets=(("scale", 1.0), ("gamma", 0.5)))


def images(n=2, seed=7):
  return np.random.default_rng(seed).normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)


MODEL = tiny()


@jax.jit
def logits_and_grads(params, x, cot):
  """MODEL's logits and the gradients of <logits, cot> for its parameters and the images."""
  def weighted(p, x):
    logits = MODEL.apply({"params": p}, x)[0]
    return jnp.sum(logits * cot), logits
  (_, logits), grads = jax.value_and_grad(weighted, argnums=(0, 1), has_aux=True)(params, x)
  return logits, grads


# ------------------------------------------------------------------ the official layout
def official_shapes(embed_dim, depths, num_heads, mlp_ratio, layer_scale=None, kernel_size=7,
                    num_classes=1000, **_):
  """The official NAT's state dict as {name: shape}, read off its constructor: ConvTokenizer
  (proj.0: 3 -> e/2, proj.1: e/2 -> e, 3x3 convs with bias; LayerNorm), per level the NATLayers
  (norm1, attn.qkv, attn.rpb, attn.proj, norm2, mlp.fc1/fc2, gamma1/gamma2 with layer scale) and
  a ConvDownsampler (3x3 conv C -> 2C without bias, LayerNorm) on all levels but the last, then
  the final norm and the head."""
  e, k = embed_dim, kernel_size
  shapes = {"patch_embed.proj.0.weight": (e // 2, 3, 3, 3), "patch_embed.proj.0.bias": (e // 2,),
            "patch_embed.proj.1.weight": (e, e // 2, 3, 3), "patch_embed.proj.1.bias": (e,),
            "patch_embed.norm.weight": (e,), "patch_embed.norm.bias": (e,)}
  for i, (depth, heads) in enumerate(zip(depths, num_heads)):
    dim = e * 2 ** i
    hidden = int(dim * mlp_ratio)
    for j in range(depth):
      p = f"levels.{i}.blocks.{j}."
      shapes.update({
          p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
          p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
          p + "attn.rpb": (heads, 2 * k - 1, 2 * k - 1),
          p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
          p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
          p + "mlp.fc1.weight": (hidden, dim), p + "mlp.fc1.bias": (hidden,),
          p + "mlp.fc2.weight": (dim, hidden), p + "mlp.fc2.bias": (dim,)})
      if layer_scale is not None:
        shapes.update({p + "gamma1": (dim,), p + "gamma2": (dim,)})
    if i < len(depths) - 1:
      p = f"levels.{i}.downsample."
      shapes.update({p + "reduction.weight": (2 * dim, dim, 3, 3), p + "norm.weight": (2 * dim,),
                     p + "norm.bias": (2 * dim,)})
  f = e * 2 ** (len(depths) - 1)
  shapes.update({"norm.weight": (f,), "norm.bias": (f,), "head.weight": (num_classes, f),
                 "head.bias": (num_classes,)})
  return shapes


def ours_from_official(name: str, value):
  """One official tensor -> (our flat name, our array): convolutions OIHW -> HWIO, Linear
  weights transposed; a level's downsampler opens the next stage here."""
  leaf = {"weight": "kernel" if value.ndim > 1 else "scale"}
  parts = name.split(".")
  if parts[0] == "patch_embed":
    module = "embedding_norm" if parts[1] == "norm" else f"embedding_conv_{parts[2]}"
  elif parts[0] == "levels" and parts[2] == "downsample":
    module = f"merge_{int(parts[1]) + 1}/{parts[3]}"
  elif parts[0] == "levels":
    inner = {"gamma1": "ls1", "gamma2": "ls2"}.get(parts[4], "/".join(parts[4:-1]))
    module = f"stage_{parts[1]}/block_{parts[3]}/{inner}"
    leaf.update(gamma1="gamma", gamma2="gamma")
  else:
    module = parts[0]
  value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T if value.ndim == 2 else value
  return f"{module}/{leaf.get(parts[-1], parts[-1])}", value


def from_official(state_dict) -> dict:
  return dict(ours_from_official(k, np.asarray(v)) for k, v in state_dict.items())


# name, variant, official constructor arguments, its count, the paper's (M), GMACs
VARIANTS = [
    ("nat", "M", dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3),
     19_984_174, 20, 2.69),
    # NAT-T = tokenizer 19,520 + levels 3 x 42,066 + 4 x 166,052 + 18 x 659,784 + 5 x 2,630,288
    # + downsamplers 73,984 + 295,424 + 1,180,672 + final norm and head 514,024, where a block of
    # width C, h heads and kernel 7 holds 10 C^2 + 12 C + 169 h (mlp ratio 3)
    ("nat", "T", dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3),
     27_901_582, 28, 4.30),
    ("nat", "S", dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2,
                      layer_scale=1e-5), 50_743_297, 51, 7.77),
    ("nat", "B", dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2,
                      layer_scale=1e-5), 89_769_652, 90, 13.68),
    # DiNAT-S: NAT-S without layer scale (2 x 30 blocks' gammas: 23,616 fewer)
    ("dinat", "S", dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24),
                        mlp_ratio=2), 50_719_681, 51, 7.77),
    ("dinat", "L", dict(embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48),
                        mlp_ratio=2), 200_943_514, 200, 30.46),
]


@pytest.mark.parametrize("family,variant,official,count,paper,gmacs", VARIANTS)
def test_variants_have_the_official_parameters(family, variant, official, count, paper, gmacs):
  model = models.build({"name": family, "variant": variant}, num_classes=1000, image_size=224)
  shapes = common.abstract_params(model)
  ours = {k: v.shape for k, v in common.flatten(shapes).items()}
  theirs = official_shapes(**official)
  assert sum(int(np.prod(s)) for s in theirs.values()) == count
  assert models.num_params(shapes) == count
  assert abs(count / 1e6 - paper) < 1  # the papers' tables: 20, 28, 51, 90, 200 M
  # one to one, shape for shape (a zero-strided array per official tensor)
  mapped = dict(ours_from_official(k, np.broadcast_to(np.float32(0), s)) for k, s in
                theirs.items())
  assert {k: v.shape for k, v in mapped.items()} == ours
  # paper: 2.7 / 4.3 / 7.8 / 13.7 / 7.8 / 30.6 GFLOPs
  assert round(macs_lib.model_macs(model) / 1e9, 2) == gmacs


def test_dinat_dilations_are_the_official_lists():
  tiny_t = models.build({"name": "dinat", "variant": "T"}, num_classes=0, image_size=224)
  assert [tiny_t.block_dilations(s) for s in range(4)] == [
      [1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
  large = models.build({"name": "dinat", "variant": "L"}, num_classes=0, image_size=384)
  assert [large.block_dilations(s) for s in range(4)] == [
      [1, 13, 1], [1, 6, 1, 6], [1, 3] * 9, [1] * 5]
  nat = models.build({"name": "nat", "variant": "T"}, num_classes=0, image_size=224)
  assert {d for s in range(4) for d in nat.block_dilations(s)} == {1}
  assert nat.attention_spec(0, 1) == {"name": "neighborhood", "kernel_size": 7, "dilation": 1}
  assert tiny_t.attention_spec(0, 1) == {"name": "dilated_neighborhood", "kernel_size": 7,
                                         "dilation": 8}


def test_tiny_forward_gradient_bf16():
  params = random_params(MODEL)
  x = images()
  cot = np.random.default_rng(1).normal(size=(2, 10)).astype(np.float32)
  logits, (grads, dx) = logits_and_grads(params, x, cot)
  assert logits.shape == (2, 10) and np.isfinite(dx).all() and np.abs(dx).max() > 0
  assert [MODEL.block_dilations(s) for s in range(2)] == [[1, 2], [1, 1]]
  shapes = jax.eval_shape(lambda p, x: MODEL.apply({"params": p}, x)[1], params, x)
  assert [shapes[f"stage_{s}"].shape for s in range(2)] == [(2, 8, 8, 16), (2, 4, 4, 32)]
  flat = common.flatten(common.to_numpy(grads))
  assert all(np.isfinite(g).all() for g in flat.values())
  assert all(np.abs(g).max() > 0 for g in flat.values()), [k for k, g in flat.items()
                                                          if not np.abs(g).any()]
  half = tiny("bfloat16")
  low = jax.jit(lambda p, x: half.apply({"params": p}, x)[0])(params, x)
  assert low.dtype == jnp.float32 and np.isfinite(low).all()
  np.testing.assert_allclose(low, logits, atol=0.05 * float(np.abs(logits).max()))


def test_dinat_with_dilation_one_is_nat():
  one_stage = dict(depths=(2,), num_heads=(1,))  # grid 8: DiNAT dilates block 1 by 2
  dinat, nat = tiny(**one_stage), tiny(name="nat", **one_stage)
  undilated = tiny(dilations=((1, 1),), **one_stage)
  params, x = random_params(dinat, seed=2), images(1)
  def forward(model):
    return np.asarray(jax.jit(lambda p: model.apply({"params": p}, x)[0])(params))
  ref = forward(nat)
  np.testing.assert_array_equal(forward(undilated), ref)
  assert np.abs(forward(dinat) - ref).max() > 1e-4  # the dilated block does change the output


@pytest.mark.parametrize("override,message", [
    (dict(tokens={"name": "evit", "keep_rate": 0.7}),
     "DiNAT takes no token reducer (tokens='evit'): its neighbourhood attention needs the full "
     "grid; valid: tokens=None or 'none'"),
    (dict(name="nat", scan=True), "NAT cannot scan its blocks"),
    (dict(variant="XL"), "unknown DiNAT variant 'XL'; valid: M, T, S, B, L"),
    (dict(name="nat", variant="L"), "unknown NAT variant 'L'; valid: M, T, S, B"),
    (dict(num_heads=(1,)), "must name the same number"),
    (dict(num_heads=(1, 3)), "stage 1 has width 32, not divisible by its num_heads 3"),
    (dict(embed_dim=15, num_heads=(1, 1)), "embed_dim 15 is odd"),
    (dict(dilations=((1, 2), (1,))), "dilations give [2, 1] blocks per stage for depths (2, 2)"),
    (dict(dilations=((1, 3), (1, 1))),
     "stage 0's grid 8x8 (image (32, 32)) is smaller than kernel x dilation = 9; use a larger "
     "image, a smaller kernel_size or dilation"),
    (dict(kernel_size=5), "stage 1's grid 4x4"),
    (dict(kernel_size=2), "kernel_size 2; neighbourhood attention needs an odd kernel_size >= 1"),
])
def test_config_errors(override, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    tiny(**override)


def test_layer_ids_and_no_decay_on_tables():
  model = tiny()
  shapes = common.abstract_params(model)
  ids = {k: model.layer_id(k) for k in common.flatten(shapes)}
  assert ids["embedding_conv_0/kernel"] == ids["embedding_norm/scale"] == 0
  assert ids["stage_0/block_1/attn/rpb"] == 2
  assert ids["merge_1/reduction/kernel"] == ids["stage_1/block_0/norm1/scale"] == 3
  assert ids["norm/scale"] == ids["head/kernel"] == model.depth + 1 == 5
  scales = common.flatten(recipe.layer_scales(shapes, 0.5, model.depth, model.layer_id))
  assert float(scales["stage_0/block_0/attn/qkv/kernel"]) == 0.5 ** 4
  mask = common.flatten(optim.decay_mask(shapes))
  assert not mask["stage_0/block_1/attn/rpb"] and not mask["stage_0/block_1/ls1/gamma"]
  assert mask["stage_0/block_1/attn/qkv/kernel"] and mask["merge_1/reduction/kernel"]


# ------------------------------------------------------------------ parity with the official code
TORCH_SCRIPT = """
    import types
    kwargs, official_dir, size, out = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), \
        sys.argv[4]

    def window(length, kernel, dilation):
        # per query: the kernel keys of its dilation group, the window shifted inward at the
        # borders, and each key's bias row (key - query) / dilation + kernel - 1
        keys, rows = [], []
        for i in range(length):
            group = list(range(i % dilation, length, dilation))
            at = group.index(i)
            start = min(max(at - kernel // 2, 0), len(group) - kernel)
            keys.append([group[start + t] for t in range(kernel)])
            rows.append([start + t - at + kernel - 1 for t in range(kernel)])
        return torch.tensor(keys), torch.tensor(rows)

    class NeighborhoodAttention2D(torch.nn.Module):
        # natten's module by its definition (gathered neighbours) for grids >= kernel x dilation
        def __init__(self, dim, kernel_size, num_heads, dilation=None, qkv_bias=True,
                     qk_scale=None, attn_drop=0.0, proj_drop=0.0, rel_pos_bias=True):
            super().__init__()
            self.heads, self.kernel, self.dilation = num_heads, kernel_size, dilation or 1
            self.scale = qk_scale or (dim // num_heads) ** -0.5
            self.qkv = torch.nn.Linear(dim, 3 * dim, bias=qkv_bias)
            self.rpb = torch.nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1,
                                                      2 * kernel_size - 1))
            self.proj = torch.nn.Linear(dim, dim)

        def forward(self, x):
            b, h, w, c = x.shape
            k = self.kernel
            assert min(h, w) >= k * self.dilation
            qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, c // self.heads)
            q, key, v = qkv.permute(2, 0, 3, 1, 4)
            rk, ro = window(h, k, self.dilation)
            ck, co = window(w, k, self.dilation)
            idx = (rk[:, None, :, None] * w + ck[None, :, None, :]).reshape(h * w, k * k)
            rows = ro[:, None, :, None].expand(h, w, k, k).reshape(h * w, k * k)
            cols = co[None, :, None, :].expand(h, w, k, k).reshape(h * w, k * k)
            logits = torch.einsum("bnpd,bnpkd->bnpk", q * self.scale, key[:, :, idx])
            weights = (logits + self.rpb[:, rows, cols]).softmax(-1)
            y = torch.einsum("bnpk,bnpkd->bnpd", weights, v[:, :, idx])
            return self.proj(y.transpose(1, 2).reshape(b, h, w, c))

    natten = types.ModuleType("natten")
    natten.NeighborhoodAttention2D, natten.context = NeighborhoodAttention2D, None
    sys.modules["natten"] = natten
    sys.path.insert(0, official_dir)
    import nat
    torch.manual_seed(0)
    model = nat.NAT(**kwargs).eval()
    perturb(model)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("gamma1", "gamma2")):
                p.copy_(0.5 + 0.1 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              f"{out}/official.safetensors")
    x = torch.randn(2, 3, size, size, requires_grad=True)
    logits = model(x)
    cot = torch.randn_like(logits)
    (logits * cot).sum().backward()
    save_file({k: p.grad.contiguous() for k, p in model.named_parameters()},
              f"{out}/grads.safetensors")
    nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()
    np.savez(f"{out}/ref.npz", x=nhwc(x), logits=logits.detach().numpy(), cot=cot.numpy(),
             dx=nhwc(x.grad))
"""


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  """The official NAT's perturbed weights, logits and gradients on the tiny configuration."""
  if not timm_reference.available():
    pytest.skip(timm_reference.SKIP_REASON)
  if not OFFICIAL_DIR or not os.path.exists(os.path.join(OFFICIAL_DIR, "nat.py")):
    pytest.skip("set VITJAX_NAT_OFFICIAL to the official repository's classification/ folder")
  out = tmp_path_factory.mktemp("official_nat")
  timm_reference.run(TORCH_SCRIPT, json.dumps(OFFICIAL_KWARGS), OFFICIAL_DIR, str(SIZE), str(out))
  return str(out)


def read(path):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return load_file(path)


def test_logits_and_gradients_match_the_official_code(official):
  ref = np.load(os.path.join(official, "ref.npz"))
  params = common.unflatten(from_official(read(os.path.join(official, "official.safetensors"))))
  logits, (grads, dx) = logits_and_grads(params, ref["x"], ref["cot"])
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(dx), ref["dx"], atol=1e-5, rtol=1e-3)
  theirs = from_official(read(os.path.join(official, "grads.safetensors")))
  ours = common.flatten(common.to_numpy(grads))
  assert set(ours) == set(theirs)
  for k, g in ours.items():
    np.testing.assert_allclose(g, theirs[k], atol=1e-4 * max(1.0, np.abs(theirs[k]).max()),
                               rtol=1e-3, err_msg=k)


# ------------------------------------------------------------------ training, sharded
def test_train_step_on_eight_devices(data_dir):
  """Two FSDP-sharded steps of a one-block DiNAT (dilation 2, drop path, layer-wise lr decay) on
  8 CPU devices: finite, every parameter moves, some are sharded."""
  from sharded_steps import fsdp_steps  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == 8
  # 24 px: a 6x6 grid after the tokenizer, two dilation groups of 3 per axis
  losses, metrics, before, after, shardings = fsdp_steps(
      data_dir, dict(name="dinat", embed_dim=16, depths=(1,), num_heads=(1,), kernel_size=3,
                     dilations=((2,),), mlp_ratio=2.0, drop_path=0.1),
      pp="resize(24)|value_range(-1, 1)")
  assert np.isfinite(losses).all() and float(metrics["train/nonfinite"]) == 0.0
  still = [k for k, v in before.items() if np.array_equal(after[k], v)]
  assert not still, still
  assert any("fsdp" in tuple(s.spec) for s in jax.tree_util.tree_leaves(shardings.params))
