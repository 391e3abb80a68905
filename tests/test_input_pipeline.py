"""Tests for the input pipeline on small image files written here (offline).

Most images are solid colours whose red channel encodes a file id, so an
augmented crop still tells which file it came from.
"""
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from droppos_jax import augment, demo_data
from droppos_jax import input_pipeline as ip

MEAN, STD = np.array(ip.MEAN_RGB), np.array(ip.STDDEV_RGB)


def colour(i, label):
  return (10 + 10 * i, 60 * label, 128)


def solid(i, label, hw):
  return np.broadcast_to(np.array(colour(i, label), np.uint8), hw + (3,))


def ids(batch):
  """File ids of solid-colour images, read back from the red channel."""
  red = batch['image'][..., 0].mean(axis=(1, 2)) * STD[0] + MEAN[0]
  return ((np.round(red) - 10) / 10).astype(int).tolist()


def folder_cfg(path):
  return ml_collections.ConfigDict({'source': 'folder', 'path': str(path)})


@pytest.fixture(scope='module')
def class_folder(tmp_path_factory):
  """18 PNGs of varied shapes in 3 class folders; file id i, label i // 6."""
  root = tmp_path_factory.mktemp('classes')
  for i in range(18):
    label = i // 6
    os.makedirs(root / f'class_{label}', exist_ok=True)
    hw = (20 + 3 * i, 50 - 2 * i)
    Image.fromarray(solid(i, label, hw)).save(
        root / f'class_{label}' / f'{i:02d}.png')
  return root


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def pretrain(cfg, **kwargs):
  kwargs = {'image_size': 16, 'local_batch_size': 3, 'seed': 0, **kwargs}
  return ip.make_pretrain_iterator(cfg, **kwargs)


