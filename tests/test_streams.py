"""The global training stream and the evaluation stream (data/streams.py):
the same global batches on any host count, a fresh order every epoch,
resume without reading what comes before, errors that name the file."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from data_fixtures import (demo_cfg, folder_cfg, ids, prepare_tfds, solid,
                           tfds_cfg, write_class_folder)
from droppos_jax.data import sources, streams, transforms
from droppos_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return write_class_folder(tmp_path_factory.mktemp('folder'))


@pytest.fixture(scope='module')
def opened(tmp_path_factory, folder):
  """name -> opened Source: folder (18), demo (20), TFDS as ArrayRecord and
  as TFRecord (24 each, 4 files)."""
  root = tmp_path_factory.mktemp('data')
  return {
      'folder': sources.open_source(folder_cfg(folder)),
      'demo': sources.open_source(demo_cfg()),
      'array_record': sources.open_source(tfds_cfg(
          prepare_tfds(root / 'ar', 'array_record'))),
      'tfrecord': sources.open_source(tfds_cfg(
          prepare_tfds(root / 'tr', 'tfrecord'))),
  }


RANDOM_ACCESS = ('folder', 'demo', 'array_record')


def batches(source, n, *, batch=8, rows=None, start_step=0, seed=0, size=8):
  it = streams.train_stream(source, transforms.PRETRAIN, image_size=size,
                            global_batch_size=batch, seed=seed,
                            start_step=start_step, rows=rows)
  return [next(it) for _ in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize('name', RANDOM_ACCESS)
def test_global_batches_are_the_same_for_1_2_and_4_processes(opened, name):
  one = batches(opened[name], 5)
  for count in (2, 4):
    share = 8 // count
    parts = [batches(opened[name], 5, rows=(p * share, (p + 1) * share))
             for p in range(count)]
    for step, whole in enumerate(one):
      for key in whole:
        np.testing.assert_array_equal(
            np.concatenate([part[step][key] for part in parts]), whole[key],
            err_msg=f'{name}, {count} processes, step {step}, {key}')


@pytest.mark.slow
@pytest.mark.parametrize('name', RANDOM_ACCESS)
def test_resume_on_another_host_count_continues_the_stream(opened, name):
  one = batches(opened[name], 6)
  # Steps 3.. on process 1 of 2, then rows of process 0 of 4: both are the
  # rows of the uninterrupted one-process batches.
  second_half = batches(opened[name], 3, rows=(4, 8), start_step=3)
  first_quarter = batches(opened[name], 3, rows=(0, 2), start_step=3)
  for i, step in enumerate(range(3, 6)):
    np.testing.assert_array_equal(second_half[i]['image'],
                                  one[step]['image'][4:])
    np.testing.assert_array_equal(first_quarter[i]['image'],
                                  one[step]['image'][:2])


@pytest.mark.slow
def test_reads_in_flight_give_the_batches_of_one_read_per_batch(opened):
  """Reads in flight over the batches ahead (ArrayRecord; 3 threads, so
  that up to 4 batches are read ahead) give the rows of the batches that one
  read call per batch in the stream's generator gives: on 1, 2 and 4
  processes, from a resume, and in evaluation."""
  as_read = lambda reads: dataclasses.replace(opened['array_record'],
                                              reads_in_flight=reads)
  today = batches(as_read(0), 6)
  for count, start_step in ((1, 0), (2, 0), (4, 0), (2, 3)):
    share = 8 // count
    for p in range(count):
      rows = slice(p * share, (p + 1) * share)
      ahead = batches(as_read(3), 6 - start_step, rows=(rows.start, rows.stop),
                      start_step=start_step)
      for step, got in enumerate(ahead, start_step):
        for key in got:
          np.testing.assert_array_equal(
              got[key], today[step][key][rows], err_msg=f'{count} processes, '
              f'from step {start_step}, step {step}, {key}')
  for rows in ((0, 2), (2, 4)):
    ahead, one_read = (eval_ids(as_read(r), rows)[0] for r in (3, 0))
    assert len(ahead) == len(one_read) == 6
    for a, b in zip(ahead, one_read):
      for key in b:
        np.testing.assert_array_equal(a[key], b[key])


def epochs_of(source, epochs=2):
  """Record ids of whole epochs of a one-process stream (batch divides n)."""
  size = 6 if source.size % 6 == 0 else 4 if source.size % 4 == 0 else 2
  steps = source.size // size
  seen = sum((ids(b['image']) for b in batches(source, epochs * steps,
                                                 batch=size)), [])
  return [seen[e * source.size:(e + 1) * source.size] for e in range(epochs)]


@pytest.mark.parametrize('name', ['folder', 'array_record', 'tfrecord'])
def test_every_epoch_is_a_fresh_permutation(opened, name):
  first, second = epochs_of(opened[name])
  assert sorted(first) == sorted(second) == list(range(opened[name].size))
  assert first != second and first != sorted(first)


def test_every_epoch_of_the_demo_is_a_fresh_permutation():
  # Demo crops carry no id: epochs are compared through the record order.
  orders = [streams.epoch_order(0, e, 20) for e in range(3)]
  assert all(sorted(o) == list(range(20)) for o in orders)
  assert not np.array_equal(orders[0], orders[1])
  assert not np.array_equal(orders[1], orders[2])
  np.testing.assert_array_equal(streams.epoch_order(0, 1, 20), orders[1])
  assert not np.array_equal(streams.epoch_order(1, 1, 20), orders[1])


def test_augmentation_differs_between_epochs():
  source = sources.open_source(demo_cfg(num_images=1, crop_size=32))
  first, second = batches(source, 2, batch=1)
  assert not np.array_equal(first['image'], second['image'])


@pytest.mark.slow
@pytest.mark.parametrize('name', ['folder', 'array_record', 'tfrecord'])
@pytest.mark.parametrize('start_step', [1, 5])
def test_resume_reproduces_the_uninterrupted_stream(opened, name, start_step):
  # Batches of 7 straddle epoch boundaries (18 or 24 records).
  full = batches(opened[name], 7, batch=7)
  resumed = batches(opened[name], 7 - start_step, batch=7,
                    start_step=start_step)
  for x, y in zip(full[start_step:], resumed):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


@pytest.mark.slow
def test_tfrecord_processes_read_disjoint_files_and_resume(opened):
  source = opened['tfrecord']
  per_process = []
  for p in range(2):
    full = batches(source, 6, rows=(2 * p, 2 * p + 2), batch=4)
    resumed = batches(source, 3, rows=(2 * p, 2 * p + 2), batch=4,
                      start_step=3)
    for x, y in zip(full[3:], resumed):
      np.testing.assert_array_equal(x['image'], y['image'])
    per_process.append(set(sum((ids(b['image']) for b in full), [])))
  assert not per_process[0] & per_process[1]
  assert per_process[0] | per_process[1] == set(range(24))


def test_random_access_resume_far_ahead_reads_one_batch(opened):
  read = []

  def counted(indices, read_fn=opened['folder'].read):
    read.append(len(indices))
    return read_fn(indices)
  source = dataclasses.replace(opened['folder'], read=counted)
  batch = batches(source, 1, batch=6, start_step=10**8)[0]
  assert batch['image'].shape == (6, 8, 8, 3)
  assert sum(read) <= 6 * 8  # the first batch plus tf.data's read-ahead


def test_tfrecord_resume_does_not_read_the_records_before(tmp_path,
                                                          monkeypatch):
  """16 files of 25 records: resuming at position 750 (epoch 1, record 350)
  reads at most the file it lands in, plus tf.data's read-ahead."""
  data_dir = prepare_tfds(tmp_path, 'tfrecord', num_shards=16, num_train=400)
  source = sources.open_source(tfds_cfg(data_dir))
  assert len(source.files) == 16
  monkeypatch.setattr(sources, 'TFRECORD_CYCLE', 1)
  counter = tf.Variable(0, dtype=tf.int64)
  original = tf.data.TFRecordDataset

  def counting(path, *args, **kwargs):
    return original(path, *args, **kwargs).map(
        lambda r: (counter.assign_add(1), r)[1])
  monkeypatch.setattr(tf.data, 'TFRecordDataset', counting)
  batch = batches(source, 1, batch=10, start_step=75)[0]
  assert batch['image'].shape == (10, 8, 8, 3)
  assert 10 <= int(counter.numpy()) < 150, int(counter.numpy())


