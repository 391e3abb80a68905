"""Input for fine-tuning and linear probing, on input_pipeline's sources.

The train stream has the layout and resume guarantees of the pre-training
stream (see input_pipeline's docstring: example k of a process is a pure
function of seed, process and k); only the per-example transform differs
(augment.train_transform). Evaluation uses input_pipeline.make_eval_iterator
(resize to size/0.875, centre crop, padded and masked batches).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from droppos_jax import augment, demo_data
from droppos_jax import input_pipeline as ip


def validate_augment_config(cfg) -> None:
  """Raises a ValueError naming the bad field of an `augment` config."""
  lo, hi = cfg.crop_scale
  if not 0 < lo <= hi <= 1:
    raise ValueError(f'augment.crop_scale={tuple(cfg.crop_scale)} must satisfy '
                     '0 < min <= max <= 1.')
  if cfg.randaugment_layers < 0:
    raise ValueError(f'augment.randaugment_layers={cfg.randaugment_layers} '
                     'must be >= 0 (0 turns RandAugment off).')
  if not 0 <= cfg.randaugment_magnitude <= augment.MAX_LEVEL:
    raise ValueError(f'augment.randaugment_magnitude='
                     f'{cfg.randaugment_magnitude} must be in [0, 10].')
  if cfg.randaugment_mstd < 0:
    raise ValueError(f'augment.randaugment_mstd={cfg.randaugment_mstd} must '
                     'be >= 0.')
  if not 0 <= cfg.random_erasing <= 1:
    raise ValueError(f'augment.random_erasing={cfg.random_erasing} is a '
                     'probability in [0, 1].')


def num_classes(data_cfg) -> int:
  """Number of classes of a labelled source (folder: one per subfolder)."""
  source = data_cfg.get('source')
  if source == 'demo':
    return len(demo_data.CLASS_NAMES)
  if source == 'folder':
    return len(ip._list_folder(data_cfg.get('path'))[2])
  if source == 'tfds':
    features = ip._tfds_builder(data_cfg).info.features
    if 'label' not in features or not hasattr(features['label'], 'num_classes'):
      raise ValueError(f'tfds dataset {data_cfg.name!r} has no class label '
                       'feature to train a classifier on.')
    return int(features['label'].num_classes)
  raise ValueError(f'Unknown data source {source!r}; valid sources are '
                   f'{list(ip.SOURCES)}.')


def make_train_iterator(data_cfg, augment_cfg, *,
                        image_size: int | Sequence[int], local_batch_size: int,
                        seed: int, start_step: int = 0, process_index: int = 0,
                        process_count: int = 1
                        ) -> Iterator[dict[str, np.ndarray]]:
  """Endless augmented batches {'image': f32 [B, h, w, 3], 'label': i32 [B]}.

  From `start_step` on it yields exactly what an uninterrupted iterator
  yields from that step.
  """
  source = ip._open(data_cfg)
  validate_augment_config(augment_cfg)
  hw = ip._image_hw(image_size)
  ip._check_process(process_index, process_count)
  size = source.shard_sizes(process_count, True)[process_index]
  if not 0 < local_batch_size <= size:
    raise ValueError(
        f'local_batch_size {local_batch_size} must be in [1, {size}]: process '
        f'{process_index} of {process_count} reads {size} examples of '
        f'{source.description}.')
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  tf = ip._tf()
  shard = source.shard(process_index, process_count, True)
  start = start_step * local_batch_size
  start_epoch, start_offset = divmod(start, shard.size)
  transform = dict(
      crop_scale=tuple(augment_cfg.crop_scale),
      randaugment_layers=augment_cfg.randaugment_layers,
      randaugment_magnitude=augment_cfg.randaugment_magnitude,
      randaugment_mstd=augment_cfg.randaugment_mstd,
      random_erasing_prob=augment_cfg.random_erasing)

  def epoch_records(epoch):
    skip = tf.where(epoch == start_epoch, tf.constant(start_offset, tf.int64),
                    tf.constant(0, tf.int64))
    return shard.epoch(tf, epoch, skip, seed, process_index)

  records = tf.data.Dataset.range(start_epoch, ip._FOREVER).flat_map(
      epoch_records)
  positions = tf.data.Dataset.range(start, ip._FOREVER)

  def example(position, record):
    out = shard.decode(*record)
    if 'label' not in out:
      raise ValueError(f'{source.description} has no labels to train on.')
    key = ip._seed_key(tf, seed, ip._AUGMENTATION,
                       position * process_count + process_index)
    out['image'] = augment.train_transform(
        tf, out['image'], key, hw, normalize=ip._normalize, **transform)
    return out

  ds = tf.data.Dataset.zip(positions, records).map(
      example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(
      tf.data.AUTOTUNE)

  def describe_failure(step):
    first = (start_step + step) * local_batch_size
    bad = shard.unreadable(tf, range(first, first + local_batch_size), seed,
                           process_index)
    return ip._failure_message(source, start_step + step, bad)
  return ip._numpy_batches(tf, ds, describe_failure)
