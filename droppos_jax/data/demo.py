"""Offline demo dataset: seeded crops of the photos that ship inside scikit-image.

It gives the CPU demo and the tests real photographs without any download, and
a small labelled task (label = source photo) for probes. The splits are
disjoint in pixels, not just in samples: 'train' crops come from the first 75%
of each photo along its longer side and 'val' crops from the held-out rest.
Only photos bundled with scikit-image are used (the others need `pooch` and
a download); `skimage.data.cat` is left out because it is `chelsea` again.
No TensorFlow here: the input pipeline wraps these arrays itself.
"""
from __future__ import annotations

import functools
import io

from etils import epath
import numpy as np
from PIL import Image

from droppos_jax.errors import UserError

# Sorted, so that a class's index is also its rank among the folder names
# `write_image_folder` creates (the folder source labels classes that way).
CLASS_NAMES = (
    'astronaut', 'brick', 'camera', 'cell', 'chelsea', 'clock', 'coffee',
    'coins', 'grass', 'gravel', 'hubble_deep_field', 'immunohistochemistry',
    'moon', 'motorcycle', 'retina', 'rocket')
DEFAULT_NUM_IMAGES = {'train': 512, 'val': 128}
TRAIN_FRACTION = 0.75
# Crop side as a fraction of the shorter side of the split's region.
CROP_SIDE = (0.3, 1.0)


@functools.cache
def _photo(name: str) -> np.ndarray:
  """The named photo as uint8 [H, W, 3] (gray photos repeated to 3 channels)."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  if name == 'clock':
    photo = data.clock()
  elif name == 'motorcycle':
    photo = data.stereo_motorcycle()[0]
  else:
    photo = getattr(data, name)()
  photo = np.asarray(photo, np.uint8)
  if photo.ndim == 2:
    photo = np.repeat(photo[..., None], 3, axis=-1)
  return photo


def _region(photo: np.ndarray, split: str) -> np.ndarray:
  """The part of `photo` that crops of `split` may come from."""
  axis = 0 if photo.shape[0] > photo.shape[1] else 1
  cut = int(round(photo.shape[axis] * TRAIN_FRACTION))
  return np.split(photo, [cut], axis=axis)[0 if split == 'train' else 1]


def check_args(split: str = 'train', num_images: int | None = None,
               crop_size: int = 96) -> int:
  """Validates the arguments cheaply (no photo is read); returns the size."""
  if split not in DEFAULT_NUM_IMAGES:
    raise UserError(f'Unknown demo split {split!r}; valid splits are '
                     f'{sorted(DEFAULT_NUM_IMAGES)}.')
  num_images = DEFAULT_NUM_IMAGES[split] if num_images is None else num_images
  if int(num_images) < 1:
    raise UserError(f'Demo num_images must be >= 1, got {num_images}.')
  if int(crop_size) < 1:
    raise UserError(f'Demo crop_size must be >= 1, got {crop_size}.')
  return int(num_images)


def load_demo_images(num_images: int | None = None, crop_size: int = 96,
                     seed: int = 0, split: str = 'train'
                     ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Seeded square crops -> (images uint8 [M, S, S, 3], labels int32 [M], names).

  Image i shows photo i % num_classes, so every prefix is class-balanced. The
  result is a pure function of the arguments; the splits never share pixels.
  """
  num_images = check_args(split, num_images, crop_size)
  rng = np.random.default_rng([seed, list(DEFAULT_NUM_IMAGES).index(split)])
  labels = np.arange(num_images, dtype=np.int32) % len(CLASS_NAMES)
  images = np.empty((num_images, crop_size, crop_size, 3), np.uint8)
  for i, label in enumerate(labels):
    region = _region(_photo(CLASS_NAMES[label]), split)
    h, w = region.shape[:2]
    side = max(1, int(round(min(h, w) * rng.uniform(*CROP_SIDE))))
    top, left = rng.integers(h - side + 1), rng.integers(w - side + 1)
    crop = Image.fromarray(region[top:top + side, left:left + side])
    images[i] = np.asarray(crop.resize((crop_size, crop_size),
                                       Image.Resampling.BICUBIC))
  return images, labels, list(CLASS_NAMES)


def write_image_folder(directory: str, **kwargs) -> str:
  """Writes `load_demo_images(**kwargs)` as <directory>/<class>/<i>.png.

  The folder source reads it back with the same labels, which makes it an
  offline stand-in for an ImageNet-style folder.
  """
  images, labels, names = load_demo_images(**kwargs)
  for i, (image, label) in enumerate(zip(images, labels)):
    class_dir = epath.Path(directory) / names[label]
    class_dir.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format='PNG')
    (class_dir / f'{i:05d}.png').write_bytes(png.getvalue())
  return directory
