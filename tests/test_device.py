"""Host batches -> global, normalised jax.Arrays (data/device.py)."""
import jax
import numpy as np
import pytest

from droppos_jax import sharding
from droppos_jax.data import device


def test_global_batches_normalise_shard_and_prefetch():
  mesh = sharding.make_mesh()
  batch_sh = sharding.batch_sharding(mesh)
  host = [{'image': np.full((16, 4, 4, 3), 10 * k, np.uint8),
           'label': np.arange(16, dtype=np.int32) + k} for k in range(3)]
  pulled = []
  batches = device.global_batches((pulled.append(b) or b for b in host),
                                  batch_sh, prefetch=2)
  first = next(batches)
  assert len(pulled) == 2  # two in flight before the first step runs
  assert first['image'].dtype == np.float32 and first['image'].shape == (16, 4, 4, 3)
  assert first['image'].sharding.is_equivalent_to(batch_sh, 4)
  assert [s.data.shape for s in first['label'].addressable_shards] == [(2,)] * 8
  rest = list(batches)
  assert len(rest) == 2
  for batch, expected in zip([first] + rest, host):
    np.testing.assert_array_equal(batch['label'], expected['label'])
    np.testing.assert_allclose(
        batch['image'], (expected['image'] - np.array(device.MEAN_RGB)) /
        np.array(device.STDDEV_RGB), rtol=1e-6)


@pytest.mark.slow
def test_erase_fills_exactly_the_box_with_seeded_noise():
  images = jax.numpy.zeros((2, 6, 8, 3))
  boxes = jax.numpy.array([[1, 2, 3, 4, 11], [0, 0, 0, 0, 5]], np.int32)
  out = np.asarray(device.erase(images, boxes))
  inside = np.zeros((6, 8), bool)
  inside[1:4, 2:6] = True
  assert np.all(out[0][inside] != 0) and np.all(out[0][~inside] == 0)
  assert np.all(out[1] == 0)
  noise = jax.random.normal(jax.random.key(11), (6, 8, 3))
  np.testing.assert_array_equal(out[0][inside], np.asarray(noise)[inside])
