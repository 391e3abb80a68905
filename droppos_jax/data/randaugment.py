"""timm's RandAugment ('rand-m9-mstd0.5-inc1', as MAE fine-tunes) on uint8
images in TensorFlow, stateless (keyed per example).

Two ops are drawn with replacement from the 15 "increasing" ones; each is
applied with probability 0.5 at a magnitude drawn from N(9, 0.5) clipped to
[0, 10]. The ops reproduce the PIL calls timm makes, including their
arithmetic, so their outputs equal PIL's pixel for pixel:
- op arguments follow timm's level-to-arg functions in float64, as Python
  computes them (integer thresholds and blend factors land where timm's do);
- enhance blends use PIL's float32 alpha and truncation, grey is PIL's
  fixed-point luma, autocontrast/equalize/solarize/posterize are PIL's LUTs;
- rotate/shear/translate are PIL's affine transform with bicubic resampling
  (what timm uses when MAE passes interpolation='bicubic'): sampling at pixel
  centres, PIL's cubic kernel and operation order in float64, filled with
  timm's img_mean (the ImageNet mean).
PosterizeIncreasing at level 10 keeps 0 bits and gives black, as timm did with
the Pillow of MAE's time; recent Pillow (13) rejects ImageOps.posterize(img,
0), so timm itself raises there.
tests/test_randaugment.py checks every op against PIL on a photo.
"""
from __future__ import annotations

import math

import tensorflow as tf

MAX_LEVEL = 10.
FILL_RGB = (124, 116, 104)        # timm's img_mean: round(255 * IMAGENET_MEAN)
TRANSLATE_FRACTION = 0.45         # timm's translate_pct
OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
       'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing',
       'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing',
       'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def _fold(key, *data):
  for x in data:
    key = tf.random.experimental.stateless_fold_in(key, x)
  return key


def _to_uint8(x):
  """PIL's float -> UINT8 store: clip to [0, 255], then truncate."""
  return tf.cast(tf.floor(tf.clip_by_value(x, 0., 255.)), tf.uint8)


def blend(degenerate, image, factor):
  """PIL's Image.blend(degenerate, image, factor) in float32 (ImageEnhance)."""
  degenerate = tf.cast(degenerate, tf.float32)
  image = tf.cast(image, tf.float32)
  return _to_uint8(degenerate + factor * (image - degenerate))


def grayscale(image):
  """PIL's RGB -> L conversion (fixed-point ITU-R 601-2 luma), int32 [h, w, 1]."""
  rgb = tf.cast(image, tf.int32)
  luma = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471
  return tf.bitwise.right_shift(luma + 0x8000, 16)[..., None]


def autocontrast(image):
  """PIL ImageOps.autocontrast: LUT int(i * scale + offset), in float64."""
  x = tf.cast(image, tf.float64)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scale = 255. / tf.maximum(hi - lo, 1.)
  return tf.where(hi > lo, _to_uint8(x * scale - lo * scale), image)


def equalize(image):
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


def affine(image, matrix):
  """PIL's Image.transform(size, AFFINE, matrix, BICUBIC, fillcolor=FILL_RGB).

  Output pixel (x, y) reads the input at matrix . (x + 0.5, y + 0.5); points
  outside the image get the fill; inside, PIL's cubic convolution (a = -1)
  over the 4x4 neighbours (indices clamped), in float64, truncated to uint8.
  """
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  a = [tf.cast(m, tf.float64) for m in matrix]
  ys, xs = tf.meshgrid(tf.cast(tf.range(h), tf.float64) + 0.5,
                       tf.cast(tf.range(w), tf.float64) + 0.5, indexing='ij')
  xin = a[0] * xs + a[1] * ys + a[2]
  yin = a[3] * xs + a[4] * ys + a[5]
  inside = ((xin >= 0.) & (xin < tf.cast(w, tf.float64)) & (yin >= 0.) &
            (yin < tf.cast(h, tf.float64)))
  x0, y0 = tf.floor(xin - 0.5), tf.floor(yin - 0.5)
  dx, dy = (xin - 0.5 - x0)[..., None], (yin - 0.5 - y0)[..., None]
  taps = tf.range(-1, 3)
  cols = tf.clip_by_value(tf.cast(x0, tf.int32)[..., None] + taps, 0, w - 1)
  rows = tf.clip_by_value(tf.cast(y0, tf.int32)[..., None] + taps, 0, h - 1)
  pixels = tf.cast(image, tf.float64)

  def cubic(v1, v2, v3, v4, d):  # PIL's BICUBIC macro, same operation order
    p2, p3, p4 = -v1 + v3, 2 * (v1 - v2) + v3 - v4, -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))

  def row(i):  # cubic along x in input row rows[..., i] -> [h, w, 3]
    v = [tf.gather_nd(pixels, tf.stack([rows[..., i], cols[..., j]], -1))
         for j in range(4)]
    return cubic(*v, dx)

  value = cubic(*[row(i) for i in range(4)], dy)
  fill = tf.constant(FILL_RGB, tf.uint8)
  return tf.where(inside[..., None], _to_uint8(value), fill)