def test_pretrain_batch_shapes_values_and_labels(class_folder):
  batch = next(pretrain(folder_cfg(class_folder), image_size=(12, 20),
                        local_batch_size=6))
  assert batch['image'].shape == (6, 12, 20, 3)
  assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
  lo, hi = (0 - MEAN) / STD, (255 - MEAN) / STD
  assert np.all(batch['image'] >= lo - 1e-5) and np.all(batch['image'] <= hi + 1e-5)
  # A crop of a solid image is that colour; the label is its folder's index.
  np.testing.assert_allclose(batch['image'] - batch['image'][:, :1, :1], 0,
                             atol=1e-4)
  np.testing.assert_array_equal(batch['label'], [i // 6 for i in ids(batch)])


def test_flat_folder_extensions_and_label_zero(tmp_path):
  for i, ext in enumerate(['png', 'JPG', 'jpeg', 'bmp', 'gif', 'webp', 'PNG']):
    Image.fromarray(solid(i, 0, (24, 24))).save(
        tmp_path / f'{i}.{ext}', format={'jpg': 'JPEG'}.get(ext.lower()))
  (tmp_path / 'notes.txt').write_text('not an image')
  batch = next(pretrain(folder_cfg(tmp_path), local_batch_size=7))
  assert sorted(ids(batch)) == list(range(7))  # Lossy formats are +-1 level.
  np.testing.assert_array_equal(batch['label'], 0)


def test_epochs_cover_the_shard_and_processes_are_disjoint(class_folder):
  seen = []
  for process in range(2):
    it = pretrain(folder_cfg(class_folder), process_index=process,
                  process_count=2)
    epochs = [sum((ids(b) for b in take(it, 3)), []) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]
    assert len(set(epochs[0])) == 9
    seen.append(set(epochs[0]))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(18))


def test_stream_is_a_function_of_the_seed(class_folder):
  a, b, c = (take(pretrain(folder_cfg(class_folder), seed=s), 4)
             for s in (0, 0, 1))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
  assert any(ids(x) != ids(z) for x, z in zip(a, c))


def test_custom_transform_keeps_the_stream_order(class_folder):
  # Fine-tuning swaps the augmentation; the order of examples must not move.
  resize = lambda tf, image, key, hw: tf.image.resize(
      tf.cast(image, tf.float32), hw)
  custom = take(ip.make_train_iterator(
      folder_cfg(class_folder), resize, image_size=4, local_batch_size=3,
      seed=0, require_labels=True), 4)
  for x, y in zip(custom, take(pretrain(folder_cfg(class_folder)), 4)):
    raw_ids = ((np.round(x['image'][..., 0].mean((1, 2))) - 10) / 10).astype(int)
    assert raw_ids.tolist() == ids(y)


def test_augmentation_differs_between_epochs():
  cfg = ml_collections.ConfigDict({'source': 'demo', 'num_images': 1,
                                   'crop_size': 32})
  first, second = take(pretrain(cfg, local_batch_size=1), 2)
  assert not np.allclose(first['image'], second['image'])


@pytest.mark.parametrize('start_step', [1, 5, 6])
def test_resume_reproduces_the_uninterrupted_stream(class_folder, start_step):
  # 18 examples, batches of 4: batches straddle epoch boundaries.
  cfg = folder_cfg(class_folder)
  full = take(pretrain(cfg, local_batch_size=4), 9)
  resumed = take(pretrain(cfg, local_batch_size=4, start_step=start_step),
                 9 - start_step)
  for x, y in zip(full[start_step:], resumed):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


def test_resume_far_ahead_is_cheap(class_folder):
  # Seeking is O(1) for files: step 10^8 (4e7 epochs) starts at once.
  batch = next(pretrain(folder_cfg(class_folder), start_step=10**8))
  assert batch['image'].shape == (3, 16, 16, 3)


def test_demo_source_resume_with_two_processes():
  cfg = ml_collections.ConfigDict({'source': 'demo', 'num_images': 20,
                                   'crop_size': 24})
  kw = dict(local_batch_size=4, process_index=1, process_count=2)
  full = take(pretrain(cfg, **kw), 5)
  resumed = take(pretrain(cfg, start_step=3, **kw), 2)
  for x, y in zip(full[3:], resumed):
    np.testing.assert_array_equal(x['image'], y['image'])


def test_crop_box_follows_random_resized_crop():
  for shape in [(30, 40), (20, 200)]:
    boxes = np.array([[int(v) for v in augment.crop_box(
        tf, tf.constant(shape), tf.constant([k, 7], tf.int64), ip.CROP_SCALE,
        ip.CROP_RATIO)]
                      for k in range(100)])
    top, left, h, w = boxes.T
    assert np.all((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1))
    assert np.all((top + h <= shape[0]) & (left + w <= shape[1]))
    if shape == (30, 40):  # No fallback needed: scale and ratio in range.
      area = h * w / (shape[0] * shape[1])
      assert area.min() > 0.15 and area.max() <= 1
      assert np.all((w / h > 0.6) & (w / h < 1.5))
    else:  # Mostly the centred fallback crop with ratio 4/3.
      assert np.mean((h == 20) & (w == 27)) > 0.5


def test_eval_pads_and_masks_every_process_alike(class_folder):
  seen = []
  for process in range(2):
    batches = list(ip.make_eval_iterator(
        folder_cfg(class_folder), image_size=(8, 12), local_batch_size=4,
        process_index=process, process_count=2))
    assert len(batches) == 3
    mask = np.concatenate([b['mask'] for b in batches])
    np.testing.assert_array_equal(mask, [1.] * 9 + [0.] * 3)
    last = batches[-1]
    assert last['image'].shape == (4, 8, 12, 3) and last['mask'].dtype == np.float32
    np.testing.assert_array_equal(last['image'][1:], 0)
    real = [i for b in batches for i, m in zip(ids(b), b['mask']) if m]
    labels = [l for b in batches for l, m in zip(b['label'], b['mask']) if m]
    assert real == sorted(real) and labels == [i // 6 for i in real]
    seen.append(set(real))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(18))


def test_folder_of_demo_images_matches_demo_source(tmp_path):
  demo_data.write_image_folder(str(tmp_path), num_images=20, crop_size=16)
  demo = ml_collections.ConfigDict({'source': 'demo', 'num_images': 20,
                                    'crop_size': 16})
  eval_batch = lambda cfg: next(ip.make_eval_iterator(
      cfg, image_size=16, local_batch_size=20))
  from_folder, from_demo = eval_batch(folder_cfg(tmp_path)), eval_batch(demo)
  order = sorted(range(20), key=lambda i: (i % 16, i))  # Class, then file.
  np.testing.assert_array_equal(from_folder['label'], from_demo['label'][order])
  np.testing.assert_allclose(from_folder['image'], from_demo['image'][order],
                             atol=1e-5)


def test_configuration_errors(tmp_path, class_folder):
  cases = [
      ({'source': 'hdf5'}, r"source 'hdf5'.*\['demo', 'folder', 'tfds'\]"),
      ({'source': 'folder'}, 'data.path'),
      ({'source': 'folder', 'path': str(tmp_path / 'nope')}, 'not an existing'),
      ({'source': 'folder', 'path': str(tmp_path)}, r'No images.*\.jpg.*\.webp'),
      ({'source': 'demo', 'split': 'test'}, "demo split 'test'"),
  ]
  for cfg, message in cases:
    with pytest.raises(ValueError, match=message):
      ip.validate_data_config(ml_collections.ConfigDict(cfg))
  (tmp_path / 'loose.png').write_bytes(b'')
  (tmp_path / 'sub').mkdir()
  with pytest.raises(ValueError, match='mixes class subfolders'):
    ip.validate_data_config(folder_cfg(tmp_path))
  with pytest.raises(ValueError, match=r'local_batch_size 10 .* reads 9 '):
    pretrain(folder_cfg(class_folder), local_batch_size=10, process_count=2)
  with pytest.raises(ValueError, match=r'process_index 2 is not in \[0, 2\)'):
    pretrain(folder_cfg(class_folder), process_index=2, process_count=2)


def test_corrupt_image_is_named(tmp_path):
  for i in range(8):
    Image.fromarray(solid(i, 0, (16, 16))).save(tmp_path / f'{i}.jpg')
  (tmp_path / '5.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a JPEG')
  # The error surfaces in the batch holding the file, which is re-checked.
  with pytest.raises(ValueError, match=r'decode image file\(s\) \S*/5\.jpg from'):
    take(pretrain(folder_cfg(tmp_path), local_batch_size=2), 4)
  with pytest.raises(ValueError, match=r'decode image file\(s\) \S*/5\.jpg from'):
    list(ip.make_eval_iterator(folder_cfg(tmp_path), image_size=8,
                               local_batch_size=2))


def test_folder_checks_do_not_import_tensorflow(class_folder):
  code = f"""if True:
    import sys, ml_collections
    from droppos_jax import input_pipeline as ip
    cfg = dict(source='folder', path={str(class_folder)!r})
    assert ip.num_train_examples(ml_collections.ConfigDict(cfg)) == 18
    ip.validate_data_config(ml_collections.ConfigDict(dict(source='demo')))
    assert 'tensorflow' not in sys.modules
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, '-c', code], check=True, cwd=root)


def test_global_batches_shard_over_the_data_axis():
  mesh = jax.make_mesh((8,), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  host = [{'image': np.full((16, 4, 4, 3), k, np.float32),
           'label': np.arange(16, dtype=np.int32) + k} for k in range(3)]
  pulled = []
  source = (pulled.append(b) or b for b in host)
  batches = ip.global_batches(source, sharding, prefetch=2)
  first = next(batches)
  assert len(pulled) == 2  # Two in flight before the first step runs.
  assert isinstance(first['image'], jax.Array)
  assert first['image'].shape == (16, 4, 4, 3)
  assert first['image'].sharding.is_equivalent_to(sharding, 4)
  assert [s.data.shape for s in first['label'].addressable_shards] == [(2,)] * 8
  rest = list(batches)
  for batch, expected in zip([first] + rest, host):
    np.testing.assert_array_equal(batch['label'], expected['label'])
  assert len(rest) == 2


# ------------------------------------------------------------------ tfds ---

class TinyColours(tfds.core.GeneratorBasedBuilder):
  """12 train / 5 test solid-colour PNGs, generated offline."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(12),
            'test': self._generate_examples(5)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'image': solid(i, i % 3, (18 + i, 30)), 'label': i % 3}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  TinyColours(data_dir=data_dir).download_and_prepare()
  return data_dir


