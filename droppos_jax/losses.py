"""DropPos objective: smoothed position targets, attentive token weights, the
weighted global-batch cross entropy, its metrics and the sigma schedules."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from droppos_jax.errors import UserError

SIGMA_SCHEDULES = ('linear_epoch', 'linear', 'cosine', 'constant')


def _check_sigma(sigma) -> None:
  # A traced sigma (scheduled under jit) cannot be checked here; the schedule
  # validates sigma_0 where the user sets it.
  if isinstance(sigma, (int, float, np.ndarray, np.generic)) and np.any(
      np.asarray(sigma) < 0):
    raise UserError(f'sigma={sigma!r} must be >= 0 (0 means one-hot targets).')


def grid_coords(grid_hw: Sequence[int]) -> np.ndarray:
  """[h*w, 2] (row, col) of each patch in row-major order."""
  h, w = grid_hw
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  return np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1)


def _squared_distances(grid_hw: Sequence[int]) -> np.ndarray:
  coords = grid_coords(grid_hw).astype(np.float32)
  return ((coords[:, None, :] - coords[None, :, :])**2).sum(-1)


def check_official_grid(grid_hw: Sequence[int], width: int) -> None:
  """The reference's s x s smoothing map must cover the patch grid."""
  h, w = int(grid_hw[0]), int(grid_hw[1])
  if width * width < h * w:
    raise UserError(
        f'official_grid_width={width} (objective.official_quirks: the '
        'reference builds its smoothing map on an (image width // 14)-wide '
        f'grid) gives {width * width} positions, fewer than the {h * w} '
        f'patches of the {h}x{w} grid; set objective.official_quirks=False '
        'for this image and patch size.')


def smoothing_targets(grid_hw: Sequence[int], sigma,
                      official_grid_width: Optional[int] = None) -> jax.Array:
  """[N, N] soft targets: row a is exp(-d^2(a, .)/sigma^2), normalised.

  sigma = 0 gives the identity. `official_grid_width=s` reproduces the
  reference code instead: the map is built on an s x s grid, each column is
  divided by its sum, and the top-left N x N block is returned.
  """
  _check_sigma(sigma)
  h, w = int(grid_hw[0]), int(grid_hw[1])
  n = h * w
  sigma = jnp.asarray(sigma, jnp.float32)
  positive = sigma > 0
  inv_s2 = jnp.where(positive, 1. / jnp.where(positive, sigma, 1.)**2, 0.)
  if official_grid_width is None:
    logits = -jnp.asarray(_squared_distances((h, w))) * inv_s2
    # Row softmax == exp(-d^2/s^2) / row sum, but never over/underflows.
    targets = jax.nn.softmax(logits, axis=-1)
    return jnp.where(positive, targets, jnp.eye(n, dtype=jnp.float32))
  s = int(official_grid_width)
  check_official_grid(grid_hw, s)
  # Columns are normalised; the diagonal term exp(0) = 1 keeps sums >= 1.
  weights = jnp.exp(-jnp.asarray(_squared_distances((s, s))) * inv_s2)
  weights = jnp.where(positive, weights, jnp.eye(s * s, dtype=jnp.float32))
  return (weights / weights.sum(axis=0, keepdims=True))[:n, :n]


def attentive_weights(cls_feat, patch_feats, tau: float) -> jax.Array:
  """[B, K] token weights: softmax_j(cos(cls, patch_j) / tau) over the given
  patches, float32, no gradient.

  Attentive reconstruction takes the softmax over all N patches of the full
  pass and renormalises it over the K visible ones; the denominator over N
  cancels, so passing the K visible patches' features gives those weights
  (and all N patches give the unrenormalised map).
  """
  if isinstance(tau, (int, float)) and not tau > 0:
    raise UserError(f'tau={tau!r} must be > 0 (the paper uses 0.1).')
  cls_feat = jax.lax.stop_gradient(cls_feat.astype(jnp.float32))
  patch_feats = jax.lax.stop_gradient(patch_feats.astype(jnp.float32))
  normalize = lambda x: x / jnp.maximum(
      jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  cos = jnp.einsum('bd,bnd->bn', normalize(cls_feat), normalize(patch_feats))
  return jax.nn.softmax(cos / tau, axis=-1)


def droppos_loss(logits, ids_keep, drop_mask, *, grid_hw: Sequence[int], sigma,
                 token_weights=None, official_grid_width: Optional[int] = None):
  """Weighted soft-target cross entropy over the PE-dropped visible tokens.

  logits [B, K, N]; loss = sum(w * CE) / sum(w) over the whole (global) batch
  with w = drop_mask * token_weights. Returns (loss, metrics) where metrics
  holds acc1 (weighted, dropped tokens), acc1_unweighted, acc1_kept (tokens
  that kept their PE) and dist_err (mean grid distance, dropped tokens).
  """
  logits = logits.astype(jnp.float32)
  n = logits.shape[-1]
  if n != grid_hw[0] * grid_hw[1]:
    raise ValueError(f'logits have {n} classes but the grid {tuple(grid_hw)} '
                     f'has {grid_hw[0] * grid_hw[1]} positions.')
  dropped = drop_mask.astype(jnp.float32)
  weights = dropped if token_weights is None else dropped * token_weights
  targets = smoothing_targets(grid_hw, sigma, official_grid_width)[ids_keep]
  ce = -(targets * jax.nn.log_softmax(logits, axis=-1)).sum(-1)
  safe_div = lambda a, b: a / jnp.maximum(b, 1e-12)
  loss = safe_div((weights * ce).sum(), weights.sum())

  pred = jnp.argmax(logits, axis=-1)
  correct = (pred == ids_keep).astype(jnp.float32)
  kept = 1. - dropped
  coords = jnp.asarray(grid_coords(grid_hw), jnp.float32)
  dist = jnp.linalg.norm(coords[pred] - coords[ids_keep], axis=-1)
  metrics = {
      'loss': loss,
      'acc1': safe_div((weights * correct).sum(), weights.sum()),
      'acc1_unweighted': safe_div((dropped * correct).sum(), dropped.sum()),
      'acc1_kept': safe_div((kept * correct).sum(), kept.sum()),
      'dist_err': safe_div((dropped * dist).sum(), dropped.sum()),
  }
  return loss, metrics


def make_sigma_schedule(name: str, sigma0: float, *, total_steps: int,
                        steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
  """step -> sigma. 'linear_epoch' (reference default) is
  sigma0 * (1 - epoch/total_epochs), updated once per epoch; 'linear' and
  'cosine' decay per step to 0 at total_steps; 'constant' keeps sigma0."""
  if name not in SIGMA_SCHEDULES:
    raise UserError(f'Unknown sigma schedule {name!r}; valid: {SIGMA_SCHEDULES}.')
  _check_sigma(sigma0)
  if total_steps < 1 or steps_per_epoch < 1:
    raise UserError(f'total_steps={total_steps} and steps_per_epoch='
                     f'{steps_per_epoch} must be >= 1.')
  total_epochs = max(total_steps // steps_per_epoch, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if name == 'linear_epoch':
      frac = jnp.floor(step / steps_per_epoch) / total_epochs
    elif name == 'linear':
      frac = step / total_steps
    elif name == 'cosine':
      frac = 0.5 * (1. - jnp.cos(math.pi * jnp.minimum(step / total_steps, 1.)))
    else:
      frac = jnp.zeros_like(step)
    return sigma0 * jnp.clip(1. - frac, 0., 1.)

  return schedule
