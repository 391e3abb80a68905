r"""Records/s of the input stream per host when every storage request takes
a fixed latency, as on cloud storage (gs://).

  python benchmarks/input_latency.py                     # about 8 minutes
  python benchmarks/input_latency.py --num_files 200 --seconds 2  # quick

What it models. benchmarks/storage_latency.c, preloaded into the process
that reads, delays each storage request to the dataset's files by
--latency_ms before the read, and the thread that makes it waits, as on a
blocking cloud-storage reader. What a request is follows the reader that
serves gs:// for each format: ArrayRecord (array_record's own reader): every
read()/pread() call, of the bytes it asks for (one record); TFRecord
(TensorFlow's GCS file system): a block of GCS_BLOCK_MB, fetched when a
file's read passes the end of its last block, whatever size our reader asks
for (sources.TFRECORD_BUFFER). The readers' own behaviour is left as it is
and measured: how many requests they keep in flight (their threads: ours,
array_record's pool of 64, tf.data's), how many bytes each request carries
and how many requests a record costs. Not modelled: bandwidth (a request's
time does not grow with its bytes), request-rate limits, and the CPU of TLS
and HTTP (zero latency is the CPU baseline). Latency 0 runs without the
preload. The default latencies, 0, 30 and 120 ms: the CPU baseline, a
typical request and four times that, which shows whether 30 ms is hidden
with room to spare (a read stage bound by its requests slows down in
proportion to their latency).

It writes --num_files JPEGs (as benchmarks/input_throughput.py does) as TFDS
datasets in the ArrayRecord and TFRecord formats, then measures in a fresh
process each, after warm-up:
  - read: records/s of the read stage alone (the stream's records in step
    order, before any decoding: streams._indexed_records for ArrayRecord,
    streams._file_records for TFRecord), its CPU time per record, the CPU
    time per record of its busiest thread (what no number of cores can
    spread) and the process's peak resident memory;
  - stream: images/s of the whole pre-training stream (decode the crop
    window, resize to 224 px, flip; uint8 batches on the host; with
    --device_resize_window the host's part only: decode and pad the window),
    and its CPU time per image.
The JPEGs' TFDS files are small (2,000 records of ~32 KiB in 16 files: one
request each). With --shard_records N it also measures the TFRecord read
stage on ImageNet-shaped files: 16 files of N records of random bytes, 90-130
KB each (ImageNet's TFDS shards hold about 1,250 JPEGs of ~110 KB, so a file
takes several requests).
Asserts nothing.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import input_throughput
import numpy as np

SHIM = pathlib.Path(__file__).with_name('storage_latency.c')
FORMATS = ('array_record', 'tfrecord')
SHARD_FILES = 16
SHARD_BYTES = (90_000, 130_000)
# TensorFlow's GCS file system fetches a file in blocks of this many MiB
# (GCS_READ_CACHE_BLOCK_SIZE_MB), whatever the reader asks for.
GCS_BLOCK_MB = 64
TICKS = os.sysconf('SC_CLK_TCK')


def write_shards(folder: pathlib.Path, records_per_file: int) -> None:
  """SHARD_FILES TFRecord files of `records_per_file` random records of
  SHARD_BYTES each, written to a side folder and then moved in place."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  part = folder.with_name(folder.name + '.part')
  part.mkdir(parents=True, exist_ok=True)
  for f in range(SHARD_FILES):
    with tf.io.TFRecordWriter(str(part / f'shard-{f:05d}.tfrecord')) as out:
      for _ in range(records_per_file):
        out.write(rng.bytes(int(rng.integers(*SHARD_BYTES))))
  part.rename(folder)


def shards_dir(a) -> pathlib.Path:
  return a.root / f'shards_{a.shard_records}'


def build_shim(out_dir: pathlib.Path) -> pathlib.Path:
  """storage_latency.c compiled into `out_dir`."""
  lib = out_dir / 'storage_latency.so'
  subprocess.run(['cc', '-O2', '-shared', '-fPIC', '-o', str(lib), str(SHIM),
                  '-ldl'], check=True)
  return lib


