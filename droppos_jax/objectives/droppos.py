"""The DropPos pre-training objective (arXiv 2309.03576): masks, attentive
pass, masked pass and loss for one batch, as one pure function that jit can
compile once; its train step and analytic FLOPs."""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from droppos_jax import losses, masking
from droppos_jax.errors import UserError
from droppos_jax.models import droppos as droppos_model
from droppos_jax.models import vit
from droppos_jax.objectives import steps


# The authors' code sizes its smoothing map for N = (input_size // 14)**2
# positions (a 16-wide grid at 224 px); `official_quirks` reproduces that.
REFERENCE_GRID_DIVISOR = 14


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig(steps.PatchGrid):
  """Static settings of the objective, validated on construction: masking,
  attentive weights, and the smoothing width sigma with its schedule and
  the reference's quirks. The paper's values are the config's
  (configs/common.py); a constant sigma over one step is the neutral
  schedule for a single batch."""
  masking: masking.Masking
  attentive: bool
  tau: float
  sigma: float
  sigma_schedule: str = 'constant'
  total_steps: int = 1
  steps_per_epoch: int = 1
  official_quirks: bool = False

  def __post_init__(self):
    grid = self.grid
    self.masking.counts(grid)
    if self.official_quirks:
      losses.check_official_grid(grid, self.official_grid_width)
    if not self.tau > 0:
      raise UserError(f'tau={self.tau!r} must be > 0 (the paper uses 0.1).')
    self._sigma_schedule()  # validates the schedule and sigma_0

  @property
  def official_grid_width(self) -> Optional[int]:
    """The reference's smoothing-map width, or None for the true grid."""
    if not self.official_quirks:
      return None
    return self.image_hw[1] // REFERENCE_GRID_DIVISOR

  def _sigma_schedule(self):
    return losses.make_sigma_schedule(
        self.sigma_schedule, self.sigma, total_steps=self.total_steps,
        steps_per_epoch=self.steps_per_epoch)

  def sigma_at(self, step) -> jax.Array:
    """The smoothing width at (traced) `step`."""
    return self._sigma_schedule()(step)



def masked_loss_fn(params, model: droppos_model.DropPos, images, ids_keep,
                   drop_mask, sigma, cfg: ObjectiveConfig):
  """(loss, metrics) of DropPos on `images` [B, H, W, 3] for given masks.

  The attentive pass (all patches, true PEs) is forward-only and shares the
  masked pass's patch embedding; its weights carry no gradient, so XLA
  prunes its backward entirely. metrics carries 'weight_sum' (sum of token
  weights) so callers can combine micro-batches exactly.
  """
  out = model.apply({'params': params}, images, ids_keep, drop_mask,
                    attentive=cfg.attentive)
  token_weights = None
  if cfg.attentive:
    token_weights = losses.attentive_weights(
        out['attentive']['cls'], out['attentive']['patches'], cfg.tau)
  loss, metrics = losses.droppos_loss(
      out['logits'], ids_keep, drop_mask, grid_hw=cfg.grid, sigma=sigma,
      token_weights=token_weights, official_grid_width=cfg.official_grid_width)
  weights = drop_mask.astype(jnp.float32)
  if token_weights is not None:
    weights = weights * token_weights
  return loss, dict(metrics, weight_sum=weights.sum())


# Metrics normalised by the token weights; the others are normalised by token
# counts, which are equal in every micro-batch (exact mask counts).
_WEIGHTED_METRICS = ('loss', 'acc1')


