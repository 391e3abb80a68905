"""Pictures of what a DropPos checkpoint predicts.

One row per image: the input; the visible patches (kept-PE ones outlined in
blue); the PE-dropped patches at their true positions; the image as the model
puts it back together (kept-PE patches where they are, the PE-dropped ones
pasted at their predicted (argmax) positions, outlined green where right and
red where wrong); and the attentive weights of the full pass (the softmax of
cos(cls, patch) / tau over all patches) as a heat-map. A strip below the rows
holds the legend of the outlines and the heat-map's colour bar; the title says
which checkpoint, step and images, never a machine path.
"""
from __future__ import annotations

import collections
import functools
import io
import json
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from etils import epath
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from droppos_jax import losses, masking, sharding
from droppos_jax.configs import common
from droppos_jax.data import device, sources
from droppos_jax.errors import UserError, writing
from droppos_jax.models import droppos as droppos_model
from droppos_jax.models import weights

COLUMNS = ('input', 'visible patches\n(the encoder input)',
           'PE-dropped patches\nat their true positions',
           'reassembled: PE-dropped\npatches where predicted',
           'attentive weights\nover the input')
BLANK = (0.80, 0.86, 0.94)  # canvas: a blue-grey rare in photos
KEPT, RIGHT, WRONG = 'tab:blue', 'lime', 'red'
# Fixed strips (inches) above the rows (title, column names) and below them
# (legend, colour bar), so a figure is B * panel + TOP + BOTTOM inches high.
TOP_INCHES, BOTTOM_INCHES = 0.85, 0.8
ROW_GAP_INCHES = 0.2   # under each row: the 'k/m right' line
LEGEND_COLUMN_INCHES = 2.1
SHORT_KIND = {'droppos': 'DropPos', 'classifier': 'fine-tuned',
              'linear_probe': 'linear-probed', 'encoder': 'ViT encoder'}


def load_droppos(path: str):
  """(model, weights, objective) of a DropPos checkpoint: a pre-training
  workdir or step folder, or a DropPos weights file (weights.read).

  `objective` holds the run's `masking` block and `tau` from its
  config.json when present, else the paper's (configs/common.py).
  """
  w = weights.read(path, what='init.path')
  if w.kind != 'droppos':
    raise UserError(
        f'init.path: {w.description} has no DropPos projector (the position '
        'head these pictures show); pass a DropPos pre-training workdir, one '
        'of its step folders or a DropPos weights file.')
  w.check_fixed_pe()
  if w.image_hw is None:
    raise UserError(f'init.path: {w.source} does not tell its image size.')
  # Pictures need no speed: float32 whatever the run computed in.
  model = w.droppos()
  paper = common.base_pretrain_config()
  saved = run_config(w)
  # Runs from before the `masking` block kept its ratios in `objective`.
  saved_masking = saved.get('masking') or saved.get('objective', {})
  mask = {k: saved_masking.get(k, v) for k, v in paper.masking.items()}
  tau = saved.get('objective', {}).get('tau', paper.objective.tau)
  return model, w, {'masking': mask, 'tau': tau}


def run_config(w: weights.Weights) -> dict[str, Any]:
  """The config.json of the run `w` was read from; {} for files."""
  config_file = w.workdir / 'config.json' if w.workdir else None
  if config_file is None or not config_file.exists():
    return {}
  return json.loads(config_file.read_text())


# ----------------------------------------------------------------- titles ---

def weights_label(w: weights.Weights, path: str) -> str:
  """"DropPos nano/8 'demo', step 6400": kind, size, the run folder's (or
  file's) name and the step; the name only, never the full path."""
  a = w.arch
  size = a.variant or (f'ViT (width {a.width}, depth {a.depth}, '
                       f'patch {a.patch_size})')
  place = w.workdir or epath.Path(path)
  name = place.name or place.absolute().name  # '.' has no name of its own
  step = '' if w.step is None else f', step {w.step}'
  return f"{SHORT_KIND.get(w.kind, w.kind)} {size} '{name}'{step}"


