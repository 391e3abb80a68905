"""The DropPos pre-training objective for one batch: masks, attentive pass,
masked pass and loss, as one pure function that jit can compile once."""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from droppos_jax import losses, masking
from droppos_jax.models import droppos as droppos_model
from droppos_jax.models import vit


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Static settings of the objective (validated on construction)."""
  image_hw: tuple[int, int]
  patch_size: int
  mask_ratio: float = 0.75
  pos_drop_ratio: float = 0.75
  attentive: bool = True
  tau: float = 0.1
  official_grid_width: Optional[int] = None

  def __post_init__(self):
    grid = vit.grid_size(self.image_hw, self.patch_size)
    masking.mask_counts(grid[0] * grid[1], self.mask_ratio, self.pos_drop_ratio)
    if not self.tau > 0:
      raise ValueError(f'tau={self.tau!r} must be > 0 (the paper uses 0.1).')

  @property
  def grid(self) -> tuple[int, int]:
    return vit.grid_size(self.image_hw, self.patch_size)

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]


def loss_fn(params, model: droppos_model.DropPos, images, key, sigma,
            cfg: ObjectiveConfig):
  """(loss, metrics) of DropPos on `images` [B, H, W, 3] with masks from `key`.

  The attentive pass (all patches, true PEs) is forward-only: its output is
  wrapped in stop_gradient, so XLA prunes its backward entirely.
  """
  ids_keep, drop_mask = masking.sample_masks(
      key, images.shape[0], cfg.num_patches, cfg.mask_ratio, cfg.pos_drop_ratio)
  token_weights = None
  if cfg.attentive:
    cls_feat, patch_feats = model.apply(
        {'params': jax.lax.stop_gradient(params)}, images,
        method=droppos_model.DropPos.full_features)
    token_weights = losses.attentive_weights(cls_feat, patch_feats, ids_keep,
                                             cfg.tau)
  logits = model.apply({'params': params}, images, ids_keep, drop_mask)
  return losses.droppos_loss(
      logits, ids_keep, drop_mask, grid_hw=cfg.grid, sigma=sigma,
      token_weights=token_weights, official_grid_width=cfg.official_grid_width)
