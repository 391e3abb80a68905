"""Pictures of what a DropPos checkpoint predicts.

One row per image: the input; the visible patches (kept-PE ones outlined in
blue); the PE-dropped patches at their true positions; the same patches pasted
at their predicted (argmax) positions, outlined green where right and red
where wrong; and the attentive weights of the full pass (the softmax of
cos(cls, patch) / tau over all patches) as a heat-map.
"""
from __future__ import annotations

import functools
import io
import json
from typing import Any, Optional

import jax
import jax.numpy as jnp
from etils import epath
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from droppos_jax import losses, masking, sharding
from droppos_jax.data import device, sources
from droppos_jax.errors import UserError
from droppos_jax.models import droppos as droppos_model
from droppos_jax.models import weights

COLUMNS = ('input', 'visible patches', 'dropped-PE: true', 'predicted',
           'attentive weights')
BLANK = (0.80, 0.86, 0.94)  # canvas: a blue-grey rare in photos


def load_droppos(path: str):
  """(model, weights, objective) of a DropPos checkpoint: a pre-training
  workdir or step folder, or a DropPos weights file (weights.read).

  `objective` holds mask_ratio, pos_drop_ratio and tau from the run's
  config.json when present, else the paper's defaults.
  """
  w = weights.read(path, what='checkpoint')
  if w.kind != 'droppos':
    raise UserError(
        f'checkpoint: {w.description} has no DropPos projector (the position '
        'head these pictures show); pass a DropPos pre-training workdir, one '
        'of its step folders or a DropPos weights file.')
  w.check_fixed_pe()
  if w.image_hw is None:
    raise UserError(f'checkpoint: {w.source} does not tell its image size.')
  # Pictures need no speed: float32 whatever the run computed in.
  model = w.droppos()
  objective = {'mask_ratio': 0.75, 'pos_drop_ratio': 0.75, 'tau': 0.1}
  config_file = w.workdir / 'config.json' if w.workdir else None
  if config_file is not None and config_file.exists():
    saved = json.loads(config_file.read_text()).get('objective', {})
    objective.update({k: saved[k] for k in objective if k in saved})
  return model, w, objective


def predict(model: droppos_model.DropPos, params, images, ids_keep, drop_mask,
            tau: float):
  """(position logits [B, K, N], attentive weights [B, N]) for given masks."""
  logits = model.apply({'params': params}, images, ids_keep, drop_mask,
                       train=False)['logits']
  cls, patches = model.apply({'params': params}, images,
                             method=droppos_model.DropPos.full_features)
  return logits, losses.attentive_weights(cls, patches, tau)


def save_figure(fig: Figure, path, **kwargs: Any) -> None:
  """Writes `fig` as a PNG to `path` (local or gs://), making its folder."""
  png = io.BytesIO()
  fig.savefig(png, format='png', **kwargs)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(png.getvalue())


def denormalize(images) -> np.ndarray:
  """Normalised model inputs -> RGB in [0, 1] for display."""
  rgb = (np.asarray(images) * np.asarray(device.STDDEV_RGB) +
         np.asarray(device.MEAN_RGB)) / 255.
  return np.clip(rgb, 0., 1.)


def _paste(canvas, image, src, dst, grid_w, p):
  sr, sc = divmod(int(src), grid_w)
  dr, dc = divmod(int(dst), grid_w)
  canvas[dr * p:(dr + 1) * p, dc * p:(dc + 1) * p] = (
      image[sr * p:(sr + 1) * p, sc * p:(sc + 1) * p])


def _outline(ax, index, grid_w, p, color):
  r, c = divmod(int(index), grid_w)
  ax.add_patch(Rectangle((c * p - .5, r * p - .5), p, p, fill=False,
                         edgecolor=color, linewidth=1.5))


