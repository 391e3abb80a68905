"""Resumable tf.data streams of host batches from an opened source.

One global stream. Training example k (its global position) is record
order_e[k mod n] of epoch e = k // n, where order_e = `epoch_order(seed, e,
n)` is a fresh permutation of the n records every epoch, and its
augmentation is drawn from stateless ops keyed by (seed, k). Global batch s
holds positions [s B, (s + 1) B); a process feeds rows [row_start, row_stop)
of it. So 1, 2 or 8 hosts feed identical global batches, and a run resumes
at step s on any host count by starting at position s B, which for
random-access sources (folder, demo, TFDS ArrayRecord) costs nothing.
Where a record read is a storage request (ArrayRecord), threads read the
records of the batches ahead, `source.reads_in_flight` requests at a time,
and the batches come out in step order: the stream is the same.

TFDS data in TFRecord files cannot be read by index. Each process then reads
its share of the files: per epoch the file order is a permutation keyed by
(seed, epoch) and process p takes every P-th file; rounds of
sources.TFRECORD_CYCLE files are interleaved and their records shuffled in
windows of sources.TFRECORD_WINDOW (stateless keys). A resume skips whole
files and reads, without decoding, at most one round. The order depends on
the host count (the source's `note` says so in the log).

Streams yield uint8 images; device.global_batches normalises them on the
accelerators.
"""
from __future__ import annotations

import atexit
import collections
from concurrent import futures
import itertools
from typing import Callable, Iterator, Sequence
import weakref

from absl import logging
import numpy as np
import tensorflow as tf

from droppos_jax import settings
from droppos_jax.data import sources, transforms
from droppos_jax.errors import UserError

_FOREVER = 2**62
_WINDOW_TAG = 1  # folded into the seed for TFRecord window shuffles
# Records one read task takes, one after another: fewer hand-offs between
# threads per record (less CPU) for twice the records read ahead.
_READ_CHUNK = 2
# TFRecord records each file reads ahead: at 25,000 records/s from 4 files, a
# 30 ms request's worth is about 190 records per file.
_FILE_READ_AHEAD = 256


def check_rows(rows: tuple[int, int] | None,
               global_batch_size: int) -> tuple[int, int]:
  """(row_start, row_stop) of each global batch this process feeds."""
  if global_batch_size < 1:
    raise UserError(f'global_batch_size must be >= 1, got {global_batch_size}.')
  start, stop = (0, global_batch_size) if rows is None else map(int, rows)
  if not 0 <= start < stop <= global_batch_size:
    raise UserError(f'rows {rows} must satisfy 0 <= start < stop <= '
                    f'{global_batch_size} (the global batch size).')
  return start, stop


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """splitmix64 of state `x`: a fixed, well-mixed hash of uint64."""
  with np.errstate(over='ignore'):
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
  """The permutation of records [0, size) in epoch `epoch`: indices sorted
  by a hash of (seed, epoch, index), the same on every platform and numpy
  version."""
  with np.errstate(over='ignore'):
    key = _splitmix64(_splitmix64(np.uint64(seed % 2**64)) ^ np.uint64(epoch))
    return np.argsort(
        _splitmix64(key ^ (np.arange(size, dtype=np.uint64) * _GOLDEN)),
        kind='stable')


def _global_positions(step: int, global_batch_size: int,
                      rows: tuple[int, int]) -> np.ndarray:
  return step * global_batch_size + np.arange(*rows, dtype=np.int64)


def _record_indices(positions: np.ndarray, seed: int, size: int,
                    orders: dict[int, np.ndarray] | None = None) -> np.ndarray:
  """Records at global stream positions; `orders` caches epoch orders."""
  orders = {} if orders is None else orders
  epochs, offsets = np.divmod(positions, size)
  indices = np.empty_like(positions)
  for epoch in np.unique(epochs).tolist():
    if epoch not in orders:
      orders.clear()  # Streams move forward: keep the current epoch only.
      orders[epoch] = epoch_order(seed, epoch, size)
    here = epochs == epoch
    indices[here] = orders[epoch][offsets[here]]
  return indices


def _payload_spec(source: sources.Source, rows: int) -> tf.TensorSpec:
  if source.payload == 'pixels':
    return tf.TensorSpec((rows, *source.pixels_shape), tf.uint8)
  return tf.TensorSpec((rows,), tf.string)


def _decodable(source: sources.Source, payload, label):
  """(image bytes or pixels, whether encoded, int32 label) of one record."""
  if source.payload == 'path':
    return tf.io.read_file(payload), True, label
  if source.payload == 'record':
    image, label = source.parse(payload)
    return image, True, tf.cast(label, tf.int32)
  return payload, False, label


