"""Host batches -> normalised global jax.Arrays: what trainers and evaluators
call (`train_batches`, `eval_batches`).

Each process feeds its rows of every global batch (sharding.local_rows), so
the global batches are the same on any host count. Streams ship uint8 images, 4x less host work and host->device traffic than
float32. A small jitted function turns them into normalised float32 on the
accelerator and, for fine-tuning, fills the random-erasing boxes the host
drew with N(0, 1) noise (timm erases after normalising). Consumers receive
{'image': float32 [B, h, w, 3], ...} split over the mesh.
"""
from __future__ import annotations

import collections
import functools
import itertools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp

from droppos_jax import sharding as sharding_lib
from droppos_jax.data import sources, streams, transforms
from droppos_jax.errors import UserError

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def normalize(images: jax.Array) -> jax.Array:
  """uint8 RGB -> float32, ImageNet mean and standard deviation."""
  return ((images.astype(jnp.float32) - jnp.asarray(MEAN_RGB)) /
          jnp.asarray(STDDEV_RGB))


def erase(images: jax.Array, boxes: jax.Array) -> jax.Array:
  """Replaces box [top, left, height, width] of each image by N(0, 1) noise
  drawn from key(seed), boxes int32 [B, 5] (top, left, height, width, seed)."""
  _, h, w, c = images.shape
  top, left, height, width, seed = (boxes[:, i, None, None] for i in range(5))
  rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  inside = ((rows >= top) & (rows < top + height) &
            (cols >= left) & (cols < left + width))
  noise = jax.vmap(lambda s: jax.random.normal(jax.random.key(s), (h, w, c)))(
      seed[:, 0, 0])
  return jnp.where(inside[..., None], noise, images)


def _finish(batch: dict) -> dict:
  out = dict(batch)
  out['image'] = normalize(out['image'])
  if 'erase' in out:
    out['image'] = erase(out['image'], out.pop('erase'))
  return out


@functools.cache
def _finisher(sharding: jax.sharding.Sharding):
  return jax.jit(_finish, out_shardings=sharding)


def global_batches(batches: Iterator[dict], sharding: jax.sharding.Sharding,
                   prefetch: int = 2) -> Iterator[dict]:
  """Host-local batches of a stream -> global, normalised jax.Arrays split
  by `sharding` (each process passes its own rows).

  Keeps `prefetch` batches on their way to the devices while the step runs.
  """
  finish = _finisher(sharding)

  def to_global(batch):
    return finish(jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), batch))

  queue = collections.deque(map(to_global, itertools.islice(batches, prefetch)))
  while queue:
    yield queue.popleft()
    queue.extend(map(to_global, itertools.islice(batches, 1)))


def train_batches(source: sources.Source, augment: transforms.TrainAugment, *,
                  image_hw: Sequence[int], batch_size: int, seed: int,
                  start_step: int, mesh: jax.sharding.Mesh) -> Iterator[dict]:
  """Endless global training batches from `start_step` on (streams.train_stream)."""
  batch_sh = sharding_lib.batch_sharding(mesh)
  return global_batches(streams.train_stream(
      source, augment, image_size=image_hw, global_batch_size=batch_size,
      seed=seed, start_step=start_step,
      rows=sharding_lib.local_rows(batch_sh, batch_size)), batch_sh)


def eval_batches(source: sources.Source, *, image_hw: Sequence[int],
                 batch_size: int, num_examples: int,
                 mesh: jax.sharding.Mesh) -> Iterator[dict]:
  """Ordered global batches {'image', 'label', 'mask'} of the first
  `num_examples` examples (-1: all) of a labelled source.

  The last batch is padded to `batch_size` (mask 0), so a jitted function
  sees one shape only.
  """
  sharding_lib.check_batch_divides(batch_size, mesh, 'eval batch_size')
  if num_examples == 0 or num_examples < -1:
    raise UserError(f'num_examples={num_examples} must be >= 1 (or -1: all).')
  batch_sh = sharding_lib.batch_sharding(mesh)
  return global_batches(streams.eval_stream(
      source, image_size=tuple(image_hw), global_batch_size=batch_size,
      rows=sharding_lib.local_rows(batch_sh, batch_size),
      num_examples=None if num_examples == -1 else num_examples), batch_sh)
