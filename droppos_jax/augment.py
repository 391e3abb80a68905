"""Fine-tuning augmentations in TensorFlow, stateless (keyed per example).

The train transform follows timm's `create_transform` as MAE fine-tunes:
RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment
('rand-m9-mstd0.5-inc1': 2 ops from the 15 "increasing" ones, each applied
with probability 0.5 at a magnitude drawn from N(9, 0.5) clipped to [0, 10])
-> normalise -> random erasing ('pixel' mode: normal noise, one box).
Every random draw comes from `tf.random.stateless_*` with a key derived from
the example's key, so a stream is a pure function of (seed, example index).
Ops act on uint8 images like PIL's; geometric ops fill with the ImageNet mean.
"""
from __future__ import annotations

import math
from typing import Sequence

MAX_LEVEL = 10.
FILL_RGB = (124, 116, 104)        # timm's img_mean: round(255 * IMAGENET_MEAN)
TRANSLATE_FRACTION = 0.45         # timm's translate_pct
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))
OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
       'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing',
       'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing',
       'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def _fold(tf, key, *data):
  for x in data:
    key = tf.random.experimental.stateless_fold_in(key, x)
  return key


def crop_box(tf, shape, key, scale: Sequence[float],
             ratio: Sequence[float] = (3 / 4, 4 / 3)):
  """torchvision RandomResizedCrop box (top, left, h, w): 10 tries, then the
  largest centred crop with the ratio clamped to the range."""
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


# ------------------------------------------------------------- RandAugment ---

def _blend(tf, degenerate, image, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped."""
  degenerate, image = tf.cast(degenerate, tf.float32), tf.cast(image, tf.float32)
  out = degenerate + factor * (image - degenerate)
  return tf.cast(tf.clip_by_value(tf.round(out), 0., 255.), tf.uint8)


def _grayscale(tf, image):
  """PIL's L conversion (ITU-R 601-2 luma), as float [h, w, 1]."""
  rgb = tf.cast(image, tf.float32)
  return tf.floor(tf.reduce_sum(rgb * tf.constant([0.299, 0.587, 0.114]),
                                axis=-1, keepdims=True) + 0.5)


def _autocontrast(tf, image):
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scaled = (x - lo) * 255. / tf.maximum(hi - lo, 1.)
  out = tf.where(hi > lo, scaled, x)
  return tf.cast(tf.clip_by_value(tf.round(out), 0., 255.), tf.uint8)


def _equalize(tf, image):
  """PIL ImageOps.equalize, channel by channel."""
  def channel(c):
    c = tf.cast(c, tf.int32)
    hist = tf.math.bincount(tf.reshape(c, [-1]), minlength=256, maxlength=256)
    last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
    step = (tf.reduce_sum(hist) - last) // 255
    lut = (tf.concat([[0], tf.cumsum(hist)[:-1]], 0) + step // 2) // tf.maximum(
        step, 1)
    lut = tf.clip_by_value(lut, 0, 255)
    return tf.where(step == 0, c, tf.gather(lut, c))
  return tf.cast(tf.stack([channel(image[..., i]) for i in range(3)], -1),
                 tf.uint8)


def _transform(tf, image, matrix):
  """Affine warp (output pixel -> input pixel, 8-vector), bilinear, with
  out-of-image pixels set to FILL_RGB."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  x = tf.concat([tf.cast(image, tf.float32),
                 tf.ones(tf.stack([h, w, 1]), tf.float32)], -1)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=x[None], transforms=tf.reshape(tf.stack(matrix), [1, 8]),
      output_shape=tf.stack([h, w]), fill_value=0., interpolation='BILINEAR',
      fill_mode='CONSTANT')[0]
  inside = out[..., 3:]
  out = out[..., :3] + (1. - inside) * tf.constant(FILL_RGB, tf.float32)
  return tf.cast(tf.clip_by_value(tf.round(out), 0., 255.), tf.uint8)


def _rotate(tf, image, degrees):
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  a = -degrees * math.pi / 180.  # positive = counter-clockwise, as PIL
  cos, sin = tf.cos(a), tf.sin(a)
  cx, cy = w / 2., h / 2.
  return _transform(tf, image, [cos, sin, cx - cos * cx - sin * cy,
                                -sin, cos, cy + sin * cx - cos * cy, 0., 0.])


def _sharpness(tf, image, factor):
  """PIL's SMOOTH kernel blend; border pixels keep their value."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.round(tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], 'VALID')[0])
  degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  interior = tf.pad(tf.ones(tf.stack([h - 2, w - 2, 3])),
                    [[1, 1], [1, 1], [0, 0]])
  degenerate = interior * degenerate + (1. - interior) * x[0]
  return _blend(tf, degenerate, image, factor)


def _apply_op(tf, index, image, level, sign):
  """OPS[index] at `level` in [0, 10]; `sign` (+-1) negates signed args."""
  f = level / MAX_LEVEL
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  enhance = 1. + sign * f * 0.9
  bits = 4 - tf.cast(f * 4., tf.int32)
  shift = tf.cast(8 - bits, tf.uint8)
  threshold = 256 - tf.cast(f * 256., tf.int32)
  add = tf.cast(f * 110., tf.int32)
  shear = sign * f * 0.3
  move = sign * f * TRANSLATE_FRACTION
  i32 = lambda: tf.cast(image, tf.int32)
  branches = [
      lambda: _autocontrast(tf, image),
      lambda: _equalize(tf, image),
      lambda: 255 - image,
      lambda: _rotate(tf, image, sign * f * 30.),
      lambda: tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift),
      lambda: tf.cast(tf.where(i32() < threshold, i32(), 255 - i32()), tf.uint8),
      lambda: tf.cast(tf.where(i32() < 128, tf.minimum(i32() + add, 255), i32()),
                      tf.uint8),
      lambda: _blend(tf, _grayscale(tf, image), image, enhance),
      lambda: _blend(tf, tf.floor(tf.reduce_mean(_grayscale(tf, image)) + 0.5),
                     image, enhance),
      lambda: _blend(tf, tf.zeros_like(image), image, enhance),
      lambda: _sharpness(tf, image, enhance),
      lambda: _transform(tf, image, [1., shear, 0., 0., 1., 0., 0., 0.]),
      lambda: _transform(tf, image, [1., 0., 0., shear, 1., 0., 0., 0.]),
      lambda: _transform(tf, image, [1., 0., move * w, 0., 1., 0., 0., 0.]),
      lambda: _transform(tf, image, [1., 0., 0., 0., 1., move * h, 0., 0.]),
  ]
  return tf.switch_case(index, branches)


