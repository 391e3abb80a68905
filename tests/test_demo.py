"""Tests for the offline demo dataset (photos shipped with the package)."""
import os
import socket
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from droppos_jax.data import demo as demo_data
import data_fixtures


def test_shapes_labels_and_determinism():
  images, labels, names = demo_data.load_demo_images(40, crop_size=24, seed=3)
  assert images.shape == (40, 24, 24, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32
  assert names == list(demo_data.CLASS_NAMES) == sorted(names)
  np.testing.assert_array_equal(labels, np.arange(40) % len(names))
  assert images.std() > 10  # Real photos, not blank crops.
  again, _, _ = demo_data.load_demo_images(40, crop_size=24, seed=3)
  np.testing.assert_array_equal(images, again)
  other, _, _ = demo_data.load_demo_images(40, crop_size=24, seed=4)
  assert not np.array_equal(images, other)


def test_default_sizes():
  images, labels, _ = demo_data.load_demo_images(split='val')
  assert images.shape == (demo_data.DEFAULT_NUM_IMAGES['val'], 96, 96, 3)
  assert len(set(labels.tolist())) == len(demo_data.CLASS_NAMES)


def test_works_offline(monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError('demo_data tried to open a socket')
  monkeypatch.setattr(socket, 'socket', no_network)
  demo_data._photo.cache_clear()  # Re-read every photo with the network cut.
  images, _, _ = demo_data.load_demo_images(16, crop_size=8)
  assert images.shape == (16, 8, 8, 3)


def test_splits_share_no_pixels():
  for name in demo_data.CLASS_NAMES:
    photo = demo_data._photo(name)
    train, val = demo_data._parts(photo, 'train'), demo_data._parts(photo, 'val')
    axis = 0 if photo.shape[0] > photo.shape[1] else 1
    # The val band sits between the two train parts; together they tile it.
    np.testing.assert_array_equal(
        np.concatenate([train[0], val[0], train[1]], axis), photo)
    assert min(val[0].shape[:2]) >= 32, name
  train, _, _ = demo_data.load_demo_images(64, crop_size=16)
  val, _, _ = demo_data.load_demo_images(64, crop_size=16, split='val')
  assert not any(np.array_equal(v, t) for v in val for t in train)


def test_photos_match_their_licence_list():
  """Every shipped photo is credited in the photos' README, and back."""
  readme = (demo_data.PHOTO_DIR / 'README.md').read_text()
  shipped = sorted(p.name for p in demo_data.PHOTO_DIR.glob('*.jpg'))
  assert shipped == sorted(f'{n}.jpg' for n in demo_data.CLASS_NAMES)
  for name in shipped:
    assert f'`{name}`' in readme, name


def test_bad_arguments():
  with pytest.raises(ValueError, match=r"split 'test'.*\['train', 'val'\]"):
    demo_data.load_demo_images(split='test')
  with pytest.raises(ValueError, match='num_images'):
    demo_data.load_demo_images(num_images=0)


def test_write_image_folder_round_trips(tmp_path):
  data_fixtures.write_image_folder(str(tmp_path), num_images=20, crop_size=16)
  images, labels, names = demo_data.load_demo_images(20, crop_size=16)
  assert sorted(os.listdir(tmp_path)) == names
  for i in (0, 7, 19):
    path = tmp_path / names[labels[i]] / f'{i:05d}.png'
    np.testing.assert_array_equal(np.asarray(Image.open(path)), images[i])


def test_needs_neither_tensorflow_nor_scikit_image():
  code = ('import sys; sys.modules["skimage"] = None; '
          'import droppos_jax.data.demo as d; '
          'd.load_demo_images(4, crop_size=8); '
          'assert "tensorflow" not in sys.modules')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, '-c', code], check=True, cwd=root)