def documented_tfrecord_order(source, seed, process, count, n):
  """The first n records of process `process` of `count`, restated from the
  order streams.py documents: per epoch a keyed file order, every count-th
  file this process's; rounds of TFRECORD_CYCLE files read round-robin;
  windows of TFRECORD_WINDOW records of a round, each in a keyed order."""
  contents = [list(tf.data.TFRecordDataset(f.path).skip(f.skip).take(f.take)
                   .as_numpy_iterator()) for f in source.files]
  base = tf.constant([seed, streams._WINDOW_TAG], tf.int64)  # pylint: disable=protected-access
  out = []
  for epoch in range(n):
    mine = streams.epoch_order(seed, epoch, len(contents))[process::count]
    for number, start in enumerate(range(0, len(mine),
                                         sources.TFRECORD_CYCLE)):
      queues = [list(contents[i]) for i in
                mine[start:start + sources.TFRECORD_CYCLE]]
      interleaved = []
      while any(queues):
        interleaved += [q.pop(0) for q in queues if q]
      for index, first in enumerate(range(0, len(interleaved),
                                          sources.TFRECORD_WINDOW)):
        window = interleaved[first:first + sources.TFRECORD_WINDOW]
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(window)),
            seed=transforms.fold(base, epoch, number, index)).numpy()
        out += [window[i] for i in order]
      if len(out) >= n:
        return out[:n]


