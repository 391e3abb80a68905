"""Per-example transforms in TensorFlow: decoding, the training crop and
augmentations, the evaluation crop.

They reproduce torchvision + PIL, as the reference code trains (spec: the
MAE recipe), on uint8 pixels:
- JPEGs are decoded with libjpeg's accurate integer DCT, as PIL does, so the
  pixels are PIL's; RandomResizedCrop decodes only the crop window (plus a
  few pixels, so that chroma upsampling at its edges matches a full decode).
- `resize` is PIL's antialiased bicubic resample (Pillow 13's pass order and
  fixed-point coefficients), so a crop equals PIL's to within a grey level.
- Outputs stay uint8; normalisation (and random erasing, which timm applies
  after it) runs on the accelerator (device.py).
Every random draw is a stateless op keyed by the example's key, so a stream
is a pure function of (seed, example position).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import tensorflow as tf

from droppos_jax.models import vit
from droppos_jax.data import randaugment
from droppos_jax.errors import UserError

try:  # The pipeline runs on the host; the accelerators belong to JAX.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError as err:  # TF was initialised before this import.
  if tf.config.get_visible_devices('GPU'):
    raise RuntimeError('TensorFlow already claimed a GPU; import the input '
                       'pipeline before anything else initialises TF.') from err

CROP_SCALE = (0.2, 1.0)        # pre-training RandomResizedCrop (DropPos/MAE)
CROP_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_FRACTION = 0.875     # resize to size / 0.875, centre crop
JPEG_DCT_METHOD = 'INTEGER_ACCURATE'   # libjpeg's JDCT_ISLOW, PIL's choice
JPEG_CROP_MARGIN = 4
ERASE_AREA = (0.02, 1 / 3)     # timm RandomErasing defaults
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))
RESAMPLE_BITS = 22             # PIL's fixed-point precision for 8-bit images
_RESAMPLE_GROUP = 16           # outputs per block of the banded resample


def fold(key, *data):
  """A stateless-RNG key [2] derived from `key` and integers `data`."""
  for x in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(x, tf.int64))
  return key


def example_key(seed: int, position):
  """The key of the example at global stream position `position`."""
  return fold(tf.constant([seed, 0], tf.int64), position)


# --------------------------------------------------------------- decoding ---

def decode(data):
  """Any supported image file -> uint8 [h, w, 3]; JPEGs decoded as PIL does."""
  return tf.cond(
      tf.io.is_jpeg(data),
      lambda: tf.io.decode_jpeg(data, channels=3, dct_method=JPEG_DCT_METHOD),
      lambda: tf.io.decode_image(data, channels=3, expand_animations=False))


def decode_crop(data, box_fn: Callable):
  """Decodes the crop `box_fn(shape) -> (top, left, h, w)` of an image file;
  for a JPEG only that window (plus a margin) is decoded."""
  def jpeg():
    shape = tf.io.extract_jpeg_shape(data)
    top, left, h, w = box_fn(shape)
    t0 = tf.maximum(top - JPEG_CROP_MARGIN, 0)
    l0 = tf.maximum(left - JPEG_CROP_MARGIN, 0)
    b0 = tf.minimum(top + h + JPEG_CROP_MARGIN, shape[0])
    r0 = tf.minimum(left + w + JPEG_CROP_MARGIN, shape[1])
    window = tf.io.decode_and_crop_jpeg(
        data, tf.stack([t0, l0, b0 - t0, r0 - l0]), channels=3,
        dct_method=JPEG_DCT_METHOD)
    return window[top - t0:top - t0 + h, left - l0:left - l0 + w]

  def other():
    return crop(tf.io.decode_image(data, channels=3, expand_animations=False),
                box_fn)
  return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def crop(image, box_fn: Callable):
  top, left, h, w = box_fn(tf.shape(image))
  return image[top:top + h, left:left + w]


def crop_box(shape, key, scale: Sequence[float] = CROP_SCALE,
             ratio: Sequence[float] = CROP_RATIO):
  """torchvision's RandomResizedCrop box (top, left, h, w): 10 tries, then
  the largest centred crop with the ratio clamped to the range."""
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  u = tf.random.stateless_uniform([4, 10], seed=key)
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[1])
  w, h = tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32))
  h, w = h[first], w[first]
  top = tf.floor(u[2, first] * (height - h + 1))
  left = tf.floor(u[3, first] * (width - w + 1))
  in_ratio = width / height
  fb_w = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
  fb_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
  found = tf.reduce_any(fits)
  box = [tf.where(found, top, tf.floor((height - fb_h) / 2)),
         tf.where(found, left, tf.floor((width - fb_w) / 2)),
         tf.where(found, h, fb_h), tf.where(found, w, fb_w)]
  return [tf.cast(x, tf.int32) for x in box]


# --------------------------------------------------------------- resizing ---

def _bicubic_coefficients(in_size, out_size, first, count):
  """PIL's bicubic (a = -0.5) resample coefficients for outputs
  [first, first + count) of an `in_size` -> `out_size` axis: (first input
  index [count], weights [count, taps] rounded to PIL's fixed point)."""
  n = tf.cast(in_size, tf.float64)
  scale = n / tf.cast(out_size, tf.float64)
  filter_scale = tf.maximum(scale, 1.)
  support = 2. * filter_scale
  taps = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
  center = (tf.cast(tf.range(first, first + count), tf.float64) + 0.5) * scale
  lo = tf.maximum(tf.cast(tf.floor(center - support + 0.5), tf.int32), 0)
  hi = tf.minimum(tf.cast(tf.floor(center + support + 0.5), tf.int32), in_size)
  k = tf.range(taps)
  x = tf.abs((tf.cast(k[None] + lo[:, None], tf.float64) - center[:, None] + 0.5)
             * (1. / filter_scale))
  w = tf.where(x < 1., (1.5 * x - 2.5) * x * x + 1.,
               tf.where(x < 2., (((x - 5.) * x + 8.) * x - 4.) * -0.5, 0.))
  w = tf.where(k[None] < (hi - lo)[:, None], w, 0.)
  w /= tf.reduce_sum(w, 1, keepdims=True)
  one = 2.**RESAMPLE_BITS
  w = tf.where(w < 0, tf.math.ceil(w * one - 0.5), tf.floor(w * one + 0.5))
  return lo, tf.cast(w / one, tf.float32), taps


def _resample_rows(x, out_size, first, count):
  """Resamples the leading axis of x (float [n, m], integral values) to
  outputs [first, first + count) of `out_size`, rounded and clipped to
  [0, 255] like PIL's 8-bit pass.

  The banded weight matrix is applied in blocks of _RESAMPLE_GROUP outputs,
  each a small dense matmul over the input window the block reads.
  """
  n = tf.shape(x)[0]
  lo, w, taps = _bicubic_coefficients(n, out_size, first, count)
  pad = -count % _RESAMPLE_GROUP
  groups = (count + pad) // _RESAMPLE_GROUP
  lo = tf.reshape(tf.concat([lo, tf.fill([pad], lo[-1])], 0),
                  [groups, _RESAMPLE_GROUP])
  w = tf.reshape(tf.concat([w, tf.zeros(tf.stack([pad, taps]))], 0),
                 [groups, _RESAMPLE_GROUP, taps, 1])
  start = lo[:, 0]
  span = tf.reduce_max(lo[:, -1] - start) + taps
  windows = tf.gather(x, tf.minimum(start[:, None] + tf.range(span)[None],
                                    n - 1))                # [groups, span, m]
  column = lo[:, :, None] - start[:, None, None] + tf.range(taps)
  dense = tf.reduce_sum(tf.one_hot(column, span) * w, 2)  # [groups, G, span]
  y = tf.reshape(tf.linalg.matmul(dense, windows), [groups * _RESAMPLE_GROUP, -1])
  return tf.clip_by_value(tf.floor(y[:count] + 0.5), 0., 255.)


def resize(image, out_hw, first=(0, 0), hw=None):
  """PIL's `Image.resize(out_hw[::-1], BICUBIC)` of a uint8 [h, w, 3] image,
  or only its window [first, first + hw) (default: all of it).

  Separable: two 8-bit passes with PIL's coefficients, the vertical one
  first when the height shrinks by more than twice as many pixels as the
  width (Pillow >= 13; older Pillow always starts horizontally, which moves
  a few pixels by one grey level).
  """
  hw = tuple(out_hw) if hw is None else hw
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  x = tf.cast(image, tf.float32)

  def rows(x, axis):  # resample axis 0 of [n, m, 3] to the output's `axis`
    n, m = tf.shape(x)[0], tf.shape(x)[1]
    y = _resample_rows(tf.reshape(x, tf.stack([n, m * 3])), out_hw[axis],
                       first[axis], hw[axis])
    return tf.reshape(y, tf.stack([hw[axis], m, 3]))

  transpose = lambda x: tf.transpose(x, [1, 0, 2])
  vertical_first = (h - out_hw[0] > 0) & (h - out_hw[0] > 2 * (w - out_hw[1]))
  out = tf.cond(vertical_first,
                lambda: transpose(rows(transpose(rows(x, 0)), 1)),
                lambda: rows(transpose(rows(transpose(x), 1)), 0))
  return tf.cast(tf.ensure_shape(out, (*hw, 3)), tf.uint8)


# ------------------------------------------------------------ train crops ---

@dataclasses.dataclass(frozen=True)
class TrainAugment:
  """timm's training transform as MAE configures it: RandomResizedCrop
  (bicubic) -> horizontal flip [-> RandAugment] [-> random erasing].

  Pre-training uses the crop and flip only (`PRETRAIN`); fine-tuning adds
  RandAugment ('rand-m9-mstd0.5-inc1') and erasing (`finetune_augment`).

  `device_resize_window` = P > 0 leaves the resize and flip to the
  accelerators (device.resize_windows, the same PIL resample): the host
  decodes the crop window only and ships it, padded to P x P, with its size
  and the flip draw. A window over P pixels a side is resized here first,
  so the pixels do not depend on P.
  """
  crop_scale: tuple[float, float] = CROP_SCALE
  crop_ratio: tuple[float, float] = CROP_RATIO
  randaugment_layers: int = 0
  randaugment_magnitude: float = 9.
  randaugment_mstd: float = 0.5
  random_erasing: float = 0.
  device_resize_window: int = 0

  def __post_init__(self):
    if self.device_resize_window < 0:
      raise UserError(f'device_resize_window={self.device_resize_window} '
                      'must be 0 (resize on the host) or a window size in '
                      'pixels, e.g. 512.')
    if self.device_resize_window and self.randaugment_layers:
      raise UserError('device_resize_window needs randaugment_layers=0: '
                      'RandAugment runs on the host, after the resize.')

  def check_size(self, hw) -> None:
    """Raises UserError when crops of size `hw` cannot be resized on the
    accelerators with this window."""
    window = self.device_resize_window
    if window and (hw[0] != hw[1] or window < hw[0]):
      raise UserError(f'device_resize_window={window} needs a square '
                      f'image_size of at most {window} pixels, got '
                      f'{tuple(hw)}; or set it to 0 (resize on the host).')

  def __call__(self, image, encoded: bool, key, hw) -> dict:
    """`image`: a file's bytes if `encoded`, else uint8 pixels. Returns
    {'image': uint8 [*hw, 3]} plus, with erasing, {'erase': int32 [5]}; with
    `device_resize_window`, {'window': uint8 [h, w, 3] (h, w <= the window),
    'window_hw': int32 [2], 'flip': bool} instead of 'image'."""
    box_fn = lambda shape: crop_box(shape, fold(key, 0), self.crop_scale,
                                    self.crop_ratio)
    window = decode_crop(image, box_fn) if encoded else crop(image, box_fn)
    if self.device_resize_window:
      example = self._window(window, fold(key, 1), hw)
    else:
      out = resize(window, hw)
      out = tf.image.stateless_random_flip_left_right(out, seed=fold(key, 1))
      if self.randaugment_layers:
        out = randaugment.rand_augment(
            out, fold(key, 2), self.randaugment_layers,
            self.randaugment_magnitude, self.randaugment_mstd)
      example = {'image': out}
    if self.random_erasing > 0:
      example['erase'] = erase_box(fold(key, 3), hw, self.random_erasing)
    return example

  def _window(self, window, flip_key, hw) -> dict:
    shape = tf.shape(window)
    fits = tf.reduce_all(shape[:2] <= self.device_resize_window)
    window = tf.cond(fits, lambda: window, lambda: resize(window, hw))
    # The draw of tf.image.stateless_random_flip_left_right.
    flip = tf.random.stateless_uniform([], seed=flip_key) < 0.5
    return {'window': window, 'window_hw': tf.shape(window)[:2], 'flip': flip}


PRETRAIN = TrainAugment()

# device_resize_window = BY_PLATFORM (the default) resolves to
# PLATFORM_WINDOW on TPUs and GPUs, whose hosts resize too slowly for the
# chips they feed, and to 0 on CPUs, where the CPU is the accelerator (6 ms
# per image here); see the README's input pipeline.
BY_PLATFORM = -1
PLATFORM_WINDOW = 512


def pretrain_augment(window: int, hw: Sequence[int],
                     platform: str) -> TrainAugment:
  """Pre-training's transform (crop and flip) for crops of size `hw` with
  the config's `device_resize_window` = `window` on jax `platform`;
  BY_PLATFORM resizes on the chips where that is valid (a square crop of
  at most PLATFORM_WINDOW pixels), else on the host."""
  if window < BY_PLATFORM:
    raise UserError(f'device_resize_window={window} must be {BY_PLATFORM} '
                    f'(by platform: {PLATFORM_WINDOW} on TPUs and GPUs, 0 on '
                    'CPUs), 0 (resize on the host) or a window size in '
                    f'pixels, e.g. {PLATFORM_WINDOW}.')
  if window == BY_PLATFORM:
    square = hw[0] == hw[1] <= PLATFORM_WINDOW
    window = (PLATFORM_WINDOW if square and vit.is_accelerator(platform)
              else 0)
  augment = TrainAugment(device_resize_window=window)
  augment.check_size(hw)
  return augment


def finetune_augment(cfg) -> TrainAugment:
  """The fine-tuning transform of an `augment` config; raises UserError
  naming a bad field."""
  lo, hi = cfg.crop_scale
  if not 0 < lo <= hi <= 1:
    raise UserError(f'augment.crop_scale={tuple(cfg.crop_scale)} must satisfy '
                    '0 < min <= max <= 1.')
  if cfg.randaugment_layers < 0:
    raise UserError(f'augment.randaugment_layers={cfg.randaugment_layers} '
                    'must be >= 0 (0 turns RandAugment off).')
  if not 0 <= cfg.randaugment_magnitude <= randaugment.MAX_LEVEL:
    raise UserError(f'augment.randaugment_magnitude='
                    f'{cfg.randaugment_magnitude} must be in [0, 10].')
  if cfg.randaugment_mstd < 0:
    raise UserError(f'augment.randaugment_mstd={cfg.randaugment_mstd} must '
                    'be >= 0.')
  if not 0 <= cfg.random_erasing <= 1:
    raise UserError(f'augment.random_erasing={cfg.random_erasing} is a '
                    'probability in [0, 1].')
  return TrainAugment(
      crop_scale=(float(lo), float(hi)),
      randaugment_layers=int(cfg.randaugment_layers),
      randaugment_magnitude=float(cfg.randaugment_magnitude),
      randaugment_mstd=float(cfg.randaugment_mstd),
      random_erasing=float(cfg.random_erasing))


def erase_box(key, hw, probability: float):
  """timm RandomErasing('pixel', count 1) draws: with `probability`, a box
  of 2-33 % of the area and log-uniform aspect 0.3-3.3 (first of 10 tries
  that fits). Returns int32 [top, left, height, width, noise seed]; an
  empty box when nothing is erased. device.py fills it with N(0, 1) noise
  after normalising."""
  hf, wf = float(hw[0]), float(hw[1])
  u = tf.random.stateless_uniform([5, 10], seed=key)
  area = hf * wf * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * u[0])
  aspect = tf.exp(ERASE_LOG_RATIO[0] +
                  (ERASE_LOG_RATIO[1] - ERASE_LOG_RATIO[0]) * u[1])
  eh, ew = tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))
  fits = (ew < wf) & (eh < hf)
  first = tf.argmax(tf.cast(fits, tf.int32))
  eh, ew = eh[first], ew[first]
  top = tf.floor(u[2, first] * (hf - eh + 1))
  left = tf.floor(u[3, first] * (wf - ew + 1))
  erase = tf.reduce_any(fits) & (u[4, 0] < probability)
  box = tf.cast(tf.stack([top, left, eh, ew]), tf.int32) * tf.cast(erase,
                                                                  tf.int32)
  seed = tf.random.stateless_uniform([1], seed=fold(key, 1), minval=None,
                                     maxval=None, dtype=tf.int32)
  return tf.concat([box, seed], 0)


# ------------------------------------------------------------- evaluation ---

def eval_transform(image, encoded: bool, hw):
  """torchvision Resize(max(hw) / 0.875, bicubic) + CenterCrop(hw), uint8."""
  image = decode(image) if encoded else image
  size = int(max(hw) / EVAL_CROP_FRACTION)
  shape = tf.shape(image)[:2]
  resized = shape * size // tf.reduce_min(shape)
  # CenterCrop's offset: int(round((size - crop) / 2)), rounding half to even.
  first = tf.cast(tf.round(tf.cast(resized - hw, tf.float64) / 2.), tf.int32)
  return resize(image, (resized[0], resized[1]), (first[0], first[1]), hw)
