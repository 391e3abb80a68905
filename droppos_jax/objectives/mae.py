"""The MAE pre-training objective (arXiv 2111.06377, facebookresearch/mae):
mean-squared error of the predicted pixels on the masked patches, against
per-patch normalised pixels with `norm_pix_loss` (MAE's default for its
results); its train step and analytic FLOPs."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from droppos_jax import masking
from droppos_jax.errors import UserError
from droppos_jax.models import mae as mae_model
from droppos_jax.models import vit
from droppos_jax.objectives import steps


@dataclasses.dataclass(frozen=True)
class MAEConfig(steps.PatchGrid):
  """Static settings of the objective, validated on construction."""
  masking: masking.Masking
  norm_pix_loss: bool

  def __post_init__(self):
    self.num_visible  # validates the mask ratio on this grid
    if self.masking.pos_drop_ratio:
      raise UserError(
          f'masking.pos_drop_ratio={self.masking.pos_drop_ratio}: MAE keeps '
          'the PE of every visible patch; set it to 0.')

  @property
  def num_visible(self) -> int:
    return masking.visible_count(self.num_patches, self.masking.mask_ratio)


def pixel_targets(images, patch_size: int, norm_pix_loss: bool):
  """[B, N, p*p*C] pixels of every patch, normalised per patch (MAE's
  norm_pix_loss: torch's default unbiased variance, + 1e-6)."""
  target = vit.patchify(images.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def masked_loss_fn(params, model: mae_model.MAE, images, ids_keep,
                   cfg: MAEConfig):
  """(loss, metrics) of MAE on `images` [B, H, W, 3] with the patches
  `ids_keep` [B, K] visible: the mean over masked patches of the per-patch
  mean squared error."""
  pred = model.apply({'params': params}, images, ids_keep)['pred']
  target = pixel_targets(images, cfg.patch_size, cfg.norm_pix_loss)
  per_patch = jnp.mean((pred - target)**2, axis=-1)
  b = ids_keep.shape[0]
  masked = jnp.ones(per_patch.shape, jnp.float32).at[
      jnp.arange(b)[:, None], ids_keep].set(0.)
  loss = jnp.sum(per_patch * masked) / jnp.sum(masked)
  return loss, {'loss': loss}


def accumulated_grads(params, model, images, ids_keep, cfg: MAEConfig,
                      accum_steps: int):
  """Gradient and metrics of the global-batch loss, in micro-batches: every
  sample masks the same number of patches, so the batch loss is the mean of
  the micro-batches' and so is its gradient."""
  grad_fn = jax.value_and_grad(masked_loss_fn, has_aux=True)
  if accum_steps == 1:
    (_, metrics), grads = grad_fn(params, model, images, ids_keep, cfg)
    return grads, metrics

  def one(*micro):
    (_, metrics), grads = grad_fn(params, model, *micro, cfg)
    return grads, metrics

  total = steps.sum_over(one, steps.microbatches((images, ids_keep),
                                                 accum_steps))
  return jax.tree.map(lambda x: x / accum_steps, total)


def objective_from_config(config, *, image_hw: tuple[int, int],
                          patch_size: int, schedule) -> MAEConfig:
  """The objective of an MAE pre-training config (`schedule`: unused, MAE's
  loss has no schedule)."""
  del schedule
  return MAEConfig(image_hw=image_hw, patch_size=patch_size,
                   masking=masking.Masking.from_config(config.masking),
                   norm_pix_loss=config.objective.norm_pix_loss)


def make_train_step(model: mae_model.MAE, tx, cfg: MAEConfig, *, lr_fn,
                    seed: int, accum_steps: int = 1):
  """Returns `train_step(state, images) -> (state, metrics)`, ready for jit;
  masks from fold_in(key(seed), step), as DropPos's."""

  def train_step(state, images):
    key = jax.random.fold_in(jax.random.key(seed), state['step'])
    ids_keep = cfg.masking.visible(key, images.shape[0], cfg.grid)
    grads, metrics = accumulated_grads(state['params'], model, images,
                                       ids_keep, cfg, accum_steps)
    return steps.apply_gradients(state, grads, metrics, tx, lr_fn)

  return train_step


def flops_per_example(model: mae_model.MAE, cfg: MAEConfig) -> int:
  """Analytic matmul FLOPs of one example's train step (no remat
  recompute): 3x the forward of the encoder on the visible patches and of
  the decoder on all of them, and the patch embedding of the visible patches
  with its weight gradient."""
  enc = model.encoder
  k = cfg.num_visible
  d, pixels = enc.width, enc.patch_size**2 * 3
  encoder = enc.depth * vit.block_flops(1 + k, 1 + k, d, enc.mlp_dim)
  decoder = model.decoder.flops(k, cfg.num_patches, d, pixels)
  return 3 * (encoder + decoder) + 4 * k * pixels * d


def init_params(model: mae_model.MAE, key: jax.Array,
                image_hw: tuple[int, int]):
  """The model's parameters, initialised from `key` for `image_hw` images."""
  return model.init(key, jnp.zeros((1, *image_hw, 3)),
                    jnp.zeros((1, 1), jnp.int32))['params']