def rotate(image, degrees):
  """PIL's Image.rotate(degrees) about the centre (counter-clockwise)."""
  h = tf.cast(tf.shape(image)[0], tf.float64)
  w = tf.cast(tf.shape(image)[1], tf.float64)
  degrees = tf.math.floormod(tf.cast(degrees, tf.float64), 360.)  # as PIL
  angle = -(degrees * (math.pi / 180.))                # -math.radians(...)
  cos, sin = [tf.round(v * 1e15) / 1e15  # PIL's round(..., 15)
              for v in (tf.cos(angle), tf.sin(angle))]
  cx, cy = w / 2., h / 2.
  return affine(image, [cos, sin, cos * -cx + sin * -cy + cx,
                        -sin, cos, -sin * -cx + cos * -cy + cy])


def posterize(image, bits):
  """PIL's posterize LUT i & ~(2 ** (8 - bits) - 1); bits = 0 gives black."""
  mask = tf.bitwise.bitwise_and(tf.bitwise.left_shift(255, 8 - bits), 255)
  return tf.bitwise.bitwise_and(image, tf.cast(mask, tf.uint8))


def mean_grey(image):
  """PIL's int(ImageStat.Stat(image.convert('L')).mean[0] + 0.5): an exact
  integer sum, a float64 mean."""
  grey = tf.cast(grayscale(image), tf.int64)
  mean = (tf.cast(tf.reduce_sum(grey), tf.float64) /
          tf.cast(tf.size(grey), tf.float64))
  return tf.floor(mean + 0.5)


def sharpness(image, factor):
  """PIL's SMOOTH-filter blend; border pixels keep their value."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.floor(
      tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], 'VALID')[0] + 0.5)
  degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  interior = tf.pad(tf.ones(tf.stack([h - 2, w - 2, 3])),
                    [[1, 1], [1, 1], [0, 0]])
  degenerate = interior * degenerate + (1. - interior) * x[0]
  return blend(degenerate, image, factor)


def apply_op(index, image, level, sign):
  """OPS[index] at `level` in [0, 10]; `sign` (+-1) negates signed args.

  Arguments follow timm's level-to-arg functions in float64 (Python floats),
  so integer thresholds and blend factors land exactly where timm's do.
  """
  f = tf.cast(level, tf.float64) / MAX_LEVEL   # level / timm's _LEVEL_DENOM
  sign = tf.cast(sign, tf.float64)
  h = tf.cast(tf.shape(image)[0], tf.float64)
  w = tf.cast(tf.shape(image)[1], tf.float64)
  # PIL's blend takes a C float alpha.
  enhance = tf.cast(tf.maximum(1. + sign * (f * 0.9), 0.1), tf.float32)
  bits = 4 - tf.cast(f * 4., tf.int32)
  threshold = 256 - tf.minimum(256, tf.cast(f * 256., tf.int32))
  add = tf.minimum(128, tf.cast(f * 110., tf.int32))
  shear = sign * (f * 0.3)
  move = sign * (f * TRANSLATE_FRACTION)
  i32 = lambda: tf.cast(image, tf.int32)
  branches = [
      lambda: autocontrast(image),
      lambda: equalize(image),
      lambda: 255 - image,
      lambda: rotate(image, sign * (f * 30.)),
      lambda: posterize(image, bits),
      lambda: tf.cast(tf.where(i32() < threshold, i32(), 255 - i32()), tf.uint8),
      lambda: tf.cast(tf.where(i32() < 128, tf.minimum(i32() + add, 255), i32()),
                      tf.uint8),
      lambda: blend(grayscale(image), image, enhance),
      lambda: blend(mean_grey(image), image, enhance),
      lambda: blend(tf.zeros_like(image), image, enhance),
      lambda: sharpness(image, enhance),
      lambda: affine(image, [1., shear, 0., 0., 1., 0.]),
      lambda: affine(image, [1., 0., 0., shear, 1., 0.]),
      lambda: affine(image, [1., 0., move * w, 0., 1., 0.]),
      lambda: affine(image, [1., 0., 0., 0., 1., move * h]),
  ]
  return tf.switch_case(index, branches)


def layer_draws(key, magnitude: float, magnitude_std: float, prob: float):
  """One layer's random choices, as timm's RandAugment and AugmentOp make
  them: (op index, applied?, level, sign). The op is uniform over OPS, applied
  with probability `prob`; the level is N(magnitude, magnitude_std) (uniform
  in [0, magnitude] for magnitude_std > 100, timm's 'mstd' switch) clipped to
  [0, 10]; the sign negates signed args with probability 0.5."""
  u = tf.random.stateless_uniform([3], seed=key)
  noise_key = _fold(key, 1)
  if magnitude_std > 100:
    level = magnitude * tf.random.stateless_uniform([], seed=noise_key)
  else:
    level = magnitude + magnitude_std * tf.random.stateless_normal(
        [], seed=noise_key)
  level = tf.clip_by_value(level, 0., MAX_LEVEL)
  index = tf.minimum(tf.cast(u[0] * len(OPS), tf.int32), len(OPS) - 1)
  sign = tf.where(u[2] > 0.5, -1., 1.)
  return index, u[1] < prob, level, sign


def rand_augment(image, key, num_layers: int = 2, magnitude: float = 9.,
                 magnitude_std: float = 0.5, prob: float = 0.5):
  """timm RandAugment on a uint8 [h, w, 3] image: `num_layers` ops drawn with
  replacement, each applied with probability `prob`."""
  for layer in range(num_layers):
    index, applied, level, sign = layer_draws(
        _fold(key, layer), magnitude, magnitude_std, prob)
    image = tf.cond(applied, lambda: apply_op(index, image, level, sign),
                    lambda: image)
  return image