def storage_stats() -> list[int] | None:
  """[requests, bytes, most in flight] since the last call, when the shim
  is preloaded; else None."""
  try:
    stats = ctypes.CDLL(None).storage_latency_stats
  except AttributeError:
    return None
  out = (ctypes.c_long * 3)()
  stats(out)
  return list(out)


def thread_cpu() -> dict[int, float]:
  """CPU seconds of each of this process's threads so far."""
  out = {}
  for task in pathlib.Path('/proc/self/task').iterdir():
    try:
      fields = (task / 'stat').read_text().rsplit(')', 1)[1].split()
    except OSError:  # the thread ended
      continue
    out[int(task.name)] = (int(fields[11]) + int(fields[12])) / TICKS
  return out


def measure(a) -> dict:
  """One measurement, in this process: the stage `a.stage` of format
  `a.format`."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from droppos_jax.data import sources, streams, transforms  # pylint: disable=g-import-not-at-top
  if a.format == 'shards':
    files = tuple(sources.RecordFile(str(path), 0, a.shard_records)
                  for path in sorted(shards_dir(a).glob('*.tfrecord')))
    source = sources.Source(
        description='shards', size=len(files) * a.shard_records,
        num_classes=None, payload='record', note='', files=files)
  else:
    data = dict(source='tfds', name='bench_jpegs', split='train',
                data_dir=str(a.root / f'tfds_{a.format}'))
    if a.reads_in_flight:
      data['reads_in_flight'] = a.reads_in_flight
    source = sources.open_source(ml_collections.ConfigDict(data))
  rows = (0, a.batch)
  if a.stage == 'read':
    records = (streams._indexed_records if source.random_access  # pylint: disable=protected-access
               else streams._file_records)(source, 0, 0, a.batch, rows)  # pylint: disable=protected-access
    batches = iter(records.batch(a.batch).prefetch(2))
  else:
    batches = streams.train_stream(
        source, transforms.TrainAugment(
            device_resize_window=a.device_resize_window), image_size=224,
        global_batch_size=a.batch, seed=0)
  for _ in range(a.warmup):
    next(batches)
  storage_stats()
  threads = thread_cpu()
  count, cpu, start = 0, time.process_time(), time.perf_counter()
  while time.perf_counter() - start < a.seconds:
    next(batches)
    count += a.batch
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
  stats = storage_stats()
  busiest = max(t - threads.get(tid, 0.) for tid, t in thread_cpu().items())
  out = {'rate': count / seconds, 'cpu_us': cpu / count * 1e6,
         'busiest_thread_us': busiest / count * 1e6,
         'reads_in_flight': getattr(source, 'reads_in_flight', None),
         'peak_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  if stats:
    out.update(requests_per_record=stats[0] / count,
               kib_per_request=stats[1] / max(stats[0], 1) / 1024,
               most_in_flight=stats[2])
  return out


def child(a, fmt: str, stage: str, latency_ms: float, shim) -> dict:
  """measure() in a fresh process, the shim preloaded for a latency."""
  env = dict(os.environ)
  if latency_ms:
    env.update(LD_PRELOAD=str(shim), STORAGE_LATENCY_MS=str(latency_ms),
               STORAGE_LATENCY_PREFIX=str(a.root.resolve()))
    if fmt != 'array_record':  # TFRecord files: TensorFlow's GCS reads
      env['STORAGE_LATENCY_BLOCK_MB'] = str(GCS_BLOCK_MB)
  argv = [sys.executable, __file__, '--measure', '--format', fmt, '--stage',
          stage, '--dir', a.dir, '--num_files', str(a.num_files), '--batch',
          str(a.batch), '--seconds', str(a.seconds), '--warmup',
          str(a.warmup), '--device_resize_window', str(a.device_resize_window),
          '--shard_records', str(a.shard_records)]
  if a.reads_in_flight:
    argv += ['--reads_in_flight', str(a.reads_in_flight)]
  out = subprocess.run(argv, env=env, check=True, capture_output=True,
                       text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(a) -> None:
  folder = a.root / 'folder'
  if not folder.exists():
    print(f'Writing {a.num_files} JPEGs to {folder} ...')
    input_throughput.write_jpegs(folder, a.num_files)
  for fmt in FORMATS:
    if not (a.root / f'tfds_{fmt}' / 'bench_jpegs').exists():
      input_throughput.prepare_tfds(folder, a.root / f'tfds_{fmt}', fmt)
  if a.shard_records and not shards_dir(a).exists():
    print(f'Writing {SHARD_FILES} TFRecord files of {a.shard_records} random '
          f'records to {shards_dir(a)} ...')
    write_shards(shards_dir(a), a.shard_records)


def row(fmt: str, latency: float, read: dict, stream: dict | None,
        path: str = '') -> str:
  """A table row; `stream` None: the read stage only."""
  if not path and fmt == 'tfrecord':
    path = 'files interleaved'
  elif not path:
    path = f'{read["reads_in_flight"]} in flight'
  requests = ('| – | – | – ' if 'requests_per_record' not in read else
              f'| {read["most_in_flight"]} | {read["kib_per_request"]:,.0f} | '
              f'{read["requests_per_record"]:.2g} ')
  whole = ('| – | – |' if stream is None else
           f'| {stream["rate"]:,.0f} | {stream["cpu_us"] / 1e3:.2f} |')
  return (f'| {fmt} | {path} | {latency:g} | {read["rate"]:,.0f} '
          f'{requests}| {read["cpu_us"]:.0f} | '
          f'{read["busiest_thread_us"]:.0f} | {read["peak_mib"]:,.0f} '
          f'{whole}')


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--dir', default='/tmp/droppos_input_bench')
  p.add_argument('--num_files', type=int, default=2000)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--seconds', type=float, default=15.)
  p.add_argument('--warmup', type=int, default=5)
  p.add_argument('--latency_ms', default='0,30,120',
                 help='comma-separated latencies per storage request')
  p.add_argument('--formats', default=','.join(FORMATS),
                 help='comma-separated; empty: only the --shard_records rows')
  p.add_argument('--reads_in_flight', type=int, default=0,
                 help='data.reads_in_flight for ArrayRecord; 0: its default')
  p.add_argument('--device_resize_window', type=int, default=0,
                 help='the stream as with this config value (0: host resize)')
  p.add_argument('--shard_records', type=int, default=0,
                 help='also the TFRecord read stage on 16 files of this many '
                      'random ~110 KB records (ImageNet: about 1250); 0: not')
  p.add_argument('--measure', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--format', help=argparse.SUPPRESS)
  p.add_argument('--stage', help=argparse.SUPPRESS)
  a = p.parse_args()
  a.root = pathlib.Path(a.dir) / str(a.num_files)
  if a.measure:
    print(json.dumps(measure(a)), flush=True)
    # No teardown: destroying a tf.data iterator while one of its threads
    # waits for Python's lock in a generator can hang the measuring process.
    os._exit(0)
  prepare(a)
  shim = build_shim(a.root)
  latencies = [float(x) for x in a.latency_ms.split(',')]
  print(f'{a.num_files} JPEGs, local batch {a.batch}, {os.cpu_count()} '
        f'cores, device_resize_window={a.device_resize_window}, '
        f'{a.seconds:g} s after {a.warmup} warm-up batches, each '
        'measurement in its own process; latency per storage request as '
        'stated, unlimited bandwidth')
  print('| format | reads | latency ms | read stage records/s | requests in '
        'flight (most) | KiB per request | requests per record | read CPU '
        'µs/record | busiest thread µs/record | read peak memory MiB | whole '
        'stream images/s | stream CPU ms/image |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  for fmt in filter(None, a.formats.split(',')):
    for latency in latencies:
      read, stream = (child(a, fmt, stage, latency, shim)
                      for stage in ('read', 'stream'))
      print(row(fmt, latency, read, stream), flush=True)
  if a.shard_records:
    for latency in latencies:
      read = child(a, 'shards', 'read', latency, shim)
      print(row('tfrecord', latency, read, None,
                f'{SHARD_FILES} files of {a.shard_records:,} random records '
                '(~110 KB)'), flush=True)


if __name__ == '__main__':
  main()
