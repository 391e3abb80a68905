"""Offline demo dataset: seeded crops of a few public-domain photos shipped
with the package (droppos_jax/data/demo_photos/, sources and licences in its
README.md; benchmarks/make_demo_photos.py regenerates them from scikit-image).

It gives the CPU demo and the tests real photographs without any download, and
a small labelled task (label = source photo) for probes. The splits are
disjoint in pixels, not just in samples: 'val' crops come from a band across
the middle of each photo (HELD_OUT, along its longer side), where the subject
usually is, and 'train' crops from the parts on either side of it; no crop
straddles a boundary. No TensorFlow here: the input pipeline wraps these
arrays itself.
"""
from __future__ import annotations

import functools
import io

from etils import epath
import numpy as np
from PIL import Image

from droppos_jax.errors import UserError

PHOTO_DIR = epath.Path(__file__).parent / 'demo_photos'
# Sorted, so that a class's index is also its rank among class folder
# names (the folder source labels classes that way).
CLASS_NAMES = (
    'astronaut', 'brick', 'camera', 'chelsea', 'coffee', 'retina', 'rocket')
DEFAULT_NUM_IMAGES = {'train': 512, 'val': 128}
# The 'val' band, as fractions of the photo's longer side.
HELD_OUT = (0.375, 0.625)
# Crop side as a fraction of the shorter side of the part it is cut from:
# varied for training; for 'val' nearly the whole band, so that pictures
# show as much of the held-out object as a crop can.
CROP_SIDE = {'train': (0.3, 1.0), 'val': (0.8, 1.0)}


@functools.cache
def _photo(name: str) -> np.ndarray:
  """The named photo as uint8 [H, W, 3] (gray photos repeated to 3 channels)."""
  image = Image.open(io.BytesIO((PHOTO_DIR / f'{name}.jpg').read_bytes()))
  return np.asarray(image.convert('RGB'), np.uint8)


def _parts(photo: np.ndarray, split: str) -> list[np.ndarray]:
  """The non-empty parts of `photo` that crops of `split` may come from."""
  axis = 0 if photo.shape[0] > photo.shape[1] else 1
  cuts = [int(round(photo.shape[axis] * f)) for f in HELD_OUT]
  before, band, after = np.split(photo, cuts, axis=axis)
  parts = [band] if split == 'val' else [before, after]
  return [p for p in parts if p.shape[axis] > 0]


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


def _crop(parts: list[np.ndarray], side_range: tuple[float, float],
          rng: np.random.Generator) -> np.ndarray:
  """A random square crop of one of `parts` (picked in proportion to area)."""
  areas = np.array([p.shape[0] * p.shape[1] for p in parts], np.float64)
  part = parts[rng.choice(len(parts), p=areas / areas.sum())]
  h, w = part.shape[:2]
  side = max(1, int(round(min(h, w) * rng.uniform(*side_range))))
  top, left = rng.integers(h - side + 1), rng.integers(w - side + 1)
  return part[top:top + side, left:left + side]


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
    parts = _parts(_photo(CLASS_NAMES[label]), split)
    crop = Image.fromarray(_crop(parts, CROP_SIDE[split], rng))
    images[i] = np.asarray(crop.resize((crop_size, crop_size),
                                       Image.Resampling.BICUBIC))
  return images, labels, list(CLASS_NAMES)
