"""Input pipeline: data sources, pre-training stream, eval transform, host->device.

Determinism and resume. The pre-training stream of a process is a pure
function of (seed, process_index, process_count, source): its k-th example is
record perm_e[k mod n] of its shard (n records, epoch e = k // n, perm_e a
permutation keyed by (seed, process, e)), augmented with stateless ops keyed by
(seed, global example index). Restarting at step s rebuilds the stream from
local example s * local_batch_size: for folder and demo sources (random
access) that costs one O(n) permutation, for tfds (sequential records,
shuffled within windows, see _TfdsShard) at most one epoch of skipped,
undecoded records.

TensorFlow is imported on first use, so that importing this module and
validating a folder/demo config stay cheap; it never sees an accelerator.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import os
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from droppos_jax import augment, demo_data

SOURCES = ('demo', 'folder', 'tfds')
IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.webp')
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_FRACTION = 0.875
# Encoded records a tfds shuffle window holds (~1 GB of ImageNet JPEGs).
TFDS_SHUFFLE_WINDOW = 10_000
# Stream tags folded into the seed so permutations and augmentations differ.
_PERMUTATION, _AUGMENTATION = 0, 1
_FOREVER = 2**62


@functools.cache
def _tf():
  """TensorFlow, imported once with GPUs hidden so it never takes their memory."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError as err:  # TF was initialised by someone else first.
    if tf.config.get_visible_devices('GPU'):
      raise RuntimeError('TensorFlow already claimed a GPU; build the input '
                         'pipeline before anything else initialises TF.') from err
  return tf


def _image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
  h, w = (image_size, image_size) if np.ndim(image_size) == 0 else image_size
  if int(h) < 1 or int(w) < 1:
    raise ValueError(f'image_size must be positive, got {image_size!r}.')
  return int(h), int(w)


def _seed_key(tf, seed: int, *data):
  """A stateless-RNG key [2] for `data` under the user seed."""
  key = tf.constant([seed, 0], tf.int64)
  for x in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(x, tf.int64))
  return key


# ---------------------------------------------------------------- sources ---

