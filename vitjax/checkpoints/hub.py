"""Pretrained files from the Hugging Face Hub, or from a local path when there is no network.

  path, origin = hub.fetch("timm/deit_small_patch16_224.fb_in1k", local=os.environ.get("W"))
  if path is not None:
    model, params = checkpoints.load_model(path)

A local file wins when one is given (and must exist); else the hub is asked through
`huggingface_hub` (cached in its usual place). Offline, without `huggingface_hub`, or with the
repository unreachable, `fetch` returns `(None, why)`: the caller decides what to use instead and
can say which weights it used. Whatever the origin, the file is then read by the same loader.
"""
import os
from typing import Optional, Tuple

DEIT_SMALL = "timm/deit_small_patch16_224.fb_in1k"


def fetch(repo_id: str, filename: str = "model.safetensors", *,
          local: Optional[str] = None) -> Tuple[Optional[str], str]:
  """(path or None, a sentence saying where the file came from or why there is none)."""
  if local:
    if not os.path.isfile(local):
      raise FileNotFoundError(f"no file at {local!r}; pass the path of a timm .safetensors/.pth "
                              "or big_vision .npz file, or no path to use the hub")
    return local, f"the local file {local}"
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None, "huggingface_hub is not installed (pip install huggingface_hub)"
  try:
    path = huggingface_hub.hf_hub_download(repo_id, filename)
  except Exception as e:  # pylint: disable=broad-except  # offline, no such repo, no network
    return None, f"the hub could not give {repo_id}/{filename} ({type(e).__name__})"
  return path, f"{repo_id}/{filename} from the Hugging Face Hub"