def tfds_cfg(data_dir, split='train', name='tiny_colours'):
  return ml_collections.ConfigDict(
      {'source': 'tfds', 'name': name, 'data_dir': data_dir, 'split': split})


def test_tfds_pretrain_shards_and_resumes(tfds_dir, monkeypatch):
  monkeypatch.setattr(ip, 'TFDS_SHUFFLE_WINDOW', 4)  # A full and a part window.
  cfg = tfds_cfg(tfds_dir)
  assert ip.num_train_examples(cfg) == 12
  seen = []
  for process in range(2):
    kw = dict(local_batch_size=4, process_index=process, process_count=2)
    full = take(pretrain(cfg, **kw), 5)  # 6 examples a process: 3+ epochs.
    order = sum((ids(b) for b in full), [])
    assert sorted(order[:6]) == sorted(order[6:12]) == sorted(set(order[:6]))
    assert order[:6] != order[6:12]  # Reshuffled every epoch.
    np.testing.assert_array_equal(full[0]['label'], [i % 3 for i in ids(full[0])])
    resumed = take(pretrain(cfg, start_step=2, **kw), 3)
    for x, y in zip(full[2:], resumed):
      np.testing.assert_array_equal(x['image'], y['image'])
    seen.append(set(order))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(12))


def test_stream_is_the_same_in_a_fresh_process(class_folder, tfds_dir):
  # A restart runs in a new process: no hidden TF state may change the stream.
  code = f"""if True:
    import ml_collections, numpy as np, tensorflow as tf
    from droppos_jax import input_pipeline as ip
    tf.random.set_seed(123)  # Hidden TF state must not matter.
    for cfg in [dict(source='folder', path={str(class_folder)!r}),
                dict(source='tfds', name='tiny_colours', data_dir={tfds_dir!r},
                     split='train')]:
      cfg = ml_collections.ConfigDict(cfg)
      it = ip.make_pretrain_iterator(cfg, image_size=16, local_batch_size=4,
                                     seed=0, process_index=1, process_count=2)
      print([float(next(it)['image'].sum()) for _ in range(4)])
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-c', code], check=True, cwd=root,
                       capture_output=True, text=True).stdout.split('\n')
  assert len(out) == 3 and not out[2]
  for line, cfg in zip(out, [folder_cfg(class_folder), tfds_cfg(tfds_dir)]):
    it = pretrain(cfg, local_batch_size=4, process_index=1, process_count=2)
    assert line == str([float(next(it)['image'].sum()) for _ in range(4)])


def test_tfds_eval_pads(tfds_dir):
  batches = list(ip.make_eval_iterator(tfds_cfg(tfds_dir, 'test'), image_size=8,
                                       local_batch_size=2, process_index=1,
                                       process_count=2))
  assert len(batches) == 2  # ceil(ceil(5 / 2) / 2): same for both processes.
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, [1, 1, 0, 0])


def test_tfds_errors(tfds_dir, tmp_path):
  with pytest.raises(ValueError, match="Unknown tfds dataset 'no_such_set'"):
    ip.validate_data_config(tfds_cfg(tfds_dir, name='no_such_set'))
  with pytest.raises(ValueError,
                     match=r"no split 'validation'.*\['test', 'train'\]"):
    ip.validate_data_config(tfds_cfg(tfds_dir, split='validation'))
  with pytest.raises(ValueError, match="'tiny_colours' is not prepared"):
    ip.validate_data_config(tfds_cfg(str(tmp_path)))
  with pytest.raises(ValueError, match='does not exist'):
    ip.validate_data_config(tfds_cfg(str(tmp_path / 'missing')))


def test_demo_crop_seed_gives_other_crops_of_the_same_photos():
  def first_batch(seed):
    cfg = ml_collections.ConfigDict(dict(source='demo', split='train',
                                         num_images=16, crop_size=32, seed=seed))
    return next(ip.make_eval_iterator(cfg, image_size=16, local_batch_size=16))

  a, b = first_batch(0), first_batch(1)
  np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.allclose(a['image'], b['image'])
  np.testing.assert_array_equal(first_batch(1)['image'], b['image'])
