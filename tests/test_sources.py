"""Opening data sources (data/sources.py): sizes and labels known up front,
one-line errors for bad configs, no TensorFlow for folders and the demo."""
import os
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from data_fixtures import (demo_cfg, folder_cfg, prepare_tfds, solid,
                           tfds_cfg, write_class_folder)
from droppos_jax.data import demo, sources
from droppos_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def tfds_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  return {fmt: prepare_tfds(root / fmt, fmt)
          for fmt in ('array_record', 'tfrecord')}


def test_class_folder(tmp_path):
  source = sources.open_source(folder_cfg(write_class_folder(tmp_path)))
  assert source.size == 18 and source.num_classes == 3
  assert source.random_access and source.payload == 'path'
  np.testing.assert_array_equal(source.labels, np.arange(18) // 6)
  paths = source.read(np.array([0, 17]))
  assert paths[0].endswith('class_0/00.png') and paths[1].endswith('class_2/17.png')
  assert 'random access' in source.note


def test_flat_folder_any_extension_label_zero(tmp_path):
  for i, ext in enumerate(['png', 'JPG', 'jpeg', 'bmp', 'gif', 'webp', 'PNG']):
    Image.fromarray(solid(i, 0, (24, 24))).save(
        tmp_path / f'{i}.{ext}', format={'jpg': 'JPEG'}.get(ext.lower()))
  (tmp_path / 'notes.txt').write_text('not an image')
  (tmp_path / '.hidden.png').write_bytes(b'')
  source = sources.open_source(folder_cfg(tmp_path))
  assert source.size == 7 and source.num_classes == 1
  np.testing.assert_array_equal(source.labels, 0)


def test_demo():
  source = sources.open_source(demo_cfg(num_images=20, crop_size=24))
  assert source.size == 20 and source.num_classes == len(demo.CLASS_NAMES)
  assert source.payload == 'pixels' and source.pixels_shape == (24, 24, 3)
  pixels = source.read(np.array([3, 4]))
  assert pixels.shape == (2, 24, 24, 3) and pixels.dtype == np.uint8


def test_tfds_array_record_is_read_by_index(tfds_dirs):
  source = sources.open_source(tfds_cfg(tfds_dirs['array_record']))
  assert source.size == 24 and source.num_classes == 3
  assert source.random_access and source.payload == 'record'
  assert len(source.read(np.array([0, 23]))) == 2
  assert source.note == sources.RANDOM_ACCESS_NOTE


def test_reads_in_flight_is_checked_once_and_only_where_it_applies(
    tfds_dirs, tmp_path):
  cfg = lambda fmt, reads: ml_collections.ConfigDict(dict(
      tfds_cfg(tfds_dirs[fmt]).to_dict(), reads_in_flight=reads))
  assert sources.open_source(tfds_cfg(tfds_dirs['array_record'])
                             ).reads_in_flight == sources.READS_IN_FLIGHT
  assert sources.open_source(cfg('array_record', 8)).reads_in_flight == 8
  for bad in (0, -1, True, 2.5, '8', sources.MAX_READS_IN_FLIGHT + 1):
    with pytest.raises(UserError, match=rf'data.reads_in_flight={bad!r} must '
                       rf'be an integer from 1 to {sources.MAX_READS_IN_FLIGHT}'):
      sources.open_source(cfg('array_record', bad))
  folder = ml_collections.ConfigDict(dict(
      folder_cfg(write_class_folder(tmp_path)).to_dict(), reads_in_flight=8))
  for where, opened in (('tfds tiny_colours:train', cfg('tfrecord', 8)),
                        ('folder', folder)):
    with pytest.raises(UserError, match=r'data.reads_in_flight=8 applies to '
                       rf'TFDS data prepared as ArrayRecord only, not to {where}'):
      sources.open_source(opened)


def test_tfds_tfrecord_lists_its_files(tfds_dirs):
  source = sources.open_source(tfds_cfg(tfds_dirs['tfrecord']))
  assert source.size == 24 and not source.random_access
  assert len(source.files) == 4 and sum(f.take for f in source.files) == 24
  assert source.note.startswith('TFRecord: file order reshuffled every epoch')
  assert 'array_record' in source.note


def test_config_errors(tmp_path, tfds_dirs):
  cases = [
      (dict(source='hdf5'), r"source 'hdf5'.*\['demo', 'folder', 'tfds'\]"),
      (dict(source='folder'), 'data.path must name an image folder'),
      (dict(source='folder', path=str(tmp_path / 'nope')), 'not an existing'),
      (dict(source='folder', path=str(tmp_path)), r'No images.*\.jpg.*\.webp'),
      (dict(source='demo', split='test'), "demo split 'test'"),
      (dict(source='demo', num_images=0), 'num_images must be >= 1'),
      (dict(source='tfds', name='tiny_colours', split=None,
            data_dir=tfds_dirs['tfrecord']), "needs data.name.*data.split"),
  ]
  for cfg, message in cases:
    with pytest.raises(UserError, match=message):
      sources.open_source(ml_collections.ConfigDict(cfg))
  (tmp_path / 'loose.png').write_bytes(b'')
  (tmp_path / 'sub').mkdir()
  with pytest.raises(UserError, match='mixes class subfolders'):
    sources.open_source(folder_cfg(tmp_path))


def test_tfds_errors(tfds_dirs, tmp_path):
  data_dir = tfds_dirs['tfrecord']
  with pytest.raises(UserError, match="Unknown tfds dataset 'no_such_set'"):
    sources.open_source(tfds_cfg(data_dir, name='no_such_set'))
  with pytest.raises(UserError, match=r"no split 'validation'.*\['test', 'train'\]"):
    sources.open_source(tfds_cfg(data_dir, split='validation'))
  with pytest.raises(UserError, match="'tiny_colours' is not prepared"):
    sources.open_source(tfds_cfg(str(tmp_path)))
  with pytest.raises(UserError, match='does not exist'):
    sources.open_source(tfds_cfg(str(tmp_path / 'missing')))


def test_opening_folders_and_the_demo_does_not_import_tensorflow(tmp_path):
  write_class_folder(tmp_path)
  code = f"""if True:
    import sys, ml_collections
    from droppos_jax.data import sources
    cfg = ml_collections.ConfigDict(dict(source='folder', path={str(tmp_path)!r}))
    assert sources.open_source(cfg).size == 18
    sources.open_source(ml_collections.ConfigDict(dict(source='demo')))
    assert 'tensorflow' not in sys.modules
  """
  subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)
