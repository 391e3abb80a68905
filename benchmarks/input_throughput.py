r"""Throughput of the pre-training input stream on real-size JPEGs, against
the loader users would otherwise pick (a PyTorch DataLoader + PIL).

  python benchmarks/input_throughput.py                 # 2,000 files, ~5 min
  python benchmarks/input_throughput.py --num_files 300 --seconds 5  # quick

Writes `--num_files` JPEGs (random crops of the photos bundled with the demo,
re-encoded at ImageNet-like sizes around 500x375, quality 90) once into
`--dir`, as an image folder and as TFDS datasets prepared offline in the
ArrayRecord and TFRecord formats. Then it measures, after warm-up, images/s
at 224 px of:
  - ours: the pre-training stream exactly as training consumes it
    (data.device.train_batches: decode the crop window, PIL-exact bicubic
    resize, flip, uint8 to the device, normalise there), one per source;
  - ours with `device_resize_window=512` (folder): the host's part only
    (decode the crop window, pad it, put the batch on the device), since
    the resize then runs on the accelerators; its cost there is printed
    below the table (compiled FLOPs per image, and its time here, where the
    CPU is the device);
  - torch: DataLoader(num_workers=cores) over the image folder with PIL
    doing the same RandomResizedCrop(224, scale (0.2, 1), bicubic), flip and
    normalisation (torchvision's algorithm written out; torchvision does not
    import beside this torch). Skipped, and said so, without torch.
Both sides use every core of this machine; the table gives images/s per
core. Asserts nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import random
import subprocess
import sys
import time

import numpy as np
from PIL import Image

SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (400, 500), (640, 480))


def write_jpegs(folder: pathlib.Path, num_files: int, seed: int = 0) -> None:
  """`num_files` JPEGs in 8 class folders: random crops of the demo photos
  resized to ImageNet-like sizes, quality 90."""
  from droppos_jax.data import demo  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  photos = [demo._photo(name) for name in demo.CLASS_NAMES]  # pylint: disable=protected-access
  for i in range(num_files):
    photo = photos[i % len(photos)]
    h, w = photo.shape[:2]
    side = rng.uniform(0.5, 1.0)
    ch, cw = int(h * side), int(w * side)
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    size = SIZES[rng.integers(len(SIZES))]
    image = Image.fromarray(photo[top:top + ch, left:left + cw]).resize(
        size, Image.BICUBIC)
    out = folder / f'class_{i % 8}' / f'{i:05d}.jpg'
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, quality=90)


def prepare_tfds(folder: pathlib.Path, data_dir: pathlib.Path,
                 file_format: str) -> None:
  """The image folder as a TFDS dataset in `file_format`, prepared offline
  (the JPEG bytes stored as they are)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  files = sorted(folder.rglob('*.jpg'))

  class BenchJpegs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(encoding_format='jpeg'),
          'label': tfds.features.ClassLabel(num_classes=8)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for f in files:
        yield f.name, {'image': f, 'label': int(f.parent.name.split('_')[1])}

  BenchJpegs(data_dir=str(data_dir), file_format=file_format).download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=16))


WINDOW = 512  # device_resize_window of the host-part row
DEVICE_RESIZE = 'folder_device_resize'