def rand_augment(tf, image, key, num_layers: int = 2, magnitude: float = 9.,
                 magnitude_std: float = 0.5, prob: float = 0.5):
  """timm RandAugment on a uint8 [h, w, 3] image: `num_layers` ops drawn with
  replacement, each applied with probability `prob`."""
  for layer in range(num_layers):
    k = _fold(tf, key, layer)
    u = tf.random.stateless_uniform([3], seed=k)
    level = magnitude + magnitude_std * tf.random.stateless_normal(
        [], seed=_fold(tf, k, 1))
    level = tf.clip_by_value(level, 0., MAX_LEVEL)
    index = tf.minimum(tf.cast(u[0] * len(OPS), tf.int32), len(OPS) - 1)
    sign = tf.where(u[2] > 0.5, -1., 1.)
    augmented = _apply_op(tf, index, image, level, sign)
    image = tf.where(u[1] < prob, augmented, image)
  return image


def random_erasing(tf, image, key, probability: float):
  """timm RandomErasing('pixel', count 1) on a normalised float image: with
  `probability`, a box of 2-33 % of the area and log-uniform aspect 0.3-3.3
  (first of 10 tries that fits) becomes N(0, 1) noise."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
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
  rows = tf.range(hf)[:, None, None]
  cols = tf.range(wf)[None, :, None]
  box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
  erase = box & tf.reduce_any(fits) & (u[4, 0] < probability)
  noise = tf.random.stateless_normal(tf.shape(image), seed=_fold(tf, key, 1))
  return tf.where(erase, noise, image)


def train_transform(tf, image, key, hw, *, crop_scale: Sequence[float],
                    randaugment_layers: int = 0, randaugment_magnitude: float = 9.,
                    randaugment_mstd: float = 0.5, random_erasing_prob: float = 0.,
                    normalize):
  """RRC(bicubic) + flip [+ RandAugment] + `normalize` [+ random erasing]."""
  top, left, h, w = crop_box(tf, tf.shape(image), _fold(tf, key, 0), crop_scale)
  crop = tf.image.resize(tf.cast(image[top:top + h, left:left + w], tf.float32),
                         hw, method='bicubic', antialias=True)
  crop = tf.image.stateless_random_flip_left_right(crop, seed=_fold(tf, key, 1))
  if randaugment_layers:
    crop = tf.cast(tf.round(tf.clip_by_value(crop, 0., 255.)), tf.uint8)
    crop = rand_augment(tf, crop, _fold(tf, key, 2), randaugment_layers,
                        randaugment_magnitude, randaugment_mstd)
    crop = tf.cast(crop, tf.float32)
  out = normalize(tf, crop)
  if random_erasing_prob > 0:
    out = random_erasing(tf, out, _fold(tf, key, 3), random_erasing_prob)
  return out
