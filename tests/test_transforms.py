"""Per-example transforms (data/transforms.py) against PIL, what the authors'
torchvision pipeline computes: decoding, RandomResizedCrop (box, fused JPEG
crop, bicubic resize, flip), the evaluation crop, random-erasing draws."""
import io
import re

import numpy as np
from PIL import Image
import pytest
from skimage import data as skdata
import tensorflow as tf

from droppos_jax.data import transforms
from droppos_jax.errors import UserError


def jpeg_bytes(image, quality=90, subsampling=2):
  out = io.BytesIO()
  Image.fromarray(image).save(out, format='JPEG', quality=quality,
                              subsampling=subsampling)
  return out.getvalue()


@pytest.fixture(scope='module')
def photos():
  """Two real photos as JPEGs of odd, ImageNet-like sizes (4:2:0 and 4:4:4)."""
  astronaut = np.asarray(Image.fromarray(skdata.astronaut()).resize((375, 301)))
  chelsea = skdata.chelsea()[:299, :431]
  return [jpeg_bytes(astronaut), jpeg_bytes(chelsea, quality=85, subsampling=0)]


def key(i):
  return tf.constant([i, 7], tf.int64)


def pil(data):
  return Image.open(io.BytesIO(data)).convert('RGB')


def test_jpeg_decoding_is_pils(photos):
  for data in photos:
    np.testing.assert_array_equal(transforms.decode(tf.constant(data)),
                                  np.asarray(pil(data)))


def test_crop_box_follows_random_resized_crop():
  for shape in [(30, 40), (20, 200)]:
    boxes = np.array([[int(v) for v in transforms.crop_box(
        tf.constant(shape), key(k))] for k in range(100)])
    top, left, h, w = boxes.T
    assert np.all((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1))
    assert np.all((top + h <= shape[0]) & (left + w <= shape[1]))
    if shape == (30, 40):  # No fallback needed: scale and ratio in range.
      area = h * w / (shape[0] * shape[1])
      assert area.min() > 0.15 and area.max() <= 1
      assert np.all((w / h > 0.6) & (w / h < 1.5))
    else:  # Mostly the centred fallback crop with ratio 4/3.
      assert np.mean((h == 20) & (w == 27)) > 0.5


def test_fused_jpeg_crop_equals_the_crop_of_the_full_decode(photos):
  for data in photos:
    shape = tf.io.extract_jpeg_shape(data)
    for k in range(12):
      box_fn = lambda s, k=k: transforms.crop_box(s, key(k))
      fused = transforms.decode_crop(tf.constant(data), box_fn)
      full = transforms.crop(transforms.decode(tf.constant(data)), box_fn)
      assert fused.shape == full.shape
      assert list(fused.shape[:2]) == [int(v) for v in box_fn(shape)[2:]]
      np.testing.assert_array_equal(fused, full)


@pytest.mark.parametrize('out_hw', [(224, 224), (32, 48), (300, 160)])
def test_resize_is_pils_bicubic(photos, out_hw):
  image = np.asarray(pil(photos[0]))[:250, :230]
  ours = transforms.resize(tf.constant(image), out_hw).numpy().astype(int)
  theirs = np.asarray(Image.fromarray(image).resize(out_hw[::-1],
                                                    Image.BICUBIC)).astype(int)
  assert ours.shape == theirs.shape
  assert np.abs(ours - theirs).max() <= 1
  assert np.mean(ours != theirs) < 0.01


def test_train_crop_is_torchvisions_random_resized_crop_and_flip(photos):
  """The whole pre-training transform against PIL given the same box:
  crop, bicubic resize to 224, flip; both flips occur."""
  flips = set()
  for k in range(6):
    data = photos[k % 2]
    image = pil(data)
    top, left, h, w = (int(v) for v in transforms.crop_box(
        tf.io.extract_jpeg_shape(data), transforms.fold(key(k), 0)))
    ref = np.asarray(image.crop((left, top, left + w, top + h)).resize(
        (224, 224), Image.BICUBIC)).astype(int)
    ours = transforms.PRETRAIN(tf.constant(data), True, key(k),
                               (224, 224))['image'].numpy().astype(int)
    flipped = np.abs(ours - ref[:, ::-1]).max() <= 1
    assert flipped or np.abs(ours - ref).max() <= 1, k
    flips.add(flipped)
  assert flips == {True, False}


