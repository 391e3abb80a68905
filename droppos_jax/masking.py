"""Patch masking and position dropping: pure functions of a `jax.random` key.

The masking strategy is a component chosen by name (`config.masking.strategy`,
registered in MASKINGS): a function

  strategy(key, batch_size, grid_hw, num_visible) -> ids_keep int32 [B, K]

that returns, per sample, the K visible patch indices (row-major) in a random
order. Position dropping (which visible tokens lose their PE) is the same for
every strategy. Counts are exact and identical for every sample, so all shapes
are static.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from droppos_jax.errors import UserError

# BEiT's block masking (arXiv 2106.08254, Algorithm 1): blocks of at least
# this many patches (BEiT's min_num_patches), aspect ratios in [0.3, 1/0.3].
BLOCK_MIN_PATCHES = 16
BLOCK_ASPECT = 0.3


def random_patches(key: jax.Array, batch_size: int, grid_hw: Sequence[int],
                   num_visible: int) -> jax.Array:
  """MAE's masking: K patches drawn uniformly, as an independent uniform
  permutation per sample (no ties, unlike argsort of float noise)."""
  n = int(grid_hw[0]) * int(grid_hw[1])
  perm = jax.vmap(lambda k: jax.random.permutation(k, n))(
      jax.random.split(key, batch_size))
  return perm[:, :num_visible].astype(jnp.int32)


def _block_mask(key: jax.Array, grid_hw: Sequence[int], num_masked: int,
                min_patches: int) -> jax.Array:
  """[h*w] bool: BEiT's blocks for one sample. Each attempt draws an area in
  [min_patches, max(min_patches, still to mask)] and a log-uniform aspect
  ratio, places the rectangle uniformly, and keeps it if it masks something
  new without passing the target (BEiT's rule, so it never overshoots)."""
  h, w = int(grid_hw[0]), int(grid_hw[1])
  rows = jnp.arange(h * w) // w
  cols = jnp.arange(h * w) % w
  attempts = 10 * math.ceil(num_masked / min_patches)  # BEiT tries 10 per block

  def attempt(carry, key):
    mask, count = carry
    k_area, k_aspect, k_top, k_left = jax.random.split(key, 4)
    remaining = num_masked - count
    area = jax.random.uniform(k_area, minval=min_patches,
                              maxval=jnp.maximum(min_patches, remaining))
    aspect = jnp.exp(jax.random.uniform(
        k_aspect, minval=math.log(BLOCK_ASPECT), maxval=-math.log(BLOCK_ASPECT)))
    bh = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    bw = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    top = jax.random.randint(k_top, (), 0, jnp.maximum(h - bh + 1, 1))
    left = jax.random.randint(k_left, (), 0, jnp.maximum(w - bw + 1, 1))
    block = ((rows >= top) & (rows < top + bh) & (cols >= left)
             & (cols < left + bw))
    new = (block & ~mask).sum()
    keep = (bh < h) & (bw < w) & (new > 0) & (new <= remaining)
    return (mask | (block & keep), count + jnp.where(keep, new, 0)), None

  (mask, _), _ = jax.lax.scan(attempt, (jnp.zeros(h * w, bool), jnp.int32(0)),
                              jax.random.split(key, attempts))
  return mask


def block_patches(key: jax.Array, batch_size: int, grid_hw: Sequence[int],
                  num_visible: int) -> jax.Array:
  """BEiT's block-wise masking with an exact count: rectangular blocks are
  masked until the ratio is reached (or the attempts run out); the patches
  still missing are masked at random among the rest, so every sample keeps
  exactly K visible patches (static shapes). Blocks must be smaller than the
  grid in both directions, as in BEiT, so small grids use smaller blocks."""
  h, w = int(grid_hw[0]), int(grid_hw[1])
  num_masked = h * w - num_visible
  if num_masked == 0:
    return random_patches(key, batch_size, grid_hw, num_visible)
  min_patches = max(1, min(BLOCK_MIN_PATCHES, num_masked, (h - 1) * (w - 1)))

  def one(key):
    k_blocks, k_order = jax.random.split(key)
    blocked = _block_mask(k_blocks, grid_hw, num_masked, min_patches)
    # Unblocked patches first, in a random order: the first K stay visible.
    score = jax.random.uniform(k_order, (h * w,)) + 2. * blocked
    return jnp.argsort(score)[:num_visible].astype(jnp.int32)

  return jax.vmap(one)(jax.random.split(key, batch_size))


# name -> strategy(key, batch_size, grid_hw, num_visible) -> ids_keep [B, K].
MASKINGS: dict[str, Callable[..., jax.Array]] = {
    'random': random_patches,
    'block': block_patches,
}


def _check_ratios(mask_ratio: float, pos_drop_ratio: float) -> None:
  for name, ratio in (('mask_ratio', mask_ratio),
                      ('pos_drop_ratio', pos_drop_ratio)):
    if not 0. <= float(ratio) < 1.:
      raise UserError(f'{name}={ratio!r} is outside the valid range [0, 1).')


def visible_count(num_patches: int, mask_ratio: float) -> int:
  """K = int(N*(1-mask_ratio)) visible patches, at least one."""
  if int(num_patches) < 1:
    raise UserError(f'num_patches={num_patches!r} must be at least 1.')
  num_visible = int(num_patches * (1. - mask_ratio))
  if num_visible < 1:
    raise UserError(
        f'mask_ratio={mask_ratio} leaves no visible patch out of {num_patches}; '
        f'use mask_ratio <= {1. - 1. / num_patches:.4f}.')
  return num_visible


def mask_counts(num_patches: int, mask_ratio: float,
                pos_drop_ratio: float) -> tuple[int, int]:
  """(K visible patches, K_keep of them keeping their PE), validated.

  K = int(N*(1-mask_ratio)), K_keep = int(K*(1-pos_drop_ratio)); at least one
  patch must stay visible and at least one visible patch must drop its PE.
  """
  _check_ratios(mask_ratio, pos_drop_ratio)
  num_visible = visible_count(num_patches, mask_ratio)
  num_keep_pos = int(num_visible * (1. - pos_drop_ratio))
  if num_keep_pos >= num_visible:
    raise UserError(
        f'pos_drop_ratio={pos_drop_ratio} drops no position among the '
        f'{num_visible} visible patches; use pos_drop_ratio >= '
        f'{1. / num_visible:.4f} so there is something to predict.')
  return num_visible, num_keep_pos


@dataclasses.dataclass(frozen=True)
class Masking:
  """A config's `masking` block, validated: the strategy (a MASKINGS name),
  the share of patches masked and the share of visible ones whose PE is
  dropped. Hashable, so jit can take it as a static argument."""
  strategy: str
  mask_ratio: float
  pos_drop_ratio: float

  def __post_init__(self):
    if self.strategy not in MASKINGS:
      raise UserError(f'masking.strategy={self.strategy!r}; registered: '
                      f'{", ".join(MASKINGS)}.')
    _check_ratios(self.mask_ratio, self.pos_drop_ratio)

  @classmethod
  def from_config(cls, block) -> 'Masking':
    return cls(block.strategy, float(block.mask_ratio),
               float(block.pos_drop_ratio))

  def counts(self, grid_hw: Sequence[int]) -> tuple[int, int]:
    """(K, K_keep) on the grid, validated (mask_counts)."""
    return mask_counts(int(grid_hw[0]) * int(grid_hw[1]), self.mask_ratio,
                       self.pos_drop_ratio)

  def visible(self, key: jax.Array, batch_size: int, grid_hw: Sequence[int]):
    """ids_keep int32 [B, K]: the visible patch positions of each sample, in
    the strategy's random order; for objectives that drop no PE (MAE)."""
    grid_hw = tuple(grid_hw)
    num_visible = visible_count(grid_hw[0] * grid_hw[1], self.mask_ratio)
    return MASKINGS[self.strategy](key, batch_size, grid_hw, num_visible)

  def sample(self, key: jax.Array, batch_size: int, grid_hw: Sequence[int]):
    """Draws, per sample, which patches stay visible and which drop their PE.

    Returns (ids_keep int32 [B, K], drop_mask bool [B, K]): `ids_keep` are
    the visible patch positions in a random order (the strategy's); drop_mask
    is True where the position embedding is replaced by the mask token: slot
    i keeps its PE iff its rank in an independent permutation is < K_keep.
    """
    num_visible, num_keep_pos = self.counts(grid_hw)
    patch_key, drop_key = jax.random.split(key)
    ids_keep = self.visible(patch_key, batch_size, grid_hw)
    ranks = jax.vmap(lambda k: jax.random.permutation(k, num_visible))(
        jax.random.split(drop_key, batch_size))
    return ids_keep, ranks >= num_keep_pos
