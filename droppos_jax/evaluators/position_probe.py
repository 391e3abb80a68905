"""Position probing (paper §4.3): how well does a frozen ViT know where its
tokens are once their position embedding is gone?

Mask patches and drop the PE of most visible tokens exactly as DropPos
pre-training does, run the frozen encoder, and train only a linear N-way head
on the final-LN features of the PE-dropped tokens (hard labels, cross
entropy). The score is held-out top-1 position accuracy over dropped tokens,
overall and per grid position.

What replaces a dropped PE: the checkpoint's learned `mask_pos_token` when it
has one (DropPos workdirs and DropPos PyTorch files) and `use_mask_token` is
on; otherwise nothing (the token gets no PE at all). Encoders that never saw a
mask token (MAE, random init) are thus probed on the bare patch embedding.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from matplotlib import ticker
from matplotlib.figure import Figure

from droppos_jax import masking, pictures, settings
from droppos_jax.data import device, sources
from droppos_jax.errors import UserError
from droppos_jax.losses import grid_coords
from droppos_jax.models import vit, weights

OPTIMIZERS = ('adamw', 'sgd')


@dataclasses.dataclass
class FrozenEncoder:
  """A ViT to probe: module, params, the mask token (or None), the
  resolution it was trained at (None if unknown), a description (with the
  path read) and a label for titles (the run's name only, no path)."""
  encoder: vit.VisionTransformer
  params: Any
  mask_pos_token: Optional[jax.Array]
  image_hw: Optional[tuple[int, int]]
  description: str
  label: str


def load_encoder(init: str, *, variant: str = 'nano/8', seed: int = 0,
                 num_heads: Optional[int] = None) -> FrozenEncoder:
  """The encoder named by `init`: '' (a fresh `variant` initialised from
  key(seed)) or anything weights.read takes: a pre-training or fine-tuning
  workdir or step folder, or a DropPos/MAE/timm weights file.

  Tokens are probed after the final norm; a global-pool fine-tuned model has
  none and its fc_norm stands in (weights.Weights.encoder_params). Weights
  with a learned pos_embed are refused.
  """
  if not init:
    encoder = vit.vit_from_variant(variant)
    p = encoder.patch_size
    params = jax.jit(encoder.init)(jax.random.key(seed),
                                   jnp.zeros((1, p, p, 3)))['params']
    name = f'random init {variant} (seed {seed})'
    return FrozenEncoder(encoder, params, None, None, name, name)
  w = weights.read(init, what='init.path', num_heads=num_heads)
  w.check_fixed_pe()
  token = w.mask_pos_token
  return FrozenEncoder(
      w.vit(), jax.tree.map(jnp.asarray, w.encoder_params(final_norm=True)),
      None if token is None else jnp.asarray(token, jnp.float32),
      w.image_hw, w.description, pictures.weights_label(w, init))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sample_and_encode(encoder, mask: masking.Masking, params, token, images,
                       key):
  """Final-LN features [B, K, D] of the visible tokens, PEs dropped as in
  DropPos pre-training (vit.VisionTransformer's one encoder pass); `token`
  None means no PE for dropped tokens. Also returns the masks."""
  grid = vit.grid_size(images.shape[1:3], encoder.patch_size)
  ids_keep, drop_mask = mask.sample(key, images.shape[0], grid)
  out = encoder.apply({'params': params}, images, ids_keep, drop_mask, token)
  return out['patches'].astype(jnp.float32), ids_keep, drop_mask


def extract_dropped_tokens(frozen: FrozenEncoder, batches: Iterable[dict], *,
                           mask: masking.Masking, draws: int, key: jax.Array,
                           use_mask_token: bool = True):
  """(features [M, D], positions [M]) of every PE-dropped token of `draws`
  mask draws per real example (mask 1) of `batches`, on the host.

  Masks of batch b, draw d come from fold_in(key, b * draws + d), so a run is
  reproducible. One jitted forward per (batch, draw), compiled once.
  """
  token = frozen.mask_pos_token if use_mask_token else None
  forward = functools.partial(_sample_and_encode, frozen.encoder, mask)

  feats, labels = [], []
  for b, batch in enumerate(batches):
    valid = multihost_utils.process_allgather(batch['mask'], tiled=True) > 0
    for d in range(draws):
      out = forward(frozen.params, token, batch['image'],
                    jax.random.fold_in(key, b * draws + d))
      f, ids, drop = multihost_utils.process_allgather(out, tiled=True)
      take = drop & valid[:, None]
      feats.append(f[take])
      labels.append(ids[take])
  if not feats:
    raise UserError('The probe data yielded no batch.')
  return np.concatenate(feats), np.concatenate(labels).astype(np.int32)


def check_head(*, optimizer: str, steps: int, batch_size: int, lr: float,
               weight_decay: float = 0.) -> None:
  """The probe head's settings (config `head`), checked before any work."""
  if optimizer not in OPTIMIZERS:
    raise UserError(f'head.optimizer={optimizer!r}; valid: {OPTIMIZERS}.')
  if steps < 1 or batch_size < 1:
    raise UserError(f'head.steps={steps} and head.batch_size={batch_size} '
                    'must be >= 1.')
  if not lr > 0 or weight_decay < 0:
    raise UserError(f'head.lr={lr} must be > 0 and head.weight_decay='
                    f'{weight_decay} >= 0.')


def train_linear_head(features, labels, num_classes: int, *, steps: int,
                      batch_size: int, lr: float, optimizer: str = 'adamw',
                      weight_decay: float = 0., momentum: float = 0.9,
                      seed: int = 0) -> dict[str, jax.Array]:
  """A linear softmax classifier {'kernel' [D, C], 'bias' [C]} fitted by
  mini-batch `optimizer` with a cosine lr, all steps in one jitted scan."""
  check_head(optimizer=optimizer, steps=steps, batch_size=batch_size, lr=lr,
             weight_decay=weight_decay)
  schedule = optax.cosine_decay_schedule(lr, steps)
  tx = (optax.adamw(schedule, weight_decay=weight_decay)
        if optimizer == 'adamw' else optax.chain(
            optax.add_decayed_weights(weight_decay),
            optax.sgd(schedule, momentum=momentum)))
  features = jnp.asarray(features, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  head = {'kernel': jnp.zeros((features.shape[1], num_classes)),
          'bias': jnp.zeros((num_classes,))}

  def loss(head, x, y):
    logits = x @ head['kernel'] + head['bias']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def fit(head, features, labels, key):
    def step(carry, key):
      head, opt_state = carry
      idx = jax.random.randint(key, (batch_size,), 0, features.shape[0])
      grads = jax.grad(loss)(head, features[idx], labels[idx])
      updates, opt_state = tx.update(grads, opt_state, head)
      return (optax.apply_updates(head, updates), opt_state), None
    (head, _), _ = jax.lax.scan(step, (head, tx.init(head)),
                                jax.random.split(key, steps))
    return head

  return fit(head, features, labels, jax.random.key(seed))


def position_accuracy(head, features, labels, grid_hw: Sequence[int]):
  """(top-1 accuracy, per-position accuracy [h, w] (NaN where no token),
  tokens per position [h, w], mean grid distance predicted-true)."""
  n = grid_hw[0] * grid_hw[1]
  pred = np.asarray(jnp.argmax(jnp.asarray(features) @ head['kernel'] +
                               head['bias'], axis=-1))
  correct = pred == labels
  hits = np.bincount(labels, weights=correct, minlength=n)
  counts = np.bincount(labels, minlength=n)
  with np.errstate(invalid='ignore', divide='ignore'):
    per_position = (hits / counts).reshape(grid_hw)
  coords = grid_coords(grid_hw)
  dist = np.linalg.norm(coords[pred] - coords[labels], axis=-1).mean()
  return float(correct.mean()), per_position, counts.reshape(grid_hw), float(dist)


def heatmap_figure(per_position: np.ndarray, title: str) -> Figure:
  """Heat-map of accuracy per grid position (NaN: no token there). The
  colour scale runs from 0 to the best position's accuracy rounded up to 5 %,
  at least twice chance (1 / positions, marked on the colour bar), so that
  low accuracies differ in colour; cells show their % when the grid is small
  enough to read."""
  h, w = per_position.shape
  chance = 1. / per_position.size
  finite = per_position[np.isfinite(per_position)]
  top = max(finite.max() if finite.size else 0., 2 * chance)
  vmax = min(1., np.ceil(top * 20. - 1e-9) / 20.)
  fig = Figure(figsize=(5.2, 4.2 * h / w + 0.8), dpi=100, layout='constrained')
  ax = fig.add_subplot()
  im = ax.imshow(per_position, vmin=0., vmax=vmax, cmap='viridis')
  bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04,
                     format=ticker.PercentFormatter(1., decimals=0))
  bar.ax.axhline(chance, color='r', linewidth=2)
  bar.set_label(f'held-out top-1 accuracy (red: chance {100 * chance:.1f} %)')
  if h * w <= 256:
    digits = 0 if vmax >= 0.2 else 1
    size = float(np.clip(0.3 * 72 * 4.2 / max(h, w), 6, 11))  # ~1/3 of a cell
    for (r, c), v in np.ndenumerate(per_position):
      ax.text(c, r, '-' if np.isnan(v) else f'{100 * v:.{digits}f}',
              ha='center', va='center', fontsize=size,
              color='w' if v < 0.6 * vmax else 'k')
  ax.set_title(title, fontsize=9)
  ax.set_xlabel('patch column')
  ax.set_ylabel('patch row')
  for axis in (ax.xaxis, ax.yaxis):
    axis.set_major_locator(ticker.MaxNLocator(integer=True))
  return fig


def save_heatmap(per_position: np.ndarray, path: str, title: str) -> str:
  """Writes heatmap_figure(per_position, title) as a PNG to `path`."""
  pictures.save_figure(heatmap_figure(per_position, title), path)
  return path


def run_probe(config, workdir: str, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Probes `config.init.path` (configs/position_probe.py fields); writes
  the heat-map position_accuracy.png to `workdir` and returns the results."""
  h = config.head
  check_head(optimizer=h.optimizer, steps=h.steps, batch_size=h.batch_size,
             lr=h.lr, weight_decay=h.weight_decay)
  if config.mask_draws < 1:
    raise UserError(f'mask_draws={config.mask_draws} must be >= 1.')
  frozen = load_encoder(config.init.path, variant=config.model.variant,
                        seed=config.seed, num_heads=config.model.num_heads)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  frozen = dataclasses.replace(
      frozen, params=jax.device_put(frozen.params, replicated),
      mask_pos_token=jax.device_put(frozen.mask_pos_token, replicated))
  size = config.image_size
  if size is None:
    if frozen.image_hw is None:
      raise UserError(f'{frozen.description} has no training resolution; '
                      'set image_size.')
    hw = frozen.image_hw
  else:
    hw = settings.image_hw(size)
  grid = vit.grid_size(hw, frozen.encoder.patch_size)
  mask = masking.Masking.from_config(config.masking)
  mask.counts(grid)
  key = jax.random.key(config.seed)

  def tokens(data_cfg, num_examples, stream):
    return extract_dropped_tokens(
        frozen, device.eval_batches(
            sources.open_source(data_cfg), image_hw=hw, batch_size=config.batch_size,
            num_examples=num_examples, mesh=mesh),
        mask=mask, draws=config.mask_draws, key=jax.random.fold_in(key, stream),
        use_mask_token=config.use_mask_token)

  train_x, train_y = tokens(config.train_data, config.num_train_images, 0)
  eval_x, eval_y = tokens(config.eval_data, config.num_eval_images, 1)
  h = config.head
  head = train_linear_head(
      train_x, train_y, grid[0] * grid[1], steps=h.steps,
      batch_size=h.batch_size, lr=h.lr, optimizer=h.optimizer,
      weight_decay=h.weight_decay, momentum=h.momentum, seed=config.seed)
  acc, per_position, counts, dist = position_accuracy(head, eval_x, eval_y,
                                                      grid)
  train_acc = position_accuracy(head, train_x, train_y, grid)[0]
  token = ('mask_pos_token' if config.use_mask_token and
           frozen.mask_pos_token is not None else 'no PE')
  results = {
      'init': frozen.description, 'acc': acc, 'train_acc': train_acc,
      'chance': 1. / (grid[0] * grid[1]), 'dist_err': dist,
      'grid': list(grid), 'image_hw': list(hw), 'dropped_pe': token,
      'num_train_tokens': int(len(train_y)), 'num_eval_tokens': int(len(eval_y)),
      'per_position': np.where(np.isnan(per_position), None,
                               per_position).tolist(),
      'eval_tokens_per_position': counts.tolist()}
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    save_heatmap(per_position, epath.Path(workdir) / 'position_accuracy.png',
                 f'Position probe of {frozen.label}\nheld out: '
                 f'{pictures.data_label(config.eval_data)}\nmean top-1 '
                 f'{100 * acc:.1f} % over {grid[0]}x{grid[1]} positions '
                 f'(chance {100 * results["chance"]:.1f} %)')
  return results
