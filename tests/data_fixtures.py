"""Small data sets the input-pipeline tests write themselves (offline).

Most images are solid colours whose red channel encodes an id, so an
augmented crop still tells which record it came from.
"""
import io
import os

from etils import epath
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from droppos_jax.data import demo, device


def colour(i, label):
  """Ids 0..23 are told apart by ids(); larger ones repeat colours."""
  return (10 + 10 * (i % 24), 60 * label, 128)


def solid(i, label, hw):
  return np.broadcast_to(np.array(colour(i, label), np.uint8), hw + (3,))


def ids(images):
  """Ids of solid-colour uint8 images [B, h, w, 3], from the red channel."""
  red = np.asarray(images)[..., 0].astype(float).mean(axis=(1, 2))
  return ((np.round(red) - 10) / 10).astype(int).tolist()


def normalised_ids(images):
  """ids() of normalised float images."""
  red = np.asarray(images)[..., 0].mean(axis=(1, 2)) * device.STDDEV_RGB[0]
  return ((np.round(red + device.MEAN_RGB[0]) - 10) / 10).astype(int).tolist()


def write_class_folder(root, num=18, per_class=6):
  """`num` PNGs of varied shapes in class folders; id i, label i // per_class."""
  for i in range(num):
    label = i // per_class
    os.makedirs(root / f'class_{label}', exist_ok=True)
    Image.fromarray(solid(i, label, (20 + 3 * i, 50 - 2 * i))).save(
        root / f'class_{label}' / f'{i:02d}.png')
  return root


def folder_cfg(path):
  return ml_collections.ConfigDict({'source': 'folder', 'path': str(path)})


def demo_cfg(num_images=20, crop_size=24, **kw):
  return ml_collections.ConfigDict(dict(source='demo', num_images=num_images,
                                        crop_size=crop_size, **kw))


class TinyColours(tfds.core.GeneratorBasedBuilder):
  """`num_train` (24) train / 5 test solid-colour PNGs, generated offline;
  example i has label i % 3."""
  VERSION = tfds.core.Version('1.0.0')
  num_train = 24
  num_test = 5

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(self.num_train),
            'test': self._generate_examples(self.num_test)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'image': solid(i, i % 3, (18 + i, 30)), 'label': i % 3}


def prepare_tfds(data_dir, file_format, num_shards=4, num_train=24):
  """TinyColours in `file_format` ('array_record' or 'tfrecord'), `num_shards`
  files per split."""
  builder = TinyColours(data_dir=str(data_dir), file_format=file_format)
  builder.num_train = num_train
  builder.num_test = max(5, num_shards)  # tfds wants a record per file
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=num_shards))
  return str(data_dir)


def tfds_cfg(data_dir, split='train', name='tiny_colours'):
  return ml_collections.ConfigDict(
      {'source': 'tfds', 'name': name, 'data_dir': data_dir, 'split': split})


def write_image_folder(directory: str, **kwargs) -> str:
  """Writes `demo.load_demo_images(**kwargs)` as <directory>/<class>/<i>.png.

  The folder source reads it back with the same labels, which makes it an
  offline stand-in for an ImageNet-style folder.
  """
  images, labels, names = demo.load_demo_images(**kwargs)
  for i, (image, label) in enumerate(zip(images, labels)):
    class_dir = epath.Path(directory) / names[label]
    class_dir.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format='PNG')
    (class_dir / f'{i:05d}.png').write_bytes(png.getvalue())
  return directory
