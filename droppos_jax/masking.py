"""Patch masking and position dropping: pure functions of a `jax.random` key.

Counts are exact and identical for every sample, so all shapes are static.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from droppos_jax.errors import UserError


def mask_counts(num_patches: int, mask_ratio: float,
                pos_drop_ratio: float) -> tuple[int, int]:
  """(K visible patches, K_keep of them keeping their PE), validated.

  K = int(N*(1-mask_ratio)), K_keep = int(K*(1-pos_drop_ratio)); at least one
  patch must stay visible and at least one visible patch must drop its PE.
  """
  for name, ratio in (('mask_ratio', mask_ratio),
                      ('pos_drop_ratio', pos_drop_ratio)):
    if not 0. <= float(ratio) < 1.:
      raise UserError(f'{name}={ratio!r} is outside the valid range [0, 1).')
  if int(num_patches) < 1:
    raise UserError(f'num_patches={num_patches!r} must be at least 1.')
  num_visible = int(num_patches * (1. - mask_ratio))
  if num_visible < 1:
    raise UserError(
        f'mask_ratio={mask_ratio} leaves no visible patch out of {num_patches}; '
        f'use mask_ratio <= {1. - 1. / num_patches:.4f}.')
  num_keep_pos = int(num_visible * (1. - pos_drop_ratio))
  if num_keep_pos >= num_visible:
    raise UserError(
        f'pos_drop_ratio={pos_drop_ratio} drops no position among the '
        f'{num_visible} visible patches; use pos_drop_ratio >= '
        f'{1. / num_visible:.4f} so there is something to predict.')
  return num_visible, num_keep_pos


def sample_masks(key: jax.Array, batch_size: int, num_patches: int,
                 mask_ratio: float, pos_drop_ratio: float):
  """Draws, per sample, which patches stay visible and which drop their PE.

  Returns (ids_keep int32 [B, K], drop_mask bool [B, K]): `ids_keep` are the
  visible patch positions in their sampled (random) order; `drop_mask` is True
  where the position embedding is replaced by the mask token. Each row uses an
  independent uniform permutation (no ties, unlike argsort of float noise).
  """
  num_visible, num_keep_pos = mask_counts(num_patches, mask_ratio,
                                          pos_drop_ratio)
  patch_key, drop_key = jax.random.split(key)
  perm = jax.vmap(lambda k: jax.random.permutation(k, num_patches))(
      jax.random.split(patch_key, batch_size))
  ids_keep = perm[:, :num_visible].astype(jnp.int32)
  # Slot i keeps its PE iff its rank in a second permutation is < K_keep.
  ranks = jax.vmap(lambda k: jax.random.permutation(k, num_visible))(
      jax.random.split(drop_key, batch_size))
  return ids_keep, ranks >= num_keep_pos