@pytest.mark.slow
def test_tfrecord_records_come_in_the_documented_order(tmp_path, monkeypatch):
  """16 files of 25 records, windows of 16: the read stage of 1, 2 and 4
  processes, and of a resume, gives the documented records at the
  documented global positions, across windows, rounds and epochs."""
  monkeypatch.setattr(sources, 'TFRECORD_WINDOW', 16)
  source = sources.open_source(tfds_cfg(prepare_tfds(
      tmp_path, 'tfrecord', num_shards=16, num_train=400)))
  global_batch, steps = 8, 60  # 480 records: more than an epoch per process
  for count, start_step in ((1, 0), (2, 0), (4, 0), (2, 7)):
    size = global_batch // count
    for p in range(count):
      rows = (p * size, (p + 1) * size)
      got = list(streams._file_records(  # pylint: disable=protected-access
          source, 5, start_step, global_batch, rows).take(
              (steps - start_step) * size).as_numpy_iterator())
      want = documented_tfrecord_order(source, 5, p, count, steps * size)
      assert [r for _, r, _ in got] == want[start_step * size:], (count, p)
      q = np.arange(start_step * size, steps * size)
      np.testing.assert_array_equal(
          [position for position, _, _ in got],
          q // size * global_batch + rows[0] + q % size)


@pytest.mark.slow
def test_stream_is_the_same_in_a_fresh_process(opened, folder):
  # A restart is a new process: no hidden TF state may change the stream.
  code = f"""if True:
    import sys; sys.path.insert(0, 'tests')
    import tensorflow as tf
    from data_fixtures import folder_cfg
    from droppos_jax.data import sources, streams, transforms
    tf.random.set_seed(123)
    source = sources.open_source(folder_cfg({str(folder)!r}))
    it = streams.train_stream(source, transforms.PRETRAIN, image_size=8,
                              global_batch_size=8, seed=0, rows=(4, 8))
    print([int(next(it)['image'].astype(int).sum()) for _ in range(3)])
  """
  out = subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO,
                       capture_output=True, text=True, timeout=120).stdout.strip()
  here = batches(opened['folder'], 3, rows=(4, 8))
  assert out == str([int(b['image'].astype(int).sum()) for b in here])


@pytest.mark.slow
def test_a_script_holding_a_stream_exits(folder):
  # Left open at exit while tf.data still calls the source's reader (a slow
  # read makes that certain), a stream used to hang the interpreter's exit
  # for ever: its iterator's destructor waited for threads that could no
  # longer take the GIL.
  code = f"""if True:
    import dataclasses, sys, time
    sys.path.insert(0, 'tests')
    from data_fixtures import folder_cfg
    from droppos_jax.data import sources, streams, transforms
    source = sources.open_source(folder_cfg({str(folder)!r}))
    def slow_read(indices, read=source.read):
      time.sleep(0.3)
      return read(indices)
    source = dataclasses.replace(source, read=slow_read)
    stream = streams.train_stream(source, transforms.PRETRAIN, image_size=8,
                                  global_batch_size=8, seed=0)
    next(stream)
  """
  subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO,
                 capture_output=True, timeout=60)


