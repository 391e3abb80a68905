"""benchmarks/input_latency.py: its storage model (storage_latency.c) delays
each read of a file under the prefix by the latency it is given (or, in
block mode, each block fetched, as TensorFlow's GCS file system reads),
counts the requests, their bytes and the most in flight, and leaves other
files alone; the benchmark's quick command prints its rows."""
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks'
sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other so
import input_latency  # noqa: E402
from droppos_jax.data import sources  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which('cc') is None,
                                reason='needs a C compiler for the shim')

# Each of `threads` threads reads `reads` 100-byte pieces of the storage file
# (pread and read), then one piece of a file outside the prefix.
READER = r'''
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
import input_latency
storage, other, threads, reads = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:])

def work():
  fd = os.open(storage, os.O_RDONLY)
  for i in range(reads - 1):
    assert len(os.pread(fd, 100, 100 * i)) == 100
  assert len(os.read(fd, 100)) == 100
  os.close(fd)

input_latency.storage_stats()
start = time.perf_counter()
pool = [threading.Thread(target=work) for _ in range(threads)]
[t.start() for t in pool]
[t.join() for t in pool]
elapsed = time.perf_counter() - start
stats = input_latency.storage_stats()
with open(other, 'rb') as f:
  f.read(100)
print(json.dumps({'elapsed': elapsed, 'stats': stats,
                  'other': input_latency.storage_stats()}))
'''


def test_the_shim_delays_each_storage_request_by_the_latency(tmp_path):
  shim = input_latency.build_shim(tmp_path)
  (tmp_path / 'storage').mkdir()
  storage, other = tmp_path / 'storage' / 'shard', tmp_path / 'other'
  storage.write_bytes(bytes(100_000))
  other.write_bytes(bytes(1000))
  threads, reads, latency_ms = 4, 5, 40
  env = dict(LD_PRELOAD=str(shim), STORAGE_LATENCY_MS=str(latency_ms),
             STORAGE_LATENCY_PREFIX=str((tmp_path / 'storage').resolve()))
  out = subprocess.run(
      [sys.executable, '-c', READER, str(BENCHMARKS), str(storage),
       str(other), str(threads), str(reads)],
      env=env, capture_output=True, text=True, timeout=60, check=True)
  result = json.loads(out.stdout)
  requests, nbytes, most = result['stats']
  assert requests == threads * reads and nbytes == 100 * threads * reads
  assert 1 <= most <= threads
  # Each thread's reads follow one another, and at most `most` overlap.
  assert result['elapsed'] >= reads * latency_ms / 1e3
  assert result['elapsed'] >= requests * latency_ms / 1e3 / most
  assert result['other'][:2] == [0, 0]


# One thread reads the storage file from offset 0 in 4 KiB preads, then
# one read larger than a block, then 4 KiB at offset 0 again.
BLOCK_READER = r'''
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import input_latency
storage, size = sys.argv[2], int(sys.argv[3])
fd = os.open(storage, os.O_RDONLY)
out = []
for reads in ([(4096, o) for o in range(0, size, 4096)],
              [(size, 0)], [(4096, 0)]):
  input_latency.storage_stats()
  start = time.perf_counter()
  for n, offset in reads:
    assert len(os.pread(fd, n, offset)) == min(n, size - offset)
  out.append([time.perf_counter() - start, input_latency.storage_stats()])
print(json.dumps(out))
'''


def test_block_reads_make_a_request_per_block_as_tensorflows_gcs_reader(
    tmp_path):
  shim = input_latency.build_shim(tmp_path)
  (tmp_path / 'storage').mkdir()
  storage = tmp_path / 'storage' / 'shard'
  block, blocks, latency_ms = 1 << 18, 4, 40
  size = block * blocks - 1000  # the last block is short
  storage.write_bytes(bytes(size))
  env = dict(LD_PRELOAD=str(shim), STORAGE_LATENCY_MS=str(latency_ms),
             STORAGE_LATENCY_PREFIX=str((tmp_path / 'storage').resolve()),
             STORAGE_LATENCY_BLOCK_MB=str(block / (1 << 20)))
  out = subprocess.run(
      [sys.executable, '-c', BLOCK_READER, str(BENCHMARKS), str(storage),
       str(size)], env=env, capture_output=True, text=True, timeout=60,
      check=True)
  sequential, larger, again = json.loads(out.stdout)
  # 64 small reads per block: one request per block, of the block's bytes
  # (the file's end clips the last one).
  assert sequential[1] == [blocks, size, 1]
  assert sequential[0] >= blocks * latency_ms / 1e3
  assert larger[1] == [1, size, 1]  # a read larger than a block: its own
  # Offset 0 again lies before the last fetched block: a new block.
  assert again[1] == [1, block, 1] and again[0] >= latency_ms / 1e3


def test_without_the_shim_there_are_no_stats():
  assert input_latency.storage_stats() is None


@pytest.mark.slow
def test_quick_command_prints_a_row_per_format(tmp_path):
  out = subprocess.run(
      [sys.executable, str(BENCHMARKS / 'input_latency.py'), '--dir',
       str(tmp_path), '--num_files', '64', '--batch', '8', '--seconds', '0.3',
       '--warmup', '1', '--latency_ms', '20', '--shard_records', '8'],
      capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [line.split(' | ') for line in out.stdout.splitlines()
          if line.startswith(('| array_record', '| tfrecord'))]
  assert [r[:3] for r in rows] == [
      ['| array_record', f'{sources.READS_IN_FLIGHT} in flight', '20'],
      ['| tfrecord', 'files interleaved', '20'],
      ['| tfrecord', '16 files of 8 random records (~110 KB)', '20']]
  for r in rows:  # records/s, the most requests in flight: measured
    assert float(r[3].replace(',', '')) > 0 and int(r[4]) >= 1
  # The shards' records are 90-130 KB: each request carries some.
  shard_kib = float(rows[2][5].replace(',', ''))
  assert 90e3 / 1024 <= shard_kib
  assert [c.strip(' |') for c in rows[2][10:]] == ['–', '–']  # no stream