def render(images_rgb, ids_keep, drop_mask, predicted, attention, *,
           patch_size: int, path: str, panel_inches: float = 2.,
           dpi: int = 100, title: Optional[str] = None) -> str:
  """Writes the picture grid (see the module docstring) as a PNG of
  len(COLUMNS) * panel_inches * dpi by B * panel_inches * dpi pixels.

  images_rgb [B, H, W, 3] in [0, 1]; ids_keep, drop_mask, predicted
  (argmax positions) [B, K]; attention [B, N].
  """
  images_rgb = np.asarray(images_rgb)
  b, height, width, _ = images_rgb.shape
  p = patch_size
  gh, gw = height // p, width // p
  fig_h = b * panel_inches
  fig = Figure(figsize=(len(COLUMNS) * panel_inches, fig_h), dpi=dpi)
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.2 / fig_h,
                      top=1. - (0.6 if title else 0.3) / fig_h, wspace=0.04,
                      hspace=0.2)
  if title:
    fig.suptitle(title, fontsize=9)
  axes = fig.subplots(b, len(COLUMNS), squeeze=False)
  for i in range(b):
    image = images_rgb[i]
    # Right guesses last, so that they stay visible where guesses collide.
    order = np.argsort(np.asarray(predicted[i]) == np.asarray(ids_keep[i]),
                       kind='stable')
    ids, drop, pred = (np.asarray(a[i])[order] for a in (ids_keep, drop_mask,
                                                        predicted))
    visible, truth, guess = (np.broadcast_to(np.asarray(BLANK, image.dtype),
                                             image.shape).copy()
                             for _ in range(3))
    for src, dropped, dst in zip(ids, drop, pred):
      _paste(visible, image, src, src, gw, p)
      if dropped:
        _paste(truth, image, src, src, gw, p)
        _paste(guess, image, src, dst, gw, p)
    right = int(((pred == ids) & drop).sum())
    row = axes[i]
    for ax, picture in zip(row, (image, visible, truth, guess, image)):
      ax.imshow(picture, interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
    for src, dropped, dst in zip(ids, drop, pred):
      if not dropped:
        _outline(row[1], src, gw, p, 'tab:blue')
      else:
        _outline(row[3], dst, gw, p, 'lime' if dst == src else 'red')
    row[4].imshow(np.asarray(attention[i]).reshape(gh, gw), cmap='inferno',
                  alpha=0.65, extent=(-.5, width - .5, height - .5, -.5),
                  interpolation='nearest')
    row[3].set_xlabel(f'{right}/{int(drop.sum())} right', fontsize=8)
    if i == 0:
      for ax, name in zip(row, COLUMNS):
        ax.set_title(name, fontsize=9)
  save_figure(fig, path, dpi=dpi)
  return path


def visualize_checkpoint(path: str, output: str, *, data_cfg, num_images: int,
                         seed: int = 0, mask_ratio: Optional[float] = None,
                         pos_drop_ratio: Optional[float] = None,
                         **render_kwargs: Any) -> dict[str, Any]:
  """Renders `num_images` images of `data_cfg` through the checkpoint at
  `path` (masks from key(seed)); returns {'path', 'acc', 'step'}."""
  model, w, objective = load_droppos(path)
  mask_ratio = objective['mask_ratio'] if mask_ratio is None else mask_ratio
  pos_drop_ratio = (objective['pos_drop_ratio'] if pos_drop_ratio is None
                    else pos_drop_ratio)
  hw = w.image_hw
  batch = next(device.eval_batches(sources.open_source(data_cfg), image_hw=hw, batch_size=num_images,
                            num_examples=num_images,
                            mesh=sharding.make_mesh(num_devices=1)))
  n = model.encoder.patch_size
  grid = (hw[0] // n, hw[1] // n)
  ids_keep, drop_mask = jax.jit(masking.sample_masks, static_argnums=(1, 2, 3, 4))(
      jax.random.key(seed), num_images, grid[0] * grid[1], mask_ratio,
      pos_drop_ratio)
  logits, attention = jax.jit(functools.partial(
      predict, model, tau=objective['tau']))(w.params, batch['image'],
                                             ids_keep, drop_mask)
  predicted = np.asarray(jnp.argmax(logits, axis=-1))
  drop = np.asarray(drop_mask)
  acc = float(((predicted == np.asarray(ids_keep)) & drop).sum() / drop.sum())
  title = (f'DropPos {w.arch.variant or "ViT"}, step {w.step}: '
           f'{100 * acc:.0f}% of PE-dropped patches placed right')
  render(denormalize(batch['image']), ids_keep, drop_mask, predicted, attention,
         patch_size=n, path=output, title=title, **render_kwargs)
  return {'path': output, 'acc': acc, 'step': w.step}
