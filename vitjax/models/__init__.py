"""Backbones. `build(model_cfg, num_classes=..., image_size=...)` turns a config into a module."""
import dataclasses

import jax.numpy as jnp

from vitjax.models import convit, cvt, davit, gcvit, maxvit, mvitv2, nat, pvt_v2, swin, twins
from vitjax.models.convit import ConViT
from vitjax.models.cvt import CvT
from vitjax.models.davit import DaViT
from vitjax.models.gcvit import GCViT
from vitjax.models.maxvit import MaxViT
from vitjax.models.mvitv2 import MViTv2
from vitjax.models.nat import NAT, DiNAT
from vitjax.models.pvt_v2 import PVTv2
from vitjax.models.swin import Swin
from vitjax.models.twins import Twins
from vitjax.models.vit import VARIANTS, ViT, decode_variant, resample_posemb, sincos2d  # noqa: F401

MODELS = {"vit": ViT, "swin": Swin, "pvt_v2": PVTv2, "twins": Twins, "davit": DaViT, "nat": NAT,
          "dinat": DiNAT, "convit": ConViT, "mvitv2": MViTv2, "maxvit": MaxViT,
          "gcvit": GCViT, "cvt": CvT}
# How each family reads its variant string ("S/16" for the ViT, "T" for Swin, "b0" for PVTv2).
VARIANT_DECODERS = {"vit": decode_variant, "swin": swin.decode_variant,
                    "pvt_v2": pvt_v2.decode_variant, "twins": twins.decode_variant,
                    "davit": davit.decode_variant, "nat": nat.decode_variant,
                    "dinat": nat.decode_dinat_variant, "convit": convit.decode_variant,
                    "mvitv2": mvitv2.decode_variant, "maxvit": maxvit.decode_variant,
                    "gcvit": gcvit.decode_variant, "cvt": cvt.decode_variant}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build(model_cfg, *, num_classes: int, image_size, dtype: str = "float32"):
  """Builds a backbone from `config.model`; validates it now rather than at trace time.

  model_cfg fields: name (a key of MODELS, default "vit"), variant, and any field of that
  family's module as an override. Variants per name:
    vit      "Ti/16", "S/16", ... (name/patch; width, depth, mlp_dim, num_heads, pool, attention,
             tokens, ...)
    swin     "T", "S", "B", "L"              pvt_v2   "b0", "b1", "b2", "b2_li"
    twins    "svt_s", "svt_b", "svt_l", "pcpvt_s", "pcpvt_b", "pcpvt_l"
    davit    "T", "S", "B"                   nat      "M", "T", "S", "B" (dinat also "L")
    convit   "Ti", "S", "B"                  mvitv2   "T", "S", "B"
    maxvit   "T", "S", "B"                   gcvit    "XXT", "XT", "T", "S", "B"
    cvt      "13", "21", "W24"
  """
  cfg = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
  name = cfg.pop("name", "vit")
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
  cls = MODELS[name]
  kwargs = VARIANT_DECODERS[name](cfg.pop("variant")) if cfg.get("variant") else {}
  cfg.pop("variant", None)
  kwargs.update({k: v for k, v in cfg.items() if v is not None or k == "tokens"})
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = set(kwargs) - fields
  if unknown:
    raise ValueError(f"unknown model option(s) {sorted(unknown)}; valid: {sorted(fields)}")
  if dtype not in DTYPES:
    raise ValueError(f"unknown compute dtype {dtype!r}; valid: {', '.join(DTYPES)}")
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  model = cls(num_classes=num_classes, image_size=tuple(image_size), dtype=DTYPES[dtype], **kwargs)
  model.validate()
  return model


def num_params(params) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