def _undecodable(source: sources.Source, indices: Sequence[int]) -> list[str]:
  """Names of the records among `indices` whose image does not decode."""
  bad = []
  for index in dict.fromkeys(int(i) for i in indices):
    payload = source.read(np.array([index]))[0]
    try:
      image, encoded, _ = _decodable(source, tf.constant(payload), -1)
      if encoded:
        transforms.decode(image)
    except tf.errors.InvalidArgumentError:
      bad += source.record_names([index])
  return bad


# A tf.data iterator still alive when Python finalises hangs the exit: its
# destructor waits for from_generator calls on threads that can no longer take
# the GIL. Streams still open at exit are closed first, while those can.
_open_streams = weakref.WeakSet()
atexit.register(lambda: [stream.close() for stream in list(_open_streams)])


def _numpy_batches(ds: tf.data.Dataset,
                   describe_failure: Callable[[int], str]) -> Iterator[dict]:
  """Numpy batches; a decode error raises UserError naming what failed."""
  batches = _numpy_batches_of(ds, describe_failure)
  _open_streams.add(batches)
  return batches


def _numpy_batches_of(ds, describe_failure):
  iterator = ds.as_numpy_iterator()
  for i in itertools.count():
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as err:
      raise UserError(describe_failure(i)) from err
    yield batch


def _failure_message(source: sources.Source, bad: list[str], where: str) -> str:
  if bad:
    return (f'Could not decode image(s) {", ".join(bad)} of '
            f'{source.description}; remove or replace them.')
  return (f'Could not decode an image of {source.description} in {where} '
          '(see the TensorFlow error above).')


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


# ----------------------------------------------------------------- train ---

def _read_ahead(source: sources.Source, batches: Iterator[tuple]
                ) -> Iterator[tuple]:
  """(source.read(indices), *rest) for each (indices, *rest) of `batches`,
  in order. With `source.reads_in_flight` = T, T threads read the records of
  the batches ahead, _READ_CHUNK per task, so that T storage requests are in
  flight while the stream consumes the oldest batch."""
  if not source.reads_in_flight:
    for indices, *rest in batches:
      yield source.read(indices), *rest
    return
  pool = futures.ThreadPoolExecutor(source.reads_in_flight,
                                    thread_name_prefix='read')
  pending = collections.deque()  # (one future per chunk, rest) of each batch
  waiting = 0  # records submitted and not yet yielded

  def oldest():
    nonlocal waiting
    chunks, rest = pending.popleft()
    payloads = np.concatenate([chunk.result() for chunk in chunks])
    waiting -= len(payloads)
    return payloads, *rest

  try:
    for indices, *rest in batches:
      pending.append(([pool.submit(source.read, indices[i:i + _READ_CHUNK])
                       for i in range(0, len(indices), _READ_CHUNK)], rest))
      waiting += len(indices)
      # Wait for the oldest batch only once every thread has a chunk to read.
      while waiting > source.reads_in_flight * _READ_CHUNK:
        yield oldest()
    while pending:
      yield oldest()
  finally:  # also when the stream is closed: drop the reads not started
    pool.shutdown(wait=False, cancel_futures=True)


def _indexed_records(source, seed, start_step, global_batch_size, rows):
  """(global position, payload, label) of this process's rows, by index."""
  def steps():
    orders = {}
    for step in itertools.count(start_step):
      positions = _global_positions(step, global_batch_size, rows)
      indices = _record_indices(positions, seed, source.size, orders)
      yield indices, positions, source.label_of(indices)

  def records():
    for payloads, positions, labels in _read_ahead(source, steps()):
      yield positions, payloads, labels

  size = rows[1] - rows[0]
  return tf.data.Dataset.from_generator(records, output_signature=(
      tf.TensorSpec((size,), tf.int64), _payload_spec(source, size),
      tf.TensorSpec((size,), tf.int32))).unbatch()


def _process_of(rows, global_batch_size) -> tuple[int, int]:
  """(process index, process count) when `rows` is one of equal blocks."""
  size = rows[1] - rows[0]
  if global_batch_size % size or rows[0] % size:
    raise UserError(
        f'rows {rows} are not one of equal blocks of the global batch '
        f'{global_batch_size}; TFRecord sources need that.')
  return rows[0] // size, global_batch_size // size


def _file_rounds(source, seed, process, count, start):
  """(records to skip, (paths, skips, takes, epoch, round)) of every round of
  files this process reads, from its local stream position `start` on: the
  records to skip are those of the first round before `start`, then 0."""
  files = source.files
  sizes = np.array([f.take for f in files], np.int64)

  def rounds_of(epoch):
    mine = epoch_order(seed, epoch, len(files))[process::count]
    return [mine[i:i + sources.TFRECORD_CYCLE]
            for i in range(0, len(mine), sources.TFRECORD_CYCLE)]

  skip = start
  for epoch in itertools.count():
    for number, chosen in enumerate(rounds_of(epoch)):
      records = int(sizes[chosen].sum())
      if skip >= records:  # Whole files before the resume point: not read.
        skip -= records
        continue
      yield skip, (np.array([files[i].path for i in chosen]),
                   np.array([files[i].skip for i in chosen], np.int64),
                   sizes[chosen], epoch, number)
      skip = 0