def ours(data_cfg: dict, *, batch: int, seconds: float, warmup: int,
         window: int = 0) -> float:
  """Images/s of the pre-training stream as the trainer consumes it; with
  `window`, of the host's part only."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from droppos_jax import sharding  # pylint: disable=g-import-not-at-top
  from droppos_jax.data import device, sources, streams, transforms  # pylint: disable=g-import-not-at-top
  source = sources.open_source(ml_collections.ConfigDict(data_cfg))
  if window:
    batches = map(jax.device_put, streams.train_stream(
        source, transforms.TrainAugment(device_resize_window=window),
        image_size=224, global_batch_size=batch, seed=0))
  else:
    batches = device.train_batches(
        source, transforms.PRETRAIN, image_hw=(224, 224), batch_size=batch,
        seed=0, start_step=0, mesh=sharding.make_mesh(num_devices=1))
  for _ in range(warmup):
    jax.block_until_ready(next(batches))
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    jax.block_until_ready(next(batches))
    count += batch
  return count / (time.perf_counter() - start)


class _TorchJpegs:
  """torchvision's RandomResizedCrop(224, (0.2, 1), bicubic) + flip +
  ToTensor + Normalize on PIL, as the authors' pre-training pipeline."""
  MEAN = np.array([0.485, 0.456, 0.406], np.float32)
  STD = np.array([0.229, 0.224, 0.225], np.float32)

  def __init__(self, files):
    self.files = files

  def __len__(self):
    return len(self.files)

  @staticmethod
  def crop_box(width, height, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
      target = area * random.uniform(*scale)
      aspect = math.exp(random.uniform(*log_ratio))
      w = int(round(math.sqrt(target * aspect)))
      h = int(round(math.sqrt(target / aspect)))
      if 0 < w <= width and 0 < h <= height:
        return random.randint(0, height - h), random.randint(0, width - w), h, w
    in_ratio = width / height
    w, h = ((width, int(round(width / ratio[0]))) if in_ratio < ratio[0] else
            (int(round(height * ratio[1])), height) if in_ratio > ratio[1] else
            (width, height))
    return (height - h) // 2, (width - w) // 2, h, w

  def __getitem__(self, i):
    import torch  # pylint: disable=g-import-not-at-top
    image = Image.open(self.files[i]).convert('RGB')
    top, left, h, w = self.crop_box(*image.size)
    image = image.crop((left, top, left + w, top + h)).resize((224, 224),
                                                             Image.BICUBIC)
    if random.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    x = (np.asarray(image, np.float32) / 255. - self.MEAN) / self.STD
    return torch.from_numpy(x.transpose(2, 0, 1).copy()), 0


def torch_loader(folder: pathlib.Path, *, batch: int, seconds: float,
                 warmup: int, workers: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)  # the workers are the parallelism, as in practice
  loader = torch.utils.data.DataLoader(
      _TorchJpegs(sorted(folder.rglob('*.jpg'))), batch_size=batch,
      shuffle=True, num_workers=workers, drop_last=True,
      persistent_workers=True, prefetch_factor=4)
  count, start, seen = 0, None, 0
  while start is None or time.perf_counter() - start < seconds:
    for _ in loader:
      seen += 1
      if seen == warmup:
        start = time.perf_counter()
      elif start is not None:
        count += batch
        if time.perf_counter() - start >= seconds:
          break
  return count / (time.perf_counter() - start)


def device_resize_cost(batch: int) -> tuple[float, float]:
  """(GFLOP per image compiled, ms per image here) of resizing windows of
  WINDOW pixels to 224 on the device (data.device.resize_windows)."""
  import jax  # pylint: disable=g-import-not-at-top
  from droppos_jax import plan, sharding  # pylint: disable=g-import-not-at-top
  from droppos_jax.data import device  # pylint: disable=g-import-not-at-top
  flops, _, _ = plan.resize_cost(WINDOW, 224, batch,
                                 sharding.make_mesh(num_devices=1))
  rng = np.random.default_rng(0)
  args = [jax.device_put(x) for x in (
      rng.integers(0, 256, (batch, WINDOW, WINDOW, 3), np.uint8),
      rng.integers(100, WINDOW, (batch, 2)).astype(np.int32),
      rng.random(batch) < 0.5)]
  resize = jax.jit(device.resize_windows, static_argnums=3)
  jax.block_until_ready(resize(*args, 224))
  start = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(resize(*args, 224))
  ms = (time.perf_counter() - start) / 3 / batch * 1e3
  return flops / batch / 1e9, ms


def measure(name: str, a, folder: pathlib.Path, configs: dict):
  if name == 'torch':
    return torch_loader(folder, batch=a.batch, seconds=a.seconds,
                        warmup=a.warmup, workers=os.cpu_count())
  if name == DEVICE_RESIZE:
    return ours(configs['folder'], batch=a.batch, seconds=a.seconds,
                warmup=a.warmup, window=WINDOW)
  if name == 'device_resize_cost':
    return device_resize_cost(a.batch)
  return ours(configs[name], batch=a.batch, seconds=a.seconds,
              warmup=a.warmup)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--dir', default='/tmp/droppos_input_bench')
  p.add_argument('--num_files', type=int, default=2000)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--seconds', type=float, default=30.)
  p.add_argument('--warmup', type=int, default=5)
  p.add_argument('--sources', default='folder,array_record,tfrecord,'
                 f'{DEVICE_RESIZE},torch')
  p.add_argument('--measure', help=argparse.SUPPRESS)  # one source, in a child
  a = p.parse_args()
  root = pathlib.Path(a.dir) / str(a.num_files)
  folder = root / 'folder'
  configs = {'folder': dict(source='folder', path=str(folder))}
  for fmt in ('array_record', 'tfrecord'):
    configs[fmt] = dict(source='tfds', name='bench_jpegs', split='train',
                        data_dir=str(root / f'tfds_{fmt}'))
  if a.measure:
    print(json.dumps({'rate': measure(a.measure, a, folder, configs)}))
    return
  if not folder.exists():
    print(f'Writing {a.num_files} JPEGs to {folder} ...')
    write_jpegs(folder, a.num_files)
  names = a.sources.split(',')
  for fmt in ('array_record', 'tfrecord'):
    if fmt in names and not (root / f'tfds_{fmt}' / 'bench_jpegs').exists():
      prepare_tfds(folder, root / f'tfds_{fmt}', fmt)
  if 'torch' in names and importlib.util.find_spec('torch') is None:
    print('torch is not installed: no DataLoader baseline (pip install torch).')
    names.remove('torch')
  cores = os.cpu_count()
  sizes = [Image.open(f).size for f in sorted(folder.rglob('*.jpg'))[:200]]
  print(f'{a.num_files} JPEGs (mean {np.mean([s[0] for s in sizes]):.0f}x'
        f'{np.mean([s[1] for s in sizes]):.0f}, quality 90), 224 px, batch '
        f'{a.batch}, {cores} cores, {a.seconds:.0f} s after {a.warmup} '
        'warm-up batches, each loader in its own process')
  def child(name):  # a fresh process each: no state shared between loaders
    out = subprocess.run(
        [sys.executable, __file__, '--measure', name, '--dir', a.dir,
         '--num_files', str(a.num_files), '--batch', str(a.batch),
         '--seconds', str(a.seconds), '--warmup', str(a.warmup)],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])['rate']
  rates = {name: child(name) for name in names}
  base = rates.get('torch')
  print(f'| loader | images/s | images/s per core |'
        f'{" vs torch |" if base else ""}')
  print(f'|---|---|---|{"---|" if base else ""}')
  labels = {'torch': 'torch DataLoader + PIL',
            DEVICE_RESIZE: f'ours, folder, device_resize_window={WINDOW} '
                           '(host part)'}
  for name, rate in rates.items():
    ratio = f' {rate / base:.2f}x |' if base else ''
    print(f'| {labels.get(name, f"ours, {name}")} | {rate:.0f} | '
          f'{rate / cores:.0f} |{ratio}')
  if DEVICE_RESIZE in names:
    gflop, ms = child('device_resize_cost')
    print(f'device_resize_window={WINDOW}: the accelerators resize each '
          f'window, {gflop:.2f} GFLOP per image (compiled, float32); here, '
          f'where the CPU is the accelerator, {ms:.1f} ms per image.')


if __name__ == '__main__':
  main()
