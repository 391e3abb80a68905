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
  validate_augment_config(augment_cfg)
  options = dict(
      crop_scale=tuple(augment_cfg.crop_scale),
      randaugment_layers=augment_cfg.randaugment_layers,
      randaugment_magnitude=augment_cfg.randaugment_magnitude,
      randaugment_mstd=augment_cfg.randaugment_mstd,
      random_erasing_prob=augment_cfg.random_erasing)

  def transform(tf, image, key, hw):
    return augment.train_transform(tf, image, key, hw, normalize=ip._normalize,
                                   **options)

  return ip.make_train_iterator(
      data_cfg, transform, image_size=image_size,
      local_batch_size=local_batch_size, seed=seed, start_step=start_step,
      process_index=process_index, process_count=process_count,
      require_labels=True)