def _list_folder(path: str | None) -> tuple[list[str], list[int], list[str]]:
  """(sorted files, labels, class names) of a class-per-subfolder or flat folder."""
  if not path:
    raise ValueError("data.path must name an image folder for source 'folder'.")
  if not os.path.isdir(path):
    raise ValueError(f'data.path {path!r} is not an existing directory.')
  is_image = lambda name: name.lower().endswith(IMAGE_EXTENSIONS)
  entries = sorted(e for e in os.listdir(path) if not e.startswith('.'))
  classes = [e for e in entries if os.path.isdir(os.path.join(path, e))]
  loose = [e for e in entries if is_image(e)]
  if classes and loose:
    raise ValueError(
        f'Folder {path!r} mixes class subfolders {classes[:3]} with images at '
        f'its top level {loose[:3]}; use one layout: all images in class '
        'subfolders, or all at the top level (label 0).')
  files, labels = [], []
  if classes:
    for label, name in enumerate(classes):
      found = []
      for root, dirs, names in os.walk(os.path.join(path, name),
                                       followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        found += [os.path.join(root, n) for n in names
                  if is_image(n) and not n.startswith('.')]
      files += sorted(found)
      labels += [label] * len(found)
  else:
    files = [os.path.join(path, e) for e in loose]
    labels = [0] * len(files)
    classes = [os.path.basename(os.path.normpath(path))]
  if not files:
    raise ValueError(
        f'No images found in {path!r}; accepted extensions (any case) are '
        f'{", ".join(IMAGE_EXTENSIONS)}.')
  return files, labels, classes


def _tfds_builder(cfg):
  """The prepared tfds builder `cfg` names; raises before anything is read."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, data_dir, split = cfg.get('name'), cfg.get('data_dir'), cfg.get('split')
  if not name or not split:
    raise ValueError("Source 'tfds' needs data.name (e.g. 'imagenet2012') and "
                     f"data.split (e.g. 'train'); got {name!r} and {split!r}.")
  if data_dir and '://' not in data_dir and not os.path.isdir(data_dir):
    raise ValueError(f'data.data_dir {data_dir!r} does not exist.')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as err:
    raise ValueError(f'Unknown tfds dataset {name!r}; tfds.list_builders() '
                     'lists the registered names.') from err
  if not builder.is_prepared():
    raise ValueError(
        f'tfds dataset {name!r} is not prepared in {builder.data_dir!r} and '
        'will not be downloaded here; prepare it first (e.g. `tfds build '
        f'{name} --data_dir=... --manual_dir=...`) or set data.data_dir.')
  if split not in builder.info.splits:
    raise ValueError(f'tfds dataset {name!r} has no split {split!r}; it has '
                     f'{sorted(builder.info.splits)}.')
  if 'image' not in builder.info.features:
    raise ValueError(f'tfds dataset {name!r} has no "image" feature.')
  return builder


class _ArrayShard:
  """Random-access records (file paths or demo indices): any position is O(1)."""

  def __init__(self, keys: np.ndarray, labels: np.ndarray,
               load: Callable[[Any], Any]):
    self.size = len(keys)
    self._keys, self._labels, self._load = keys, labels, load

  def _order(self, tf, epoch, seed: int, process_index: int):
    key = _seed_key(tf, seed, _PERMUTATION, process_index, epoch)
    return tf.random.experimental.stateless_shuffle(
        tf.range(self.size, dtype=tf.int64), seed=key)

  def epoch(self, tf, epoch, start, seed: int, process_index: int):
    """Undecoded records of `epoch` in its shuffled order, from `start` on."""
    order = self._order(tf, epoch, seed, process_index)[start:]
    return tf.data.Dataset.from_tensor_slices(
        (tf.gather(self._keys, order), tf.gather(self._labels, order)))

  def ordered(self, tf):
    return tf.data.Dataset.from_tensor_slices((self._keys, self._labels))

  def decode(self, key, label):
    return {'image': self._load(key), 'label': label}

  def unreadable(self, tf, positions: Sequence[int], seed: int | None = None,
                 process_index: int = 0) -> list[str]:
    """Keys among stream positions (eval order if seed is None) that fail."""
    indices = np.asarray(positions)
    if seed is not None:
      epochs, offsets = np.divmod(indices, self.size)
      orders = {e: self._order(tf, e, seed, process_index).numpy()
                for e in set(epochs.tolist())}
      indices = [orders[e][o] for e, o in zip(epochs.tolist(), offsets)]
    bad = []
    for path in dict.fromkeys(self._keys[indices].tolist()):
      try:
        self._load(path)
      except tf.errors.InvalidArgumentError:
        bad.append(path)
    return bad


class _TfdsShard:
  """Sequential tfds records; seeking means reading (but not decoding) them.

  Files are read in their stored order (tfds shuffled examples when it wrote
  them) and each window of TFDS_SHUFFLE_WINDOW records is permuted by a
  stateless key of (seed, process, epoch, window). Unlike tf.data's shuffle
  buffer this does not depend on TF's global seed.
  """

  def __init__(self, builder, split: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.size = builder.info.splits[split].num_examples
    self._labelled = 'label' in builder.info.features
    self._records = builder.as_dataset(
        split=split, decoders={'image': tfds.decode.SkipDecoding()}).map(
            lambda r: (r['image'], r['label'] if self._labelled else -1))

  def epoch(self, tf, epoch, start, seed: int, process_index: int):
    key = _seed_key(tf, seed, _PERMUTATION, process_index, epoch)

    def permute(index, window):
      order = tf.random.experimental.stateless_shuffle(
          tf.range(tf.shape(window[1])[0]),
          seed=tf.random.experimental.stateless_fold_in(key, index))
      return tf.data.Dataset.from_tensor_slices(
          tuple(tf.gather(x, order) for x in window))
    windows = self._records.batch(TFDS_SHUFFLE_WINDOW).enumerate()
    return windows.flat_map(permute).skip(start)

  def ordered(self, unused_tf):
    return self._records

  def decode(self, encoded, label):
    tf = _tf()
    example = {'image': tf.io.decode_image(encoded, channels=3,
                                           expand_animations=False)}
    if self._labelled:
      example['label'] = tf.cast(label, tf.int32)
    return example

  def unreadable(self, *unused_args, **unused_kwargs) -> list[str]:
    return []


@dataclasses.dataclass(frozen=True)
class _Source:
  """A validated source: sizes are known before any record is read.

  `shard(index, count, equal)` opens one process's share (`equal` drops the
  remainder so all shares match), an _ArrayShard or a _TfdsShard; both offer
  size, epoch(), ordered(), decode() and unreadable().
  """
  description: str
  num_examples: int
  shard_sizes: Callable[[int, bool], list[int]]  # (count, equal) -> sizes
  shard: Callable[[int, int, bool], Any]


def _shard_positions(n: int, index: int, count: int, equal: bool) -> np.ndarray:
  """Strided positions of process `index`; `equal` drops the remainder."""
  return np.arange(index, n // count * count if equal else n, count)


def _array_shard_sizes(n: int) -> Callable[[int, bool], list[int]]:
  return lambda count, equal: [len(_shard_positions(n, i, count, equal))
                               for i in range(count)]


def _check_process(index: int, count: int) -> None:
  if not 0 <= index < count:
    raise ValueError(f'process_index {index} is not in [0, {count}).')


def _open(cfg) -> _Source:
  """Resolves and validates a data config; cheap, no TF for folder/demo."""
  source = cfg.get('source')
  if source == 'demo':
    split = cfg.get('split') or 'train'
    crop = cfg.get('crop_size') or 96
    num = demo_data.check_args(split, cfg.get('num_images'), crop)
    crop_seed = cfg.get('seed') or 0  # another seed: other crops, same pixels

    def shard(index, count, equal):
      tf = _tf()
      images, labels, _ = demo_data.load_demo_images(num, crop, seed=crop_seed,
                                                     split=split)
      images = tf.constant(images)
      pos = _shard_positions(num, index, count, equal)
      return _ArrayShard(pos, labels[pos], lambda i: tf.gather(images, i))
    return _Source(f'demo/{split} (crop seed {crop_seed})', num,
                   _array_shard_sizes(num), shard)
  if source == 'folder':
    files, labels, _ = _list_folder(cfg.get('path'))

    def shard(index, count, equal):
      tf = _tf()
      load = lambda path: tf.io.decode_image(
          tf.io.read_file(path), channels=3, expand_animations=False)
      pos = _shard_positions(len(files), index, count, equal)
      return _ArrayShard(np.asarray(files)[pos],
                         np.asarray(labels, np.int32)[pos], load)
    return _Source(f"folder {cfg.get('path')}", len(files),
                   _array_shard_sizes(len(files)), shard)
  if source == 'tfds':
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = _tfds_builder(cfg)
    splits = lambda count, equal: tfds.even_splits(
        cfg.split, count, drop_remainder=equal)
    return _Source(
        f'tfds {cfg.name}:{cfg.split}',
        builder.info.splits[cfg.split].num_examples,
        lambda count, equal: [builder.info.splits[s].num_examples
                              for s in splits(count, equal)],
        lambda index, count, equal: _TfdsShard(
            builder, splits(count, equal)[index]))
  raise ValueError(f'Unknown data source {source!r}; valid sources are '
                   f'{list(SOURCES)}.')


def validate_data_config(cfg) -> None:
  """Raises a ValueError naming the problem if `cfg` cannot be read."""
  _open(cfg)


def num_train_examples(cfg) -> int:
  """Global number of examples in the configured split (epochs -> steps)."""
  return _open(cfg).num_examples


# ----------------------------------------------------------- transforms ---

def _normalize(tf, image):
  image = tf.clip_by_value(image, 0., 255.)  # Bicubic overshoots, PIL clips.
  return (image - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)


def _pretrain_transform(tf, image, key, hw):
  """RandomResizedCrop(bicubic) + horizontal flip + normalisation (spec §6)."""
  top, left, h, w = augment.crop_box(tf, tf.shape(image), key, CROP_SCALE,
                                     CROP_RATIO)
  crop = tf.image.resize(tf.cast(image[top:top + h, left:left + w], tf.float32),
                         hw, method='bicubic', antialias=True)
  crop = tf.image.stateless_random_flip_left_right(
      crop, seed=tf.random.experimental.stateless_fold_in(key, 1))
  return _normalize(tf, crop)


def _eval_transform(tf, image, hw):
  """Shorter side -> max(hw)/0.875 (bicubic), centre crop hw, normalise."""
  resize = int(max(hw) / EVAL_CROP_FRACTION)
  shape = tf.shape(image)[:2]
  new = shape * resize // tf.reduce_min(shape)
  image = tf.image.resize(tf.cast(image, tf.float32), new, method='bicubic',
                          antialias=True)
  top, left = (new[0] - hw[0]) // 2, (new[1] - hw[1]) // 2
  return _normalize(tf, image[top:top + hw[0], left:left + hw[1]])


# ------------------------------------------------------------- iterators ---

def _numpy_batches(tf, ds, describe_failure) -> Iterator[dict]:
  """Numpy batches; a decode error names the files of the failing batch."""
  step = 0
  iterator = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as err:
      raise ValueError(describe_failure(step)) from err
    yield batch
    step += 1


def _failure_message(source, batch_index, bad_files) -> str:
  if bad_files:
    return (f'Could not decode image file(s) {", ".join(map(str, bad_files))} '
            f'from {source.description}; remove or replace them.')
  return (f'Could not decode an image of {source.description} in local batch '
          f'{batch_index} (see the TensorFlow error above).')


def make_pretrain_iterator(data_cfg, *, image_size: int | Sequence[int],
                           local_batch_size: int, seed: int, start_step: int = 0,
                           process_index: int = 0, process_count: int = 1
                           ) -> Iterator[dict[str, np.ndarray]]:
  """Endless augmented batches {'image': f32 [B, h, w, 3], 'label': i32 [B]}.

  From `start_step` on it yields exactly what an uninterrupted iterator yields
  from that step (see the module docstring for how and at what cost).
  """
  return make_train_iterator(
      data_cfg, _pretrain_transform, image_size=image_size,
      local_batch_size=local_batch_size, seed=seed, start_step=start_step,
      process_index=process_index, process_count=process_count)


def make_train_iterator(data_cfg, transform: Callable[..., Any], *,
                        image_size: int | Sequence[int], local_batch_size: int,
                        seed: int, start_step: int = 0, process_index: int = 0,
                        process_count: int = 1, require_labels: bool = False
                        ) -> Iterator[dict[str, np.ndarray]]:
  """The resumable stream of make_pretrain_iterator with any augmentation.

  `transform(tf, uint8 image, key, (h, w)) -> float32 [h, w, 3]` must draw
  its randomness from stateless ops keyed by `key` (the example's key), so
  that fine-tuning streams keep the same determinism and resume guarantees.
  """
  source = _open(data_cfg)
  hw = _image_hw(image_size)
  _check_process(process_index, process_count)
  size = source.shard_sizes(process_count, True)[process_index]
  if not 0 < local_batch_size <= size:
    raise ValueError(
        f'local_batch_size {local_batch_size} must be in [1, {size}]: process '
        f'{process_index} of {process_count} reads {size} examples of '
        f'{source.description}.')
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  tf = _tf()
  shard = source.shard(process_index, process_count, True)
  start = start_step * local_batch_size
  start_epoch, start_offset = divmod(start, shard.size)

  def epoch_records(epoch):
    skip = tf.where(epoch == start_epoch, tf.constant(start_offset, tf.int64),
                    tf.constant(0, tf.int64))
    return shard.epoch(tf, epoch, skip, seed, process_index)

  records = tf.data.Dataset.range(start_epoch, _FOREVER).flat_map(epoch_records)
  positions = tf.data.Dataset.range(start, _FOREVER)

  def example(position, record):
    out = shard.decode(*record)
    if require_labels and 'label' not in out:
      raise ValueError(f'{source.description} has no labels to train on.')
    key = _seed_key(tf, seed, _AUGMENTATION,
                    position * process_count + process_index)
    out['image'] = transform(tf, out['image'], key, hw)
    return out

  ds = tf.data.Dataset.zip(positions, records).map(
      example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(
      tf.data.AUTOTUNE)

  def describe_failure(step):
    first = (start_step + step) * local_batch_size
    bad = shard.unreadable(tf, range(first, first + local_batch_size), seed,
                           process_index)
    return _failure_message(source, start_step + step, bad)
  return _numpy_batches(tf, ds, describe_failure)


def make_eval_iterator(data_cfg, *, image_size: int | Sequence[int],
                       local_batch_size: int, process_index: int = 0,
                       process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass: {'image', 'label', 'mask'}; mask 0 marks padding.

  Every process yields the same number of batches (multi-host evals step in
  lock-step), padding its last ones with zero images.
  """
  source = _open(data_cfg)
  hw = _image_hw(image_size)
  _check_process(process_index, process_count)
  if local_batch_size < 1:
    raise ValueError(f'local_batch_size must be >= 1, got {local_batch_size}.')
  largest = max(source.shard_sizes(process_count, False))
  num_batches = -(-largest // local_batch_size)
  tf = _tf()
  shard = source.shard(process_index, process_count, False)

  def example(*record):
    out = shard.decode(*record)
    if 'label' not in out:
      raise ValueError(f'{source.description} has no labels to evaluate.')
    out['image'] = _eval_transform(tf, out['image'], hw)
    out['mask'] = tf.constant(1., tf.float32)
    return out

  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros(hw + (3,), tf.float32),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(0., tf.float32)}).repeat(
          num_batches * local_batch_size - shard.size)
  ds = shard.ordered(tf).map(example, num_parallel_calls=tf.data.AUTOTUNE,
                             deterministic=True)
  ds = ds.concatenate(padding).batch(local_batch_size).prefetch(
      tf.data.AUTOTUNE)

  def describe_failure(step):
    first = step * local_batch_size
    bad = shard.unreadable(
        tf, range(first, min(first + local_batch_size, shard.size)))
    return _failure_message(source, step, bad)
  return _numpy_batches(tf, ds, describe_failure)


# ----------------------------------------------------------- host->device ---

def global_batches(iterator: Iterator[dict], sharding: jax.sharding.Sharding,
                   prefetch: int = 2) -> Iterator[dict]:
  """Host-local numpy batches -> global jax.Arrays split by `sharding`.

  Keeps `prefetch` batches on their way to the devices while the step runs.
  """
  def to_global(batch):
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

  queue = collections.deque(map(to_global, itertools.islice(iterator, prefetch)))
  while queue:
    yield queue.popleft()
    queue.extend(map(to_global, itertools.islice(iterator, 1)))
