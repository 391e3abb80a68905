"""Host batches -> global, normalised jax.Arrays (data/device.py), and the
crop windows resized there against PIL and against the host's resize."""
import itertools
import os

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
from skimage import data as skdata

from droppos_jax import sharding
from droppos_jax.data import device, sources, transforms


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


def pil_resize(pixels, size):
  return np.asarray(Image.fromarray(pixels).resize((size, size),
                                                   Image.BICUBIC)).astype(int)


@pytest.mark.slow
def test_resize_windows_is_pils_bicubic():
  """Windows of every kind (shrunk, enlarged, one axis only, vertical pass
  first, untouched) against PIL; flipped when asked."""
  photo = skdata.astronaut()
  shapes = [(330, 300), (375, 500), (170, 220), (60, 100), (400, 150),
            (224, 224), (224, 500), (30, 400)]
  pad, size = 512, 224
  windows = np.zeros((len(shapes), pad, pad, 3), np.uint8)
  for i, (h, w) in enumerate(shapes):
    windows[i, :h, :w] = photo[:h, :w]
  flip = np.arange(len(shapes)) % 3 == 1
  out = np.asarray(device.resize_windows(
      windows, np.array(shapes, np.int32), flip, size)).astype(int)
  for i, (h, w) in enumerate(shapes):
    ref = pil_resize(photo[:h, :w], size)
    ref = ref[:, ::-1] if flip[i] else ref
    diff = np.abs(out[i] - ref)
    assert diff.max() <= 1, (h, w)
    assert np.mean(diff > 0) < 1e-3, (h, w, np.mean(diff > 0))


@pytest.fixture(scope='module')
def photo_folder(tmp_path_factory):
  """Six JPEGs of real photos, some larger than a 256-pixel window."""
  root = tmp_path_factory.mktemp('photos')
  photos = [skdata.astronaut()[:375, :301], skdata.chelsea(), skdata.coffee(),
            skdata.astronaut()[100:300, 50:250], skdata.rocket()[:, :300],
            skdata.chelsea()[::-1, 20:200]]
  for i, photo in enumerate(photos):
    os.makedirs(root / f'class_{i % 2}', exist_ok=True)
    Image.fromarray(np.ascontiguousarray(photo)).save(
        root / f'class_{i % 2}' / f'{i}.jpg', quality=90)
  return root


@pytest.mark.slow
def test_resizing_on_the_device_feeds_the_crops_of_the_host(photo_folder):
  """train_batches with device_resize_window: the same crops, flips and
  labels as the host resize, to one grey level."""
  source = sources.open_source(ml_collections.ConfigDict(
      {'source': 'folder', 'path': str(photo_folder)}))
  mesh = sharding.make_mesh()
  run = lambda augment: list(itertools.islice(device.train_batches(
      source, augment, image_hw=(48, 48), batch_size=8, seed=3, start_step=0,
      mesh=mesh), 3))
  host = run(transforms.PRETRAIN)
  moved = run(transforms.TrainAugment(device_resize_window=256))
  levels = lambda x: np.asarray(x) * device.STDDEV_RGB + device.MEAN_RGB
  for a, b in zip(host, moved):
    np.testing.assert_array_equal(a['label'], b['label'])
    diff = np.abs(levels(a['image']) - levels(b['image']))
    assert diff.max() < 1 + 1e-3
    assert np.mean(diff > 0.5) < 0.01