def accumulated_grads(params, model, images, ids_keep, drop_mask, sigma,
                      cfg: ObjectiveConfig, accum_steps: int):
  """Gradient and metrics of the global-batch loss, computed in micro-batches.

  The loss is sum(w*CE)/sum(w) over the whole batch, so micro-batch gradients
  are combined weighted by their own sum(w), not averaged: this gives exactly
  the full-batch gradient (w carries no gradient); steps.microbatches says
  which rows each micro-batch takes.
  """
  grad_fn = jax.value_and_grad(masked_loss_fn, has_aux=True)
  if accum_steps == 1:
    (_, metrics), grads = grad_fn(params, model, images, ids_keep, drop_mask,
                                  sigma, cfg)
    return grads, metrics

  def split(x):
    x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  def weighted(micro):
    (_, metrics), grads = grad_fn(params, model, *micro, sigma, cfg)
    w = metrics['weight_sum']
    grads = jax.tree.map(lambda g: g * w, grads)
    return grads, {k: v * w if k in _WEIGHTED_METRICS else v
                   for k, v in metrics.items()}

  micro = (split(images), split(ids_keep), split(drop_mask))
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
      weighted, jax.tree.map(lambda x: x[0], micro)))
  (grads, metrics), _ = jax.lax.scan(
      lambda carry, m: (jax.tree.map(jnp.add, carry, weighted(m)), None),
      init, micro)
  total_w = metrics['weight_sum']
  grads = jax.tree.map(lambda g: g / total_w, grads)
  metrics = {k: v / total_w if k in _WEIGHTED_METRICS else
             (v if k == 'weight_sum' else v / accum_steps)
             for k, v in metrics.items()}
  return grads, metrics


def objective_from_config(config, *, image_hw: tuple[int, int],
                          patch_size: int, schedule) -> ObjectiveConfig:
  """The objective of a pre-training config: its `objective` and `masking`
  blocks at the model's image and patch size, with sigma scheduled over the
  run (`schedule`, a settings.Schedule)."""
  obj = config.objective
  return ObjectiveConfig(
      image_hw=image_hw, patch_size=patch_size,
      masking=masking.Masking.from_config(config.masking),
      attentive=obj.attentive, tau=obj.tau, sigma=obj.sigma,
      sigma_schedule=obj.sigma_schedule, total_steps=schedule.total_steps,
      steps_per_epoch=schedule.steps_per_epoch,
      official_quirks=obj.official_quirks)


def make_train_step(model: droppos_model.DropPos, tx, cfg: ObjectiveConfig, *,
                    lr_fn, seed: int, accum_steps: int = 1):
  """Returns `train_step(state, images) -> (state, metrics)`, ready for jit.

  `state` is {'step', 'params', 'opt_state'}. Masks come from
  fold_in(key(seed), step), so a step is reproducible and resumable.
  """

  def train_step(state, images):
    step = state['step']
    key = jax.random.fold_in(jax.random.key(seed), step)
    ids_keep, drop_mask = cfg.masking.sample(key, images.shape[0], cfg.grid)
    sigma = cfg.sigma_at(step)
    grads, metrics = accumulated_grads(state['params'], model, images, ids_keep,
                                       drop_mask, sigma, cfg, accum_steps)
    return steps.apply_gradients(state, grads, dict(metrics, sigma=sigma), tx,
                                 lr_fn)

  return train_step


def flops_per_example(model: droppos_model.DropPos, cfg: ObjectiveConfig) -> int:
  """Analytic matmul FLOPs of one example's train step (no remat recompute):
  3x the forward of the masked pass and position head (forward, backward as
  two matmuls per matmul), 1x the forward-only attentive pass, the patch
  embedding forward (all patches when shared with the attentive pass) and
  its weight gradient from the visible patches."""
  enc = model.encoder
  n = cfg.num_patches
  k = cfg.masking.counts(cfg.grid)[0]  # visible patches
  d, pixels = enc.width, enc.patch_size**2 * 3
  masked = enc.depth * vit.block_flops(1 + k, 1 + k, d, enc.mlp_dim)
  head = model.projector.flops(k, d, n)
  embed = 2 * (n if cfg.attentive else k) * pixels * d + 2 * k * pixels * d
  attentive = 0
  if cfg.attentive and enc.depth:
    attentive = ((enc.depth - 1) * vit.block_flops(1 + n, 1 + n, d, enc.mlp_dim)
                 + vit.block_flops(1 + n, 1 + k, d, enc.mlp_dim))
  return 3 * (masked + head) + attentive + embed


def init_params(model: droppos_model.DropPos, key: jax.Array,
                image_hw: tuple[int, int]):
  """The model's parameters, initialised from `key` for `image_hw` images."""
  return model.init(key, jnp.zeros((1, *image_hw, 3)),
                    jnp.zeros((1, 1), jnp.int32),
                    jnp.ones((1, 1), bool))['params']