def _file_records(source, seed, start_step, global_batch_size, rows):
  """(global position, record, -1) of this process's share of the files."""
  process, count = _process_of(rows, global_batch_size)
  if len(source.files) < count:
    raise UserError(
        f'{source.description} is {len(source.files)} TFRecord file(s), fewer '
        f'than the {count} processes reading it; prepare it with `tfds build '
        '--file_format=array_record` to read it by index.')
  size = rows[1] - rows[0]
  rounds = lambda: _file_rounds(source, seed, process, count, start_step * size)
  plan = tf.data.Dataset.from_generator(
      lambda: (files for _, files in rounds()),
      output_signature=(tf.TensorSpec((None,), tf.string),
                        tf.TensorSpec((None,), tf.int64),
                        tf.TensorSpec((None,), tf.int64),
                        *[tf.TensorSpec((), tf.int64)] * 2))
  base = tf.constant([seed, _WINDOW_TAG], tf.int64)

  def round_windows(paths, skips, takes, epoch, number):
    # Each file reads up to _FILE_READ_AHEAD records ahead on its own
    # thread, so that its next request's latency passes while the other
    # files' records are consumed (batched: one hand-off per batch).
    records = tf.data.Dataset.from_tensor_slices((paths, skips, takes)).interleave(
        lambda path, s, t: tf.data.TFRecordDataset(
            path, buffer_size=sources.TFRECORD_BUFFER).skip(s).take(t).batch(
                _FILE_READ_AHEAD // 4).prefetch(4).unbatch(),
        cycle_length=sources.TFRECORD_CYCLE, block_length=1,
        num_parallel_calls=sources.TFRECORD_CYCLE, deterministic=True)

    def shuffle(index, window):
      return tf.gather(window, tf.random.experimental.stateless_shuffle(
          tf.range(tf.shape(window)[0]),
          seed=transforms.fold(base, epoch, number, index)))
    return records.batch(sources.TFRECORD_WINDOW).enumerate().map(shuffle)

  # Rounds one after another, as flat_map would, but tf.data opens the next
  # two rounds while this one is read: their first requests and first
  # windows are ready when they start, so on cloud storage a round does not
  # start with a request's latency. The cost is memory: on ImageNet-sized
  # records (~110 KB) about 1 GB more than reading rounds one at a time.
  windows = plan.interleave(round_windows, cycle_length=1, block_length=1,
                            num_parallel_calls=1, deterministic=True)
  records = windows.unbatch().skip(next(rounds())[0])
  # Positions made a local batch at a time and zipped with the records: a
  # map per record, or batching the records, costs more CPU than the
  # record's read. Local batch s is global batch s, rows [rows[0], rows[1]).
  positions = tf.data.Dataset.range(start_step, _FOREVER).map(
      lambda step: step * global_batch_size + rows[0]
      + tf.range(size, dtype=tf.int64)).unbatch()
  labels = tf.data.Dataset.from_tensors(tf.constant(-1, tf.int32)).repeat()
  return tf.data.Dataset.zip(positions, records, labels)


def train_stream(source: sources.Source, augment: transforms.TrainAugment, *,
                 image_size: int | Sequence[int], global_batch_size: int,
                 seed: int, start_step: int = 0,
                 rows: tuple[int, int] | None = None) -> Iterator[dict]:
  """Endless augmented batches {'image': uint8 [R, h, w, 3], 'label': int32
  [R]} (plus 'erase' when `augment` erases; with `device_resize_window` P,
  crop windows {'window': uint8 [R, P, P, 3] zero-padded, 'window_hw',
  'flip'} in place of 'image'): rows [row_start, row_stop) of every global
  batch from `start_step` on, R = row_stop - row_start.

  From any `start_step` it yields exactly what an uninterrupted stream
  yields from that step, and (random-access sources) the rows of what a
  one-process stream yields, bit for bit.
  """
  hw = settings.image_hw(image_size)
  augment.check_size(hw)
  rows = check_rows(rows, global_batch_size)
  if start_step < 0:
    raise UserError(f'start_step must be >= 0, got {start_step}.')
  if source.random_access:
    logging.info('%s: %s.', source.description, source.note)
    records = _indexed_records(source, seed, start_step, global_batch_size,
                               rows)
  else:
    logging.warning('%s: %s', source.description, source.note)
    records = _file_records(source, seed, start_step, global_batch_size, rows)

  def example(position, payload, label):
    image, encoded, label = _decodable(source, payload, label)
    out = augment(image, encoded, transforms.example_key(seed, position), hw)
    out['label'] = label
    return out

  ds = records.map(example, num_parallel_calls=tf.data.AUTOTUNE,
                   deterministic=True)
  if augment.device_resize_window:  # padded straight into the batch: one copy
    p = augment.device_resize_window
    ds = ds.padded_batch(rows[1] - rows[0], drop_remainder=True, padded_shapes={
        k: [p, p, 3] if k == 'window' else v.shape
        for k, v in ds.element_spec.items()})
  else:
    ds = ds.batch(rows[1] - rows[0], drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())

  def describe_failure(i):
    step = start_step + i
    if not source.random_access:
      return _failure_message(source, [], f'local batch {step}')
    positions = _global_positions(step, global_batch_size, rows)
    return _failure_message(
        source, _undecodable(source, _record_indices(positions, seed,
                                                     source.size)),
        f'batch {step}')
  return _numpy_batches(ds, describe_failure)


# ------------------------------------------------------------------ eval ---

def _record_range(source, start: int, stop: int) -> tf.data.Dataset:
  """Serialized records [start, stop) of a TFRecord source, in split order."""
  paths, skips, takes = [], [], []
  offset = 0
  for f in source.files:
    lo, hi = max(start - offset, 0), min(stop - offset, f.take)
    if lo < hi:
      paths.append(f.path)
      skips.append(f.skip + lo)
      takes.append(hi - lo)
    offset += f.take
  return tf.data.Dataset.from_tensor_slices(
      (paths, np.array(skips, np.int64), np.array(takes, np.int64))).flat_map(
          lambda path, s, t: tf.data.TFRecordDataset(
              path, buffer_size=sources.TFRECORD_BUFFER).skip(s).take(t))


def eval_stream(source: sources.Source, *, image_size: int | Sequence[int],
                global_batch_size: int, rows: tuple[int, int] | None = None,
                num_examples: int | None = None) -> Iterator[dict]:
  """One ordered pass over the first `num_examples` examples (None: all):
  {'image': uint8, 'label': int32, 'mask': float32}, mask 0 on padding.

  Random-access sources: global batch b holds examples [b B, (b + 1) B) and
  the process yields its rows of it. TFRecord sources: process p of P reads
  the p-th contiguous P-th of the examples. Every process yields the same
  number of batches (multi-host evaluation steps in lock-step).
  """
  hw = settings.image_hw(image_size)
  rows = check_rows(rows, global_batch_size)
  size = rows[1] - rows[0]
  limit = source.size if num_examples is None else min(num_examples,
                                                       source.size)
  if limit < 1:
    raise UserError(f'num_examples={num_examples} must be >= 1.')
  if source.num_classes is None:
    raise UserError(f'{source.description} has no labels to evaluate.')

  def example(payload, label):
    image, encoded, label = _decodable(source, payload, label)
    return {'image': transforms.eval_transform(image, encoded, hw),
            'label': label, 'mask': tf.constant(1., tf.float32)}

  padding = {'image': tf.zeros((*hw, 3), tf.uint8),
             'label': tf.constant(0, tf.int32),
             'mask': tf.constant(0., tf.float32)}
  if source.random_access:
    num_batches = -(-limit // global_batch_size)

    def batches():
      for b in range(num_batches):
        positions = _global_positions(b, global_batch_size, rows)
        valid = positions < limit
        indices = np.where(valid, positions, 0)
        yield indices, valid, source.label_of(indices)

    def records():
      for payloads, valid, labels in _read_ahead(source, batches()):
        yield valid, payloads, labels

    ds = tf.data.Dataset.from_generator(records, output_signature=(
        tf.TensorSpec((size,), tf.bool), _payload_spec(source, size),
        tf.TensorSpec((size,), tf.int32))).unbatch().map(
            lambda valid, payload, label: tf.cond(
                valid, lambda: example(payload, label), lambda: padding),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    process, count = _process_of(rows, global_batch_size)
    share = lambda p: (p * limit // count, (p + 1) * limit // count)
    start, stop = share(process)
    num_batches = -(-max(b - a for a, b in map(share, range(count))) // size)
    ds = _record_range(source, start, stop).map(
        lambda record: example(record, -1),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(
        num_batches * size - (stop - start)))
  ds = ds.batch(size).prefetch(tf.data.AUTOTUNE).with_options(_options())

  def describe_failure(b):
    if not source.random_access:
      return _failure_message(source, [], f'evaluation batch {b}')
    positions = _global_positions(b, global_batch_size, rows)
    return _failure_message(
        source, _undecodable(source, positions[positions < limit]),
        f'evaluation batch {b}')
  return _numpy_batches(ds, describe_failure)
