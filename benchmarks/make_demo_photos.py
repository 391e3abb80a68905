r"""Regenerates the demo photos shipped in droppos_jax/data/demo_photos/.

  pip install scikit-image==0.26.0 && python benchmarks/make_demo_photos.py

Reads the public-domain / CC0 photos bundled with scikit-image (sources and
licences: droppos_jax/data/demo_photos/README.md), shrinks each so that its
longer side is LONGER_SIDE pixels (Lanczos) and writes them as JPEGs (quality
JPEG_QUALITY). Only this script needs scikit-image; the demo reads the JPEGs.
"""
import argparse
import os

import numpy as np
from PIL import Image

from droppos_jax.data import demo

LONGER_SIDE = 256
JPEG_QUALITY = 90


def skimage_photo(name: str) -> np.ndarray:
  """The photo `name` of skimage.data as uint8 [H, W] or [H, W, 3]."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  return np.asarray(getattr(data, name)(), np.uint8)


def shrink(photo: np.ndarray, longer_side: int = LONGER_SIDE) -> np.ndarray:
  image = Image.fromarray(photo)
  scale = longer_side / max(image.size)
  size = tuple(max(1, round(s * scale)) for s in image.size)
  return np.asarray(image.resize(size, Image.Resampling.LANCZOS))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--output', default=str(demo.PHOTO_DIR))
  args = parser.parse_args()
  for name in demo.CLASS_NAMES:
    path = os.path.join(args.output, f'{name}.jpg')
    Image.fromarray(shrink(skimage_photo(name))).save(
        path, quality=JPEG_QUALITY, optimize=True)
    print(f'wrote {path} ({os.path.getsize(path) // 1024} KiB)')


if __name__ == '__main__':
  main()
