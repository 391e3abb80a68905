import chex
import jax
import numpy as np
import pytest

from droppos_jax import masking
from droppos_jax.errors import UserError

PAPER = masking.Masking('random', 0.75, 0.75)
BLOCK = masking.Masking('block', 0.75, 0.75)


@pytest.mark.slow
@pytest.mark.parametrize('strategy', list(masking.MASKINGS))
def test_exact_counts_and_no_repeats(strategy):
  ids, drop = masking.Masking(strategy, 0.75, 0.75).sample(
      jax.random.key(0), 16, (14, 14))
  chex.assert_shape([ids, drop], (16, 49))
  assert ids.dtype == np.int32 and drop.dtype == np.bool_
  np.testing.assert_array_equal(np.asarray(drop).sum(1), 49 - 12)
  for row in np.asarray(ids):
    assert len(set(row.tolist())) == 49
    assert row.min() >= 0 and row.max() < 196


def test_counts_follow_spec_formula():
  assert masking.mask_counts(196, 0.75, 0.75) == (49, 12)
  assert masking.mask_counts(64, 0.75, 0.75) == (16, 4)
  assert masking.mask_counts(10, 0.5, 0.5) == (5, 2)


@pytest.mark.parametrize('spec', [PAPER, BLOCK], ids=['random', 'block'])
def test_same_key_same_masks_and_samples_differ(spec):
  a = spec.sample(jax.random.key(3), 8, (8, 8))
  b = spec.sample(jax.random.key(3), 8, (8, 8))
  c = spec.sample(jax.random.key(4), 8, (8, 8))
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(a[0], c[0])
  ids, drop = map(np.asarray, a)
  assert len({tuple(r) for r in ids}) == 8
  assert len({tuple(r) for r in drop}) > 1


@pytest.mark.slow
def test_every_position_and_slot_equally_likely():
  draws = 4000
  ids, drop = PAPER.sample(jax.random.key(0), draws, (4, 4))
  counts = np.bincount(np.asarray(ids).ravel(), minlength=16)
  expected = draws * 4 / 16  # 1000 per position
  # Chi-square with 15 dof: 99.9 % quantile is 37.7.
  assert ((counts - expected)**2 / expected).sum() < 37.7
  # Each visible slot drops its PE with probability 3/4.
  np.testing.assert_allclose(np.asarray(drop).mean(0), 0.75, atol=0.03)


def masked_neighbours(ids, grid):
  """Mean number of masked 4-neighbours of a masked patch (numpy)."""
  h, w = grid
  out = []
  for row in ids:
    masked = np.ones(h * w, bool)
    masked[row] = False
    m = masked.reshape(h, w)
    padded = np.pad(m, 1)
    near = (padded[:-2, 1:-1].astype(int) + padded[2:, 1:-1] + padded[1:-1, :-2]
            + padded[1:-1, 2:])
    out.append(near[m].mean())
  return float(np.mean(out))


@pytest.mark.slow
def test_block_masking_masks_rectangles_not_scattered_patches():
  """BEiT's blocks: at the ratio where blocks alone fill the target (40 %,
  BEiT's), masked patches have more masked neighbours than under random
  masking of the same count, and the visible set is a random order."""
  grid, n = (14, 14), 196
  block = masking.Masking('block', 0.4, 0.5)
  ids_b, _ = block.sample(jax.random.key(0), 64, grid)
  ids_r, _ = masking.Masking('random', 0.4, 0.5).sample(
      jax.random.key(0), 64, grid)
  ids_b, ids_r = np.asarray(ids_b), np.asarray(ids_r)
  assert ids_b.shape == (64, int(n * 0.6))
  assert masked_neighbours(ids_b, grid) > 1.4 * masked_neighbours(ids_r, grid)
  # A random order of the visible patches, not row-major.
  assert np.mean([np.all(np.diff(r) > 0) for r in ids_b]) == 0.
  # Every patch is visible in some sample: blocks are placed anywhere.
  assert len(np.unique(ids_b)) == n


def test_block_masking_on_a_tiny_grid_and_with_nothing_masked():
  ids, _ = masking.Masking('block', 0.5, 0.5).sample(jax.random.key(1), 4, (4, 4))
  assert np.asarray(ids).shape == (4, 8)
  assert all(len(set(r)) == 8 for r in np.asarray(ids).tolist())
  ids, _ = masking.Masking('block', 0.0, 0.5).sample(jax.random.key(1), 2, (4, 4))
  assert sorted(np.asarray(ids)[0].tolist()) == list(range(16))


def test_unknown_strategy_lists_the_registered_ones():
  with pytest.raises(UserError, match=r"masking.strategy='grid'; registered: "
                     r'random, block\.'):
    masking.Masking('grid', 0.75, 0.75)


@pytest.mark.parametrize('n,mask,drop,msg', [
    (196, 1.0, 0.75, r'mask_ratio=1.0 is outside the valid range \[0, 1\)'),
    (196, -0.1, 0.75, 'mask_ratio=-0.1 is outside'),
    (196, 0.75, 1.5, 'pos_drop_ratio=1.5 is outside'),
    (4, 0.9, 0.5, 'leaves no visible patch'),
    (196, 0.75, 0.0, 'drops no position'),
    (16, 0.75, 1e-17, 'drops no position'),  # rounds to no drop
])
def test_bad_ratios_are_rejected(n, mask, drop, msg):
  with pytest.raises(ValueError, match=msg):
    masking.mask_counts(n, mask, drop)
