"""Host batches -> normalised global jax.Arrays: what trainers and evaluators
call (`train_batches`, `eval_batches`).

Each process feeds its rows of every global batch (sharding.local_rows), so
the global batches are the same on any host count. Streams ship uint8
images, 4x less host work and host->device traffic than float32. A small
jitted function turns them into normalised float32 on the accelerator and,
for fine-tuning, fills the random-erasing boxes the host drew with N(0, 1)
noise (timm erases after normalising). With `device_resize_window` the
streams ship pre-training's crop windows instead, and the same function
resizes and flips them first (`resize_windows`). Consumers receive
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


def bicubic_weights(size, out_size: int, pad: int) -> jax.Array:
  """PIL's bicubic (a = -0.5) resample weights [out_size, pad] of an axis of
  `size` <= `pad` pixels (zero from column `size` on), rounded to PIL's
  fixed point like transforms.resize's (float32 here, float64 there: a
  weight may differ by one fixed-point unit, which moves a pixel by one grey
  level when its exact value lies within ~1e-4 of a rounding boundary)."""
  size = jnp.asarray(size, jnp.float32)
  scale = size / out_size
  filter_scale = jnp.maximum(scale, 1.)
  support = 2. * filter_scale
  center = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  lo = jnp.maximum(jnp.floor(center - support + 0.5), 0.)[:, None]
  hi = jnp.minimum(jnp.floor(center + support + 0.5), size)[:, None]
  p = jnp.arange(pad, dtype=jnp.float32)[None]
  x = jnp.abs((p - center[:, None] + 0.5) / filter_scale)
  w = jnp.where(x < 1., (1.5 * x - 2.5) * x * x + 1.,
                jnp.where(x < 2., (((x - 5.) * x + 8.) * x - 4.) * -0.5, 0.))
  w = jnp.where((p >= lo) & (p < hi), w, 0.)
  w /= jnp.sum(w, 1, keepdims=True)
  one = 2.**transforms.RESAMPLE_BITS
  w = jnp.where(w < 0, jnp.ceil(w * one - 0.5), jnp.floor(w * one + 0.5))
  return w / one


def _resize_window(window: jax.Array, hw: jax.Array, size: int) -> jax.Array:
  """PIL's bicubic resize of the [h, w] top-left pixels of a uint8 window
  [P, P, 3] to [size, size, 3] (integral float32), in PIL's pass order: a
  window resampled vertically first is resampled horizontally first in its
  transpose, so each example runs one order."""
  h, w = hw[0], hw[1]
  vertical_first = (h - size > 0) & (h - size > 2 * (w - size))
  x = window.astype(jnp.float32)
  x = jnp.where(vertical_first, jnp.swapaxes(x, 0, 1), x)
  rows = jnp.where(vertical_first, w, h)
  cols = jnp.where(vertical_first, h, w)
  pad = window.shape[0]
  highest = jax.lax.Precision.HIGHEST  # integral pixels times 22-bit weights
  to_uint8 = lambda y: jnp.clip(jnp.floor(y + 0.5), 0., 255.)  # PIL's rounding
  y = to_uint8(jnp.einsum('rqc,jq->rjc', x, bicubic_weights(cols, size, pad),
                          precision=highest))
  y = to_uint8(jnp.einsum('ir,rjc->ijc', bicubic_weights(rows, size, pad), y,
                          precision=highest))
  return jnp.where(vertical_first, jnp.swapaxes(y, 0, 1), y)


def resize_windows(windows: jax.Array, hw: jax.Array, flip: jax.Array,
                   size: int) -> jax.Array:
  """Pre-training's crops from the windows a stream ships with
  `device_resize_window` (uint8 [B, P, P, 3], int32 [B, 2], bool [B]):
  PIL's bicubic resize to [B, size, size, 3], then the horizontal flips,
  as transforms.TrainAugment does on the host."""
  images = jax.vmap(_resize_window, in_axes=(0, 0, None))(windows, hw, size)
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def _finish(batch: dict, size: int | None) -> dict:
  out = dict(batch)
  if 'window' in out:
    out['image'] = resize_windows(out.pop('window'), out.pop('window_hw'),
                                  out.pop('flip'), size)
  out['image'] = normalize(out['image'])
  if 'erase' in out:
    out['image'] = erase(out['image'], out.pop('erase'))
  return out


@functools.cache
def _finisher(sharding: jax.sharding.Sharding, size: int | None):
  return jax.jit(functools.partial(_finish, size=size),
                 out_shardings=sharding)


def global_batches(batches: Iterator[dict], sharding: jax.sharding.Sharding,
                   prefetch: int = 2, size: int | None = None
                   ) -> Iterator[dict]:
  """Host-local batches of a stream -> global, normalised jax.Arrays split
  by `sharding` (each process passes its own rows); crop windows are
  resized to `size` (a stream with `device_resize_window`).

  Keeps `prefetch` batches on their way to the devices while the step runs.
  """
  finish = _finisher(sharding, size)

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
      rows=sharding_lib.local_rows(batch_sh, batch_size)), batch_sh,
      size=image_hw[0])


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