def data_label(data_cfg: Mapping[str, Any],
               pretrained_on: Optional[Mapping[str, Any]] = None) -> str:
  """'demo val crops', 'imagenet2012 validation', "folder 'photos'": which
  images (the folder's name only). With the run's pre-training data config,
  adds whether these images were among the pre-training ones."""
  source, split = data_cfg.get('source'), data_cfg.get('split')
  if source == 'demo':
    seed = data_cfg.get('seed') or 0
    label = f'demo {split or "train"} crops' + (f', crop seed {seed}'
                                                if seed else '')
  elif source == 'folder':
    label = f"folder '{epath.Path(data_cfg.get('path') or '').name}'"
  elif source == 'tfds':
    label = f'{data_cfg.get("name")} {split}'
  else:
    label = str(source)
  return label + _seen(data_cfg, pretrained_on)


def make_title(w: weights.Weights, path: str, data_cfg, *, right: int,
               dropped: int, num_positions: int) -> str:
  """The pictures' title: which checkpoint and step, which images, and how
  many PE-dropped patches were placed right against chance (1 / positions)."""
  shown = data_label(data_cfg, run_config(w).get('data'))
  return (f'{weights_label(w, path)} - {shown}\n'
          f'{100 * right / dropped:.0f} % of PE-dropped patches placed right '
          f'({right} of {dropped}; chance {100 / num_positions:.1f} %)')


def _seen(data_cfg, pretrained_on) -> str:
  """' (never seen in pre-training)' for another split of the pre-training
  source (the demo's splits are pixel-disjoint, TFDS's sample-disjoint);
  ' (the pre-training split)' for its own; '' when it cannot tell."""
  if not pretrained_on:
    return ''
  same = lambda key: data_cfg.get(key) == pretrained_on.get(key)
  if not all(same(key) for key in ('source', 'name', 'path')):
    return ''
  split = lambda cfg: cfg.get('split') or 'train'
  if data_cfg.get('source') != 'folder' and (split(data_cfg) !=
                                            split(pretrained_on)):
    return ' (never seen in pre-training)'
  return ' (the pre-training split)'


# ---------------------------------------------------------------- drawing ---

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
  with writing(path):
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


def _mark_pileups(ax, pred, drop, grid_w, p, cell_points):
  """'×k' on cells where k > 1 PE-dropped patches were placed: only the last
  pasted one shows."""
  size = min(8., 0.45 * cell_points)
  if size < 4:  # too small to read
    return
  for dst, k in collections.Counter(pred[drop].tolist()).items():
    if k > 1:
      r, c = divmod(int(dst), grid_w)
      ax.text(c * p + .5, r * p + .5, f'×{k}', fontsize=size, ha='left',
              va='top', color='w', fontweight='bold',
              bbox=dict(boxstyle='square,pad=0.1', fc='k', ec='none',
                        alpha=0.6))


def _legend(fig: Figure, height: float, ncol: int) -> None:
  """The outline colours and fills, in the bottom strip's left part."""
  box = lambda **kw: Patch(linewidth=1.5, **kw)
  entries = [
      (box(fc='0.55', ec='none'), 'visible, PE dropped (to be placed)'),
      (box(fc='none', ec=KEPT), 'visible, PE kept'),
      (box(fc=BLANK, ec='0.6'), 'masked: the encoder never sees it'),
      (box(fc='none', ec=RIGHT), 'placed at its true position'),
      (box(fc='none', ec=WRONG), 'placed wrong'),
      (Line2D([], [], ls='', marker='$×2$', ms=12, color='k'),
       'two patches placed on one cell')]
  fig.legend(*zip(*entries), loc='upper left', ncol=ncol, fontsize=7,
             frameon=False, bbox_to_anchor=(0.01, BOTTOM_INCHES / height),
             title='PE = position embedding', title_fontsize=7,
             alignment='left', handlelength=1.4, columnspacing=1.,
             borderaxespad=0.2)


