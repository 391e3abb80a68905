"""Recovery without noise: a damaged newest checkpoint is skipped with one
warning naming the damage and no traceback (training's restore and every
reader of a workdir), a failed save is one line, and a preemption notice at
any moment of a command (start-up, restore, compilation) exits 75."""
import gc
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from droppos_jax import checkpoint, exit_codes
from droppos_jax.errors import UserError
from checkpoint_files import data_files
from test_run_policy import open_run, tiny_disk  # noqa: F401  (a fixture)

REPO = pathlib.Path(__file__).resolve().parents[1]

# Many arrays, as a real state has: Orbax reads them side by side, and a
# failed read used to abandon all the others (a traceback each).
# Random values: too large to be stored inline in OCDBT's B-tree.
_RNG = np.random.default_rng(0)
STATE = {part: {f'{part[0]}{i}': _RNG.normal(size=(64, 32)).astype(np.float32)
                for i in range(24)} for part in ('params', 'opt')}


def abstract_state():
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), STATE)


def start(run):
  return run.restore_or_init(lambda: jax.device_put(STATE), abstract_state())


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A toy run's workdir with steps 2 and 4 (step 2 holds STATE + 2)."""
  workdir = tmp_path_factory.mktemp('saved') / 'run'
  with open_run(workdir) as run:
    state, _ = start(run)
    for step in (2, 4):
      run.save(step, jax.tree.map(lambda x, s=step: x + s, state), {})
  return workdir


def _half_written(step):
  (step / checkpoint.COMMIT_MARKER).unlink()
  for path in data_files(step)[1:]:
    path.unlink()


DAMAGES = {  # name -> (damage to step 4, what the warning names)
    'deleted data file': (lambda s: data_files(s)[-1].unlink(),
                          'missing file 4/state/'),
    'truncated data file': (lambda s: data_files(s)[-1].write_bytes(
        data_files(s)[-1].read_bytes()[:100]), 'is cut short (100 bytes'),
    'zeroed data file': (lambda s: data_files(s)[-1].write_bytes(
        bytes(data_files(s)[-1].stat().st_size)), 'is unreadable ('),
    'deleted manifest': (lambda s: (s / 'state' / 'manifest.ocdbt').unlink(),
                         'missing file 4/state/manifest.ocdbt'),
    'deleted _METADATA': (lambda s: (s / 'state' / '_METADATA').unlink(),
                          'missing file 4/state/_METADATA'),
    'half-written step folder': (_half_written,
                                 'Ignoring step folder(s) 4 in '),
}


@pytest.fixture
def quiet(capfd, caplog, monkeypatch):
  """What a restore printed: (stdout + stderr, warnings, unraisable
  exceptions), after the abandoned reads, if any, had their chance."""
  unraisable = []
  monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)

  def collect():
    time.sleep(0.3)  # late TensorStore callbacks
    gc.collect()     # abandoned coroutines
    out, err = capfd.readouterr()
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING]
    return out + err, warnings, [repr(u.exc_value) for u in unraisable]

  caplog.set_level(logging.WARNING)
  return collect


def assert_one_warning(printed, warnings, unraisable, names):
  assert 'Traceback' not in printed and 'Event loop is closed' not in printed
  assert unraisable == []
  assert len(warnings) == 1, warnings
  assert names in warnings[0] and '4' in warnings[0]
  assert 'pytree structure' not in warnings[0]


@pytest.mark.parametrize('damage', DAMAGES)
def test_training_falls_back_past_damage_with_one_warning(saved, tmp_path,
                                                         damage, quiet):
  workdir = tmp_path / 'run'
  shutil.copytree(saved, workdir)
  hurt, names = DAMAGES[damage]
  hurt(workdir / 'checkpoints' / '4')
  with open_run(workdir) as run:
    state, step = start(run)
  assert step == 2
  np.testing.assert_array_equal(state['params']['p3'], STATE['params']['p3'] + 2)
  assert_one_warning(*quiet(), names)


@pytest.mark.parametrize('damage', DAMAGES)
def test_readers_fall_back_past_damage_with_one_warning(saved, tmp_path,
                                                       damage, quiet):
  """What fine-tuning, export and evaluation read (checkpoint.read_step)."""
  workdir = tmp_path / 'run'
  shutil.copytree(saved, workdir)
  hurt, names = DAMAGES[damage]
  hurt(workdir / 'checkpoints' / '4')
  folder = workdir / 'checkpoints'
  unfinished = checkpoint.unfinished_steps(folder)
  if unfinished:  # as weights.read does
    logging.warning('Ignoring step folder(s) %s in %s: their save never '
                    'finished.', ', '.join(map(str, unfinished)), folder)
  step, (params, _) = checkpoint.newest_readable(
      checkpoint.complete_steps(folder),
      lambda s: checkpoint.read_step(folder / str(s)), where=str(folder))
  assert step == 2
  np.testing.assert_array_equal(params['params']['p5'],
                                STATE['params']['p5'] + 2)
  assert_one_warning(*quiet(), names)