def test_device_resize_window_ships_the_crop_window_and_flip(photos):
  """With device_resize_window the host sends the crop window itself (or,
  when it is over the window, its resize) and the flip PRETRAIN draws."""
  augment = transforms.TrainAugment(device_resize_window=256)
  seen = set()
  for k in range(12):
    data = tf.constant(photos[k % 2])
    box_fn = lambda s, k=k: transforms.crop_box(s, transforms.fold(key(k), 0))
    window = transforms.decode_crop(data, box_fn)
    fits = max(window.shape[:2]) <= 256
    out = augment(data, True, key(k), (224, 224))
    expected = window if fits else transforms.resize(window, (224, 224))
    np.testing.assert_array_equal(out['window'], expected)
    assert list(out['window_hw']) == list(expected.shape[:2])
    host = transforms.PRETRAIN(data, True, key(k), (224, 224))['image']
    resized = transforms.resize(window, (224, 224)).numpy()
    flip = bool(out['flip'])
    np.testing.assert_array_equal(host, resized[:, ::-1] if flip else resized)
    seen.add((fits, flip))
  assert {f for f, _ in seen} == {True, False}
  assert {f for _, f in seen} == {True, False}


@pytest.mark.parametrize('kwargs,hw,message', [
    (dict(device_resize_window=-1), None, 'device_resize_window=-1 must be 0'),
    (dict(device_resize_window=512, randaugment_layers=2), None,
     'needs randaugment_layers=0'),
    (dict(device_resize_window=128), (224, 224),
     'square image_size of at most 128 pixels, got (224, 224)'),
    (dict(device_resize_window=512), (224, 160), 'got (224, 160)'),
])
def test_device_resize_window_errors(kwargs, hw, message):
  with pytest.raises(UserError, match=re.escape(message)):
    transforms.TrainAugment(**kwargs).check_size(hw)


@pytest.mark.parametrize('window,hw,platform,resolved', [
    (-1, (224, 224), 'tpu', 512), (-1, (224, 224), 'gpu', 512),
    (-1, (224, 224), 'cpu', 0),
    # By platform, only where the chips can resize: square, <= 512 pixels.
    (-1, (224, 160), 'tpu', 0), (-1, (640, 640), 'gpu', 0),
    (0, (224, 224), 'tpu', 0), (256, (224, 224), 'cpu', 256),
])
def test_device_resize_window_by_platform(window, hw, platform, resolved):
  augment = transforms.pretrain_augment(window, hw, platform)
  assert augment.device_resize_window == resolved
  assert augment.randaugment_layers == 0


def test_device_resize_window_below_by_platform():
  with pytest.raises(UserError, match=re.escape(
      'device_resize_window=-2 must be -1 (by platform: 512 on TPUs and '
      'GPUs, 0 on CPUs), 0 (resize on the host) or a window size in pixels, '
      'e.g. 512.')):
    transforms.pretrain_augment(-2, (224, 224), 'tpu')


def test_eval_transform_is_resize_then_centre_crop(photos):
  data = photos[1]
  ours = transforms.eval_transform(tf.constant(data), True, (224, 224))
  image = pil(data)
  size = int(224 / 0.875)  # torchvision Resize(256): the shorter side
  w, h = image.size
  new = (size * w // h, size) if w > h else (size, size * h // w)
  resized = image.resize(new, Image.BICUBIC)
  left, top = int(round((new[0] - 224) / 2)), int(round((new[1] - 224) / 2))
  ref = np.asarray(resized.crop((left, top, left + 224, top + 224))).astype(int)
  assert np.abs(ours.numpy().astype(int) - ref).max() <= 1


def test_erase_boxes_follow_timm():
  boxes = np.array([transforms.erase_box(key(k), (32, 32), 0.25).numpy()
                    for k in range(400)])
  erased = boxes[:, 2] > 0
  assert 0.18 < erased.mean() < 0.32
  area = boxes[erased, 2] * boxes[erased, 3] / 32**2
  assert area.min() >= 0.015 and area.max() <= 0.34
  assert np.all(boxes[erased, 0] + boxes[erased, 2] <= 32)
  assert np.all(boxes[~erased, :4] == 0)
  assert not np.any(transforms.erase_box(key(1), (32, 32), 0.).numpy()[:4])


@pytest.mark.parametrize('field,value,message', [
    ('crop_scale', (0.5, 0.1), 'crop_scale'),
    ('randaugment_layers', -1, 'randaugment_layers=-1'),
    ('randaugment_magnitude', 11, 'randaugment_magnitude=11'),
    ('random_erasing', 1.5, 'random_erasing=1.5'),
])
def test_finetune_augment_errors(field, value, message):
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(
      crop_scale=(0.08, 1.), randaugment_layers=2, randaugment_magnitude=9.,
      randaugment_mstd=0.5, random_erasing=0.25))
  cfg[field] = value
  with pytest.raises(UserError, match=message):
    transforms.finetune_augment(cfg)
