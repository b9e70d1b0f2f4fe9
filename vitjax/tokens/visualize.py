"""Which patches were kept, fused, merged or pruned at each reduction stage (EViT paper figure).

Build the model with `track_source=True`: every reducer's output state is then in
out["token_state_{block}"] and its `source` [B, N, N0] says which input tokens each token holds.
Per patch and stage: kept (a token of its own), merged (shares a token with other patches),
fused (in the EViT fused token, `fused_index`, usually -1) or pruned (in no token). Pruned patches
are greyed out, fused ones tinted red, merged ones tinted by a colour per merged token.
"""
import numpy as np

KEPT, MERGED, FUSED, PRUNED = 0, 1, 2, 3


def stage_sources(out: dict, index: int = 0) -> list:
  """[(block, source [N, N0])] of every recorded reduction, in block order, for one image."""
  blocks = sorted(int(k.rsplit("_", 1)[1]) for k in out
                  if k.startswith("token_state_") and k.rsplit("_", 1)[1].isdigit())
  stages = []
  for b in blocks:
    source = out[f"token_state_{b}"].source
    if source is None:
      raise ValueError("the model was built without track_source=True: no source maps to draw")
    source = np.asarray(source[index])
    valid = out[f"token_state_{b}"].valid
    if valid is not None:  # padded slots (ATS) hold no patch
      source = source * np.asarray(valid[index])[:, None]
    stages.append((b, source))
  return stages


def patch_status(source: np.ndarray, num_prefix: int, fused_index=None):
  """-> (status [P], group [P]): each patch's category and the token that holds it (-1: none)."""
  source = np.asarray(source)[:, num_prefix:] > 0     # [N, P] over the image patches
  holder = np.where(source.any(0), source.argmax(0), -1)
  members = source.sum(1)                             # patches per token
  status = np.full(source.shape[1], PRUNED)
  held = holder >= 0
  status[held] = np.where(members[holder[held]] > 1, MERGED, KEPT)
  if fused_index is not None:
    fused = fused_index % source.shape[0]
    status[holder == fused] = FUSED
  return status, holder


def render(image: np.ndarray, status: np.ndarray, holder: np.ndarray, patch_size: int,
           grid: tuple, seed: int = 0) -> np.ndarray:
  """[H, W, 3] float image in [0, 1] with the stage's decisions painted on it."""
  img = np.asarray(image, np.float32)
  if img.max() > 1.0:
    img = img / 255.0
  img = img[..., :3].copy()
  colours = np.random.default_rng(seed).uniform(0.2, 1.0, (int(holder.max()) + 2, 3))
  for p, (s, h) in enumerate(zip(status, holder)):
    r, c = divmod(p, grid[1])
    tile = img[r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size]
    if s == PRUNED:
      tile[...] = 0.5 + 0.1 * tile.mean(-1, keepdims=True)
    elif s == FUSED:
      tile[...] = 0.5 * tile + 0.5 * np.array([1.0, 0.3, 0.3])
    elif s == MERGED:
      tile[...] = 0.65 * tile + 0.35 * colours[h]
  return np.clip(img, 0.0, 1.0)


def figure(image: np.ndarray, stages: list, patch_size: int, *, num_prefix: int = 1,
           fused_index=None, title: str = ""):
  """A matplotlib Figure: the input, then one panel per (block, source) stage (shown inline in a
  notebook; `plot_stages` saves it instead)."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  h, w = np.asarray(image).shape[:2]
  grid = (h // patch_size, w // patch_size)
  fig, axes = plt.subplots(1, len(stages) + 1, figsize=(2.6 * (len(stages) + 1), 2.9))
  axes = np.atleast_1d(axes)
  base = np.asarray(image, np.float32)
  axes[0].imshow(base / 255.0 if base.max() > 1 else base)
  axes[0].set_title("input")
  for ax, (block, source) in zip(axes[1:], stages):
    status, holder = patch_status(source, num_prefix, fused_index)
    ax.imshow(render(image, status, holder, patch_size, grid))
    n_tok = int((np.asarray(source)[num_prefix:].sum(1) > 0).sum())
    ax.set_title(f"after block {block + 1}: {n_tok} tokens", fontsize=9)
  for ax in axes:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot_stages(image: np.ndarray, stages: list, patch_size: int, path: str, *,
                num_prefix: int = 1, fused_index=None, title: str = ""):
  """Saves `figure(...)` as a PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig = figure(image, stages, patch_size, num_prefix=num_prefix, fused_index=fused_index,
               title=title)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
