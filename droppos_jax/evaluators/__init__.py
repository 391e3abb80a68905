"""Evaluators of frozen or in-training encoders: position probing, k-NN and
the online evaluator that pre-training calls every few steps.

They share one way of reading a small labelled split: the ordered eval
transform of the input pipeline, as global arrays split over the mesh.
"""
from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import jax
import numpy as np

from droppos_jax import input_pipeline, sharding


def eval_batches(data_cfg, *, image_hw: Sequence[int], batch_size: int,
                 num_examples: int, mesh: jax.sharding.Mesh) -> Iterator[dict]:
  """Ordered global batches {'image', 'label', 'mask'} of the first
  `num_examples` examples (-1: all), each process reading its own share.

  The last batch is padded to `batch_size` (mask 0), so a jitted function
  sees one shape only.
  """
  sharding.check_batch_divides(batch_size, mesh, 'eval batch_size')
  if num_examples == 0 or num_examples < -1:
    raise ValueError(f'num_examples={num_examples} must be >= 1 (or -1: all).')
  procs = jax.process_count()
  local_batch = batch_size // procs
  batches = input_pipeline.make_eval_iterator(
      data_cfg, image_size=tuple(image_hw), local_batch_size=local_batch,
      process_index=jax.process_index(), process_count=procs)
  if num_examples > 0:
    batches = itertools.islice(batches, -(-num_examples // batch_size))
  local_cap = num_examples // procs if num_examples > 0 else None

  def capped():
    for i, batch in enumerate(batches):
      if local_cap is not None:
        keep = i * local_batch + np.arange(local_batch) < local_cap
        batch['mask'] = (batch['mask'] * keep).astype(np.float32)
      yield batch
  return input_pipeline.global_batches(capped(), sharding.batch_sharding(mesh))
