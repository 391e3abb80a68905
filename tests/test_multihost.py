"""Multi-process runs through train.py and its documented multi-host flags:
2 processes x 4 CPU devices on 127.0.0.1 against 1 process x 8 devices.

Every process is a real `python train.py ...` with its own jax.distributed
client (gloo collectives over loopback), every wait is bounded, ports are
picked free.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from droppos_jax.models import weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300
# Parameters of the 2x4 run may differ from the 1x8 run by float rounding
# only: the same examples, masks and initial state, but the gradient
# all-reduce sums its 8 device contributions in another order (gloo across
# processes vs in-process). Adam divides each update by sqrt(v), so a
# relative gradient difference of ~1e-7 moves parameters by ~lr * 1e-7 per
# step; over a few steps that stays far below 1e-5.
PARAM_ATOL = 1e-5
FINGERPRINTED_TRAIN = os.path.join(REPO, 'tests', 'fingerprinted_train.py')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(workdir, *, processes, devices, steps=8, extra=(), env=None,
          log_prefix='p'):
  """Starts `processes` train.py processes with `devices` CPU devices each."""
  port = free_port()
  procs = []
  for i in range(processes):
    args = [sys.executable, FINGERPRINTED_TRAIN, '--config',
            'configs/pretrain.py:runlocal',
            f'--workdir={workdir}', f'--config.num_train_steps={steps}',
            '--config.ckpt_every=4', '--config.log_every=1',
            '--config.batch_size=16', *extra]
    if processes > 1 and env is None:
      args += [f'--coordinator_address=127.0.0.1:{port}',
               f'--num_processes={processes}', f'--process_id={i}']
    proc_env = dict(os.environ, XLA_FLAGS=(
        f'--xla_force_host_platform_device_count={devices}'),
                    DROPPOS_FINGERPRINTS=workdir + '.batches',
                    **(env(i, port) if env else {}))
    log = open(os.path.join(workdir + f'.{log_prefix}{i}.log'), 'w')
    procs.append((subprocess.Popen(args, cwd=REPO, env=proc_env, stdout=log,
                                   stderr=subprocess.STDOUT), log))
  return procs


def finish(procs, timeout=TIMEOUT):
  """Exit codes and logs; kills everything still running at the deadline."""
  deadline = time.time() + timeout
  codes = []
  for proc, log in procs:
    try:
      codes.append(proc.wait(max(1, deadline - time.time())))
    except subprocess.TimeoutExpired:
      for p, _ in procs:
        p.kill()
      raise
    log.close()
  return codes, [open(log.name).read() for _, log in procs]


def run(workdir, **kwargs):
  codes, logs = finish(start(str(workdir), **kwargs))
  assert codes == [0] * len(codes), logs[0][-3000:]
  return logs


def metrics(workdir):
  lines = (workdir / 'train_metrics.jsonl').read_text().splitlines()
  return {r['step']: r for r in map(json.loads, lines)}


def final_params(workdir):
  return weights.read(str(workdir)).params


def max_param_diff(a, b):
  import jax  # pylint: disable=g-import-not-at-top
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


def wait_for_step(workdir, step, timeout=TIMEOUT):
  deadline = time.time() + timeout
  while time.time() < deadline:
    path = workdir / 'train_metrics.jsonl'
    if path.exists() and any(json.loads(l)['step'] >= step
                             for l in path.read_text().splitlines()):
      return
    time.sleep(0.2)
  raise TimeoutError(f'step {step} never logged in {workdir}')


def batch_digests(workdir):
  """{step: [digest of each global row]} of a run started by `start`, from
  every process's records (tests/fingerprinted_train.py; the last record of
  a step wins after a resume)."""
  rows = {}
  for path in workdir.parent.glob(workdir.name + '.batches.*.jsonl'):
    for record in map(json.loads, path.read_text().splitlines()):
      rows.setdefault(record['step'], {}).update(record['rows'])
  return {step: [r[str(i)] for i in range(len(r))]
          for step, r in rows.items()}


def assert_same_run_as(workdir, one_by_eight):
  """Each step logged once, the exact digest of each global batch's rows
  (same examples, order, crops) and the final parameters of the 1x8 run."""
  one, this = metrics(one_by_eight), metrics(workdir)
  assert sorted(this) == sorted(one) == list(range(1, 9))
  batches = batch_digests(workdir)
  expected = batch_digests(one_by_eight)
  assert [batches[s] for s in sorted(this)] == [expected[s] for s in sorted(one)]
  assert all(len(expected[s]) == 16 for s in sorted(one))
  diff = max_param_diff(final_params(workdir), final_params(one_by_eight))
  assert diff < PARAM_ATOL, diff


@pytest.fixture(scope='module')
def one_by_eight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('one') / 'run'
  run(workdir, processes=1, devices=8)
  return workdir


@pytest.mark.slow
def test_two_hosts_feed_the_same_batches_as_one(one_by_eight, tmp_path):
  workdir = tmp_path / 'two'
  logs = run(workdir, processes=2, devices=4)
  assert 'Process 1/2, 4 local / 8 global devices' in logs[1]
  assert_same_run_as(workdir, one_by_eight)
  one, two = metrics(one_by_eight), metrics(workdir)
  np.testing.assert_allclose([two[s]['loss'] for s in sorted(two)],
                             [one[s]['loss'] for s in sorted(one)], rtol=1e-5)


def stop_one_host(workdir, procs, *, second_after=None, at_step=2):
  """SIGTERM to process 1 only (a single preempted host), optionally to
  process 0 `second_after` seconds later."""
  wait_for_step(workdir, at_step)
  procs[1][0].send_signal(signal.SIGTERM)
  if second_after is not None:
    time.sleep(second_after)
    if procs[0][0].poll() is None:
      procs[0][0].send_signal(signal.SIGTERM)


def cut_two_hosts(workdir, second_after=None):
  """A 2x4 run stopped by SIGTERM to one host: both must save the same step."""
  procs = start(str(workdir), processes=2, devices=4, steps=8)
  stop_one_host(workdir, procs, second_after=second_after)
  codes, logs = finish(procs)
  assert codes == [75, 75], [l[-2000:] for l in logs]
  saved = [int(l.split('saved step ')[1].split()[0]) for l in logs]
  assert saved[0] == saved[1] < 8
  steps = sorted(int(d.name) for d in (workdir / 'checkpoints').iterdir()
                 if d.name.isdigit())
  assert steps[-1] == saved[0]


@pytest.mark.slow
def test_sigterm_on_one_host_stops_all_at_the_same_step_and_resumes_on_one(
    one_by_eight, tmp_path):
  workdir = tmp_path / 'cut'
  cut_two_hosts(workdir)
  # Resume the 2-host run on 1 process x 8 devices: the same stream goes on.
  run(workdir, processes=1, devices=8)
  assert_same_run_as(workdir, one_by_eight)


@pytest.mark.slow
def test_sigterms_reaching_the_hosts_apart_save_the_same_step(tmp_path):
  cut_two_hosts(tmp_path / 'apart', second_after=1.5)


@pytest.mark.slow
def test_ctrl_c_saves_and_the_run_resumes_on_two_slurm_hosts(one_by_eight,
                                                             tmp_path):
  workdir = tmp_path / 'grow'
  procs = start(str(workdir), processes=1, devices=8, steps=8)
  wait_for_step(workdir, 2)
  procs[0][0].send_signal(signal.SIGINT)
  codes, logs = finish(procs)
  assert codes == [130], logs[0][-2000:]
  assert 'Traceback' not in logs[0]
  assert 'Stopped (interrupted): saved step' in logs[0]

  def slurm(i, port):  # what srun sets; the documented launch is bare
    return {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': '127.0.0.1',
            'SLURM_NTASKS': '2', 'SLURM_PROCID': str(i), 'SLURM_LOCALID': str(i),
            'JAX_COORDINATOR_PORT': str(port)}
  logs = run(workdir, processes=2, devices=4, env=slurm)
  assert 'jax.distributed.initialize() (SLURM)' in logs[0]
  assert 'Process 1/2' in logs[1]
  assert_same_run_as(workdir, one_by_eight)


@pytest.mark.parametrize('flags_,message', [
    (['--coordinator_address=localhost', '--num_processes=2', '--process_id=0'],
     "coordinator address 'localhost' must be host:port"),
    (['--coordinator_address=127.0.0.1:1234', '--num_processes=0',
      '--process_id=0'], 'num_processes=0 must be >= 1'),
    (['--coordinator_address=127.0.0.1:1234', '--num_processes=2',
      '--process_id=2'], 'process_id=2 must be in [0, 2)'),
    (['--coordinator_address=127.0.0.1:1234'],
     'Multi-host start-up needs --num_processes'),
])
@pytest.mark.slow
def test_bad_multihost_flags_get_one_line(tmp_path, flags_, message):
  out = subprocess.run(
      [sys.executable, 'train.py', '--config', 'configs/pretrain.py:runlocal',
       f'--workdir={tmp_path}', *flags_], cwd=REPO, capture_output=True,
      text=True, timeout=TIMEOUT)
  assert out.returncode == 1
  assert f'error: {message}' in out.stderr and 'Traceback' not in out.stderr
