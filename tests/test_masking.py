import chex
import jax
import numpy as np
import pytest

from droppos_jax import masking


@pytest.mark.slow
def test_exact_counts_and_no_repeats():
  ids, drop = masking.sample_masks(jax.random.key(0), 16, 196, 0.75, 0.75)
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


def test_same_key_same_masks_and_samples_differ():
  a = masking.sample_masks(jax.random.key(3), 8, 64, 0.75, 0.75)
  b = masking.sample_masks(jax.random.key(3), 8, 64, 0.75, 0.75)
  c = masking.sample_masks(jax.random.key(4), 8, 64, 0.75, 0.75)
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(a[0], c[0])
  ids, drop = map(np.asarray, a)
  assert len({tuple(r) for r in ids}) == 8
  assert len({tuple(r) for r in drop}) > 1


@pytest.mark.slow
def test_every_position_and_slot_equally_likely():
  n, draws = 16, 4000
  ids, drop = masking.sample_masks(jax.random.key(0), draws, n, 0.75, 0.75)
  counts = np.bincount(np.asarray(ids).ravel(), minlength=n)
  expected = draws * 4 / n  # 1000 per position
  # Chi-square with 15 dof: 99.9 % quantile is 37.7.
  assert ((counts - expected)**2 / expected).sum() < 37.7
  # Each visible slot drops its PE with probability 3/4.
  np.testing.assert_allclose(np.asarray(drop).mean(0), 0.75, atol=0.03)


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
    masking.sample_masks(jax.random.key(0), 2, n, mask, drop)