def test_a_run_saves_over_a_half_written_step_folder(saved, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(saved, workdir)
  _half_written(workdir / 'checkpoints' / '4')
  with open_run(workdir) as run:
    state, step = start(run)
    assert step == 2
    run.save(4, state, {})
    run._ckpts.wait_until_finished()
  assert checkpoint.complete_steps(workdir / 'checkpoints') == [4, 2]
  assert (workdir / 'checkpoints' / '4.unfinished').is_dir()  # kept aside
  params, _ = checkpoint.read_step(workdir / 'checkpoints' / '4')
  np.testing.assert_array_equal(params['params']['p1'], STATE['params']['p1'] + 2)


def test_a_failed_save_is_one_line_without_tracebacks(tiny_disk, quiet):  # noqa: F811
  workdir = tiny_disk / 'run'
  big = jax.tree.map(lambda x: np.tile(x, (8, 1)), STATE)  # > the disk
  with pytest.raises(UserError) as err:
    with open_run(workdir) as run:
      run.save(2, jax.device_put(big), {})  # fails as the run closes
  assert 'RESOURCE_EXHAUSTED' in str(err.value)
  printed, _, unraisable = quiet()
  assert 'Traceback' not in printed and unraisable == []


def test_abandoned_reads_are_settled_by_the_installed_loop():
  from orbax.checkpoint._src import asyncio_utils  # pylint: disable=g-import-not-at-top
  assert asyncio_utils._run_sync_via_new_loop is checkpoint._run_and_settle  # pylint: disable=protected-access
  assert ocp.__version__ == '0.12.8', 'check _run_and_settle against it'


# ------------------------------------------------------------ preemption ---

def _train(workdir, *overrides, config='configs/demo.py'):
  return subprocess.Popen(
      [sys.executable, 'train.py', '--config', config, '--workdir',
       str(workdir), '--config.num_train_steps=3',
       '--config.warmup_epochs=0', *overrides],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def _wait_for(predicate, proc, seconds=240):
  deadline = time.time() + seconds
  while not predicate():
    assert proc.poll() is None, proc.communicate()
    assert time.time() < deadline
    time.sleep(0.05)


def _stopped(proc):
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert 'Traceback' not in err, err[-3000:]
  assert proc.returncode == exit_codes.EXIT_PREEMPTED, err[-3000:]
  return err


STOPPED_LINE = ('stopped: preemption notice (SIGTERM) before the first step; '
                'nothing to save: rerun the same command.')


def _catches_sigterm(pid: int) -> bool:
  """Whether process `pid` has a SIGTERM handler (Linux: /proc's SigCgt)."""
  for line in pathlib.Path(f'/proc/{pid}/status').read_text().splitlines():
    if line.startswith('SigCgt:'):
      return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
  return False


def test_sigterm_during_the_imports_exits_75(tmp_path):
  """The entry point takes SIGTERM over before TensorFlow and JAX load (a
  few seconds): a notice then is a preemption too, not a kill. The signal
  goes as soon as the handler is in place (a fixed delay could land before
  the interpreter even starts on a loaded machine)."""
  proc = _train(tmp_path / 'run')
  _wait_for(lambda: _catches_sigterm(proc.pid), proc, seconds=60)
  err = _stopped(proc)
  assert err.count(STOPPED_LINE) == 1, err[-3000:]
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_sigterm_while_the_flags_are_read_exits_75(tmp_path):
  """Start-up before the run: a config that takes its time to load."""
  marker = tmp_path / 'loading'
  slow = tmp_path / 'slow_config.py'
  slow.write_text(
      'import pathlib, time, sys\n'
      f'sys.path.insert(0, {str(REPO / "configs")!r})\n'
      'import demo\n'
      'def get_config(arg=None):\n'
      f'  pathlib.Path({str(marker)!r}).touch()\n'
      '  time.sleep(0.5)\n'
      '  return demo.get_config(arg)\n')
  proc = _train(tmp_path / 'run', config=str(slow))
  _wait_for(marker.exists, proc)
  err = _stopped(proc)
  assert STOPPED_LINE in err
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_sigterm_before_the_first_step_exits_75_with_nothing_saved(tmp_path):
  """Once the workdir is claimed: restore, data, compilation (the run's
  handler saves after the first step: no exit while tf.data starts)."""
  workdir = tmp_path / 'run'
  proc = _train(workdir)
  _wait_for((workdir / 'config.json').exists, proc)
  err = _stopped(proc)
  # Before the run took SIGTERM over: nothing saved; after: the first step.
  steps = checkpoint.complete_steps(workdir / 'checkpoints')
  assert (steps == [] and 'stopped: preemption notice (SIGTERM) before the '
          'first step; nothing to save' in err) or (
              steps == [1] and 'Stopped (preempted): saved step 1' in err)
  assert not (workdir / 'lock.json').exists()