def test_batches_are_uint8_with_labels(opened):
  batch = batches(opened['folder'], 1, batch=6, size=(12, 20))[0]
  assert batch['image'].shape == (6, 12, 20, 3)
  assert batch['image'].dtype == np.uint8 and batch['label'].dtype == np.int32
  # A crop of a solid image is that colour; the label is its folder's index.
  assert np.all(batch['image'] == batch['image'][:, :1, :1])
  np.testing.assert_array_equal(batch['label'],
                                [i // 6 for i in ids(batch['image'])])
  tfds_batch = batches(opened['array_record'], 1, batch=6)[0]
  np.testing.assert_array_equal(tfds_batch['label'],
                                [i % 3 for i in ids(tfds_batch['image'])])


@pytest.mark.slow
def test_device_resize_batches_are_padded_windows_of_the_global_stream(
    opened):
  """With device_resize_window: each row is its crop window, zero beyond
  `window_hw`, of the same global stream on 1 and 2 processes."""
  augment = transforms.TrainAugment(device_resize_window=40)
  run = lambda rows: next(streams.train_stream(
      opened['folder'], augment, image_size=8, global_batch_size=8, seed=0,
      rows=rows))
  whole = run(None)
  assert sorted(whole) == ['flip', 'label', 'window', 'window_hw']
  assert whole['window'].shape == (8, 40, 40, 3)
  assert whole['window'].dtype == np.uint8
  for window, (h, w) in zip(whole['window'], whole['window_hw']):
    assert 1 <= h <= 40 and 1 <= w <= 40
    assert np.all(window[:h, :w, 2] == 128)   # every colour has blue 128
    assert not window[h:].any() and not window[:, w:].any()
  halves = [run((0, 4)), run((4, 8))]
  for key in whole:
    np.testing.assert_array_equal(
        np.concatenate([half[key] for half in halves]), whole[key])


@pytest.mark.slow
def test_corrupt_image_is_named(tmp_path):
  for i in range(8):
    Image.fromarray(solid(i, 0, (16, 16))).save(tmp_path / f'{i}.jpg')
  (tmp_path / '5.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a JPEG')
  source = sources.open_source(folder_cfg(tmp_path))
  with pytest.raises(UserError, match=r'decode image\(s\) \S*/5\.jpg of folder'):
    batches(source, 4, batch=2)
  with pytest.raises(UserError, match=r'decode image\(s\) \S*/5\.jpg of folder'):
    list(streams.eval_stream(source, image_size=8, global_batch_size=2))


def eval_ids(source, rows, batch=4, **kw):
  out = list(streams.eval_stream(source, image_size=(8, 12),
                                 global_batch_size=batch, rows=rows, **kw))
  return out, [i for b in out for i, m in zip(ids(b['image']), b['mask']) if m]


@pytest.mark.parametrize('name', ['folder', 'tfrecord'])
def test_eval_covers_the_split_once_with_equal_padded_batches(opened, name):
  source = opened[name]
  seen = []
  for rows in ((0, 2), (2, 4)):
    out, real = eval_ids(source, rows)
    # Random access: global batches of 4 over 18; TFRecord: each process
    # reads its half of the 24 records, 2 a batch.
    assert len(out) == (5 if name == 'folder' else 6)
    for b in out:
      assert b['image'].shape == (2, 8, 12, 3) and b['mask'].dtype == np.float32
      np.testing.assert_array_equal(b['image'][b['mask'] == 0], 0)
    labels = [l for b in out for l, m in zip(b['label'], b['mask']) if m]
    assert labels == [i // 6 if name == 'folder' else i % 3 for i in real]
    seen += real
  assert sorted(seen) == list(range(source.size))


def test_eval_of_the_first_examples_only(opened):
  out, real = eval_ids(opened['folder'], None, batch=4, num_examples=6)
  assert len(out) == 2 and sorted(real) == list(range(6))
  np.testing.assert_array_equal(np.concatenate([b['mask'] for b in out]),
                                [1] * 6 + [0] * 2)


def test_bad_arguments(opened):
  folder = opened['folder']
  with pytest.raises(UserError, match=r'rows \(3, 2\) must satisfy'):
    batches(folder, 1, rows=(3, 2))
  with pytest.raises(UserError, match='start_step must be >= 0'):
    batches(folder, 1, start_step=-1)
  with pytest.raises(UserError, match=r'image_size=0; expected a positive '
                     r'int or \(height, width\)'):
    batches(folder, 1, size=0)
  with pytest.raises(UserError, match='TFRecord file.*fewer than the 8'):
    batches(opened['tfrecord'], 1, rows=(0, 1))
  unlabelled = sources.Source(description='x', size=4, num_classes=None,
                              payload='path', note='', read=lambda i: i)
  with pytest.raises(UserError, match='x has no labels to evaluate'):
    next(streams.eval_stream(unlabelled, image_size=8, global_batch_size=2))