def _colorbar(fig: Figure, mappable, num_patches: int, width: float,
              height: float, panel: float) -> None:
  """A horizontal colour bar under the last column, uniform 1/N marked."""
  cax = fig.add_axes([1 - (panel * 0.95) / width, 0.5 * BOTTOM_INCHES / height,
                      0.9 * panel / width, 0.1 / height])
  bar = fig.colorbar(mappable, cax=cax, orientation='horizontal')
  uniform = 1. / num_patches
  cax.axvline(uniform, color='c', linewidth=1.5)
  bar.ax.tick_params(labelsize=6)
  cax.set_title(f'attentive weight\n(sums to 1 over {num_patches} patches;\n'
                f'cyan: uniform 1/{num_patches} = {uniform:.2g})', fontsize=7,
                linespacing=1.1)


def _row(row, image, ids_keep, drop_mask, predicted, attention, *, vmax: float,
         p: int, cell_points: float):
  """Draws one image's panels on the axes `row`; returns the heat-map."""
  height, width, _ = image.shape
  gw = width // p
  # Right guesses last, so that they stay visible where guesses collide.
  order = np.argsort(np.asarray(predicted) == np.asarray(ids_keep),
                     kind='stable')
  ids, drop, pred = (np.asarray(a)[order]
                     for a in (ids_keep, drop_mask, predicted))
  drop = drop.astype(bool)
  visible, truth, guess = (np.broadcast_to(np.asarray(BLANK, image.dtype),
                                           image.shape).copy()
                           for _ in range(3))
  for src, dropped in zip(ids, drop):  # The anchors first: they stay put.
    _paste(visible, image, src, src, gw, p)
    if not dropped:
      _paste(guess, image, src, src, gw, p)
  for src, dropped, dst in zip(ids, drop, pred):
    if dropped:
      _paste(truth, image, src, src, gw, p)
      _paste(guess, image, src, dst, gw, p)
  for ax, picture in zip(row, (image, visible, truth, guess, image)):
    ax.imshow(picture, interpolation='nearest')
    ax.set_xticks([])
    ax.set_yticks([])
  for src, dropped, dst in zip(ids, drop, pred):
    if not dropped:
      _outline(row[1], src, gw, p, KEPT)
      if src not in pred[drop]:  # an anchor no guess covered
        _outline(row[3], src, gw, p, KEPT)
    else:
      _outline(row[3], dst, gw, p, RIGHT if dst == src else WRONG)
  _mark_pileups(row[3], pred, drop, gw, p, cell_points)
  right = int(((pred == ids) & drop).sum())
  row[3].set_xlabel(f'{right}/{int(drop.sum())} placed right', fontsize=8)
  return row[4].imshow(attention, cmap='inferno', alpha=0.65, vmin=0.,
                       vmax=vmax, extent=(-.5, width - .5, height - .5, -.5),
                       interpolation='nearest')


def figure(images_rgb, ids_keep, drop_mask, predicted, attention, *,
           patch_size: int, panel_inches: float = 2., dpi: int = 100,
           title: Optional[str] = None) -> Figure:
  """The picture grid (see the module docstring): len(COLUMNS) * panel_inches
  wide, B * panel_inches + TOP_INCHES + BOTTOM_INCHES high.

  images_rgb [B, H, W, 3] in [0, 1]; ids_keep, drop_mask, predicted
  (argmax positions) [B, K]; attention [B, N]. The attentive weights of all
  rows share one colour scale, 0 to their maximum.
  """
  images_rgb = np.asarray(images_rgb)
  attention = np.asarray(attention)
  b, height, width, _ = images_rgb.shape
  p = patch_size
  gh, gw = height // p, width // p
  fig_w = len(COLUMNS) * panel_inches
  fig_h = b * panel_inches + TOP_INCHES + BOTTOM_INCHES
  fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
  fig.subplots_adjust(
      left=0.01, right=0.99, bottom=(BOTTOM_INCHES + ROW_GAP_INCHES) / fig_h,
      top=1. - TOP_INCHES / fig_h, wspace=0.04,
      hspace=ROW_GAP_INCHES / (panel_inches - ROW_GAP_INCHES))
  if title:
    fig.suptitle(title, fontsize=9, y=1. - 0.06 / fig_h, va='top')
  axes = fig.subplots(b, len(COLUMNS), squeeze=False)
  for ax, name in zip(axes[0], COLUMNS):
    ax.set_title(name, fontsize=8)
  cell_points = 72. * panel_inches / max(gh, gw)
  for i in range(b):
    heat = _row(axes[i], images_rgb[i], ids_keep[i], drop_mask[i],
                predicted[i], attention[i].reshape(gh, gw),
                vmax=float(attention.max()), p=p, cell_points=cell_points)
  # As many legend columns as fit left of the colour bar, 2 to 3.
  ncol = int(np.clip((fig_w - panel_inches) // LEGEND_COLUMN_INCHES, 2, 3))
  _legend(fig, fig_h, ncol=ncol)
  _colorbar(fig, heat, gh * gw, fig_w, fig_h, panel_inches)
  return fig


def render(images_rgb, ids_keep, drop_mask, predicted, attention, *,
           patch_size: int, path: str, panel_inches: float = 2.,
           dpi: int = 100, title: Optional[str] = None) -> str:
  """Writes `figure(...)` as a PNG of len(COLUMNS) * panel_inches * dpi by
  (B * panel_inches + TOP_INCHES + BOTTOM_INCHES) * dpi pixels."""
  fig = figure(images_rgb, ids_keep, drop_mask, predicted, attention,
               patch_size=patch_size, panel_inches=panel_inches, dpi=dpi,
               title=title)
  save_figure(fig, path, dpi=dpi)
  return path


def visualize_checkpoint(path: str, output: str, *, data_cfg, num_images: int,
                         seed: int = 0,
                         masking_cfg: Optional[Mapping[str, Any]] = None,
                         **render_kwargs: Any) -> dict[str, Any]:
  """Renders `num_images` images of `data_cfg` through the checkpoint at
  `path` (masks from key(seed); `masking_cfg` fields that are not None
  replace the run's); returns {'path', 'acc', 'step', 'data' (which images),
  'title'}."""
  model, w, objective = load_droppos(path)
  mask = masking.Masking(**{**objective['masking'], **{
      k: v for k, v in (masking_cfg or {}).items() if v is not None}})
  hw = w.image_hw
  batch = next(device.eval_batches(
      sources.open_source(data_cfg), image_hw=hw, batch_size=num_images,
      num_examples=num_images, mesh=sharding.make_mesh(num_devices=1)))
  n = model.encoder.patch_size
  grid = (hw[0] // n, hw[1] // n)
  ids_keep, drop_mask = jax.jit(mask.sample, static_argnums=(1, 2))(
      jax.random.key(seed), num_images, grid)
  logits, attention = jax.jit(functools.partial(
      predict, model, tau=objective['tau']))(w.params, batch['image'],
                                             ids_keep, drop_mask)
  predicted = np.asarray(jnp.argmax(logits, axis=-1))
  drop = np.asarray(drop_mask)
  right = int(((predicted == np.asarray(ids_keep)) & drop).sum())
  acc = right / float(drop.sum())
  text = make_title(w, path, data_cfg, right=right, dropped=int(drop.sum()),
               num_positions=grid[0] * grid[1])
  render(denormalize(batch['image']), ids_keep, drop_mask, predicted, attention,
         patch_size=n, path=output, title=text, **render_kwargs)
  return {'path': output, 'acc': acc, 'step': w.step,
          'data': data_label(data_cfg), 'title': text}
