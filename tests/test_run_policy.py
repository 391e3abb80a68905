"""The life of a run in its workdir (run_policy.py): a workdir holds one run
and one trainer at a time, a rerun resumes or reports completion, and what
goes wrong (a changed config, a held lock, a non-finite state, a full disk,
a workdir that cannot be written) is one line naming the values involved."""
import errno
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from droppos_jax import checkpoint, finetune, run_policy, train
from droppos_jax.configs import finetune as finetune_config
from droppos_jax.configs import pretrain as pretrain_config
from droppos_jax.data import device
from droppos_jax.errors import UserError


def set_field(config, field, value):
  node, _, leaf = field.rpartition('.')
  (config[node] if node else config)[leaf] = value


def get_field(config, field):
  for part in field.split('.'):
    config = config[part]
  return config


def tiny_config(**fields):
  """configs/pretrain.py:runlocal with mu/8 at 32 px on 32 demo crops: 4
  steps of 16 (2 per epoch), checkpoints at steps 2 and 4; on one device,
  which compiles fastest (test_train.py runs the sharded paths)."""
  c = pretrain_config.get_config('runlocal')
  c.image_size = 32
  c.model.variant = 'mu/8'
  c.num_devices = 1
  c.data.num_images, c.data.crop_size = 32, 40
  c.num_train_steps, c.ckpt_every = 4, 2
  for field, value in fields.items():
    set_field(c, field, value)
  return c


def snapshot(root):
  """path -> (bytes, mtime) of every file and folder below `root`."""
  out = {}
  for folder, _, files in os.walk(root):
    out[folder] = (None, os.stat(folder).st_mtime_ns)
    for name in files:
      path = pathlib.Path(folder, name)
      out[str(path)] = (path.read_bytes(), path.stat().st_mtime_ns)
  return out


def logged(workdir, name='train'):
  return [json.loads(line) for line in
          (pathlib.Path(workdir) / f'{name}_metrics.jsonl').open()]


def step_folders(workdir):
  return sorted(p.name for p in (pathlib.Path(workdir) / 'checkpoints').iterdir())


def forbid_training(monkeypatch):
  """Compiling the step or reading a batch fails the test."""
  def fail(*args, **kwargs):
    raise AssertionError('a refused or complete run compiled or read data')
  monkeypatch.setattr(train.Setup, 'compile', fail)
  monkeypatch.setattr(device, 'train_batches', fail)


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A complete 4-step pre-training run (checkpoints 2 and 4)."""
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  train.train(tiny_config(), str(workdir))
  return workdir


@pytest.fixture
def copy_of(tmp_path):
  def copy(workdir):
    shutil.copytree(workdir, tmp_path / 'run')
    return tmp_path / 'run'
  return copy


# A toy state: the policy does not care what it saves.
STATE = {'w': np.arange(3, dtype=np.float32)}


def abstract_state():
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return {'w': jax.ShapeDtypeStruct((3,), jnp.float32, sharding=one)}


def open_run(workdir, config=None, **kwargs):
  return run_policy.Run(str(workdir), config or tiny_config(),
                        model_id={'model': 'toy'}, total_steps=4, **kwargs)


def start(run):
  state, step = run.restore_or_init(lambda: jax.device_put(STATE),
                                    abstract_state())
  return state, step


# ----------------------------------------------------------------- config ---

@pytest.mark.parametrize('kind, field, value', [
    ('pretrain', 'model.variant', 'nano/8'),
    ('pretrain', 'data.num_images', 64),
    ('pretrain', 'num_train_steps', 8),
    ('pretrain', 'epochs', 400),
    ('pretrain', 'warmup_epochs', 1),
    ('pretrain', 'masking.mask_ratio', 0.5),
    ('pretrain', 'optim.blr', 1e-3),
    ('finetune', 'init.path', '/runs/another_pretraining'),
])
def test_a_changed_run_field_is_refused_naming_both_values(tmp_path, kind,
                                                            field, value):
  make = (tiny_config if kind == 'pretrain'
          else lambda: finetune_config.get_config('runlocal'))
  with open_run(tmp_path, make()) as run:
    run.save(2, start(run)[0], {})
  before = snapshot(tmp_path)
  changed = make()
  old = get_field(changed, field)
  set_field(changed, field, value)
  with pytest.raises(UserError) as err:
    with open_run(tmp_path, changed):
      pass
  message = str(err.value)
  assert f'{field}: {old!r} -> {value!r}' in message
  assert message.startswith(f'{tmp_path} holds a run with another config (')
  assert '--allow_config_change' in message and '\n' not in message
  assert snapshot(tmp_path) == before


def test_many_changes_are_listed_up_to_eight_then_counted(tmp_path):
  with open_run(tmp_path) as run:
    run.save(2, start(run)[0], {})
  fields = {'seed': 1, 'image_size': 64, 'batch_size': 32, 'epochs': 5,
            'warmup_epochs': 1, 'model.projector': 'small',
            'objective.tau': 0.2, 'objective.sigma': 0.5, 'optim.b2': 0.9,
            'optim.clip_norm': 1.}
  with pytest.raises(UserError) as err:
    with open_run(tmp_path, tiny_config(**fields)):
      pass
  assert ("(batch_size: 16 -> 32; epochs: 800 -> 5; image_size: 32 -> 64; "
          "model.projector: 'tiny' -> 'small'; objective.sigma: 1.0 -> 0.5; "
          'objective.tau: 0.1 -> 0.2; optim.b2: 0.95 -> 0.9; optim.clip_norm: '
          '5.0 -> 1.0 (and 2 more)); use a new --workdir') in str(err.value)


@pytest.mark.slow  # the `finished` run
def test_the_trainer_leaves_a_refused_workdir_untouched(finished, copy_of,
                                                        monkeypatch):
  workdir = copy_of(finished)
  before = snapshot(workdir)
  forbid_training(monkeypatch)
  with pytest.raises(UserError) as err:
    train.train(tiny_config(**{'model.variant': 'nano/8', 'num_train_steps': 6,
                               'log_every': 2}), str(workdir))
  message = str(err.value)
  assert "model.variant: 'mu/8' -> 'nano/8'" in message
  assert 'num_train_steps: 4 -> 6' in message
  assert 'log_every' not in message           # operational: may change
  assert snapshot(workdir) == before


def test_a_bad_init_path_leaves_a_new_workdir_untouched(tmp_path):
  config = finetune_config.get_config('runlocal')
  config.init.path = str(tmp_path / 'no_such_run')
  workdir = tmp_path / 'ft'
  with pytest.raises(UserError, match='no_such_run'):
    finetune.train(config, str(workdir))
  assert not workdir.exists()


def test_a_workdir_without_a_checkpoint_takes_a_corrected_config(tmp_path,
                                                               caplog):
  # A try that failed before its first save (a bad init.path, a corrupt
  # image, a NaN at step 1) left config.json, lock-free, and logs.
  with open_run(tmp_path):
    pass
  (tmp_path / 'train_metrics.jsonl').write_text(
      ''.join(json.dumps({'step': s, 'loss': 1.}) + '\n' for s in (1, 2, 3)))
  with caplog.at_level(logging.WARNING):
    with open_run(tmp_path, tiny_config(**{'optim.blr': 1e-3})) as run:
      assert start(run)[1] == 0
  assert (f'{tmp_path} holds no checkpoint: starting afresh with this config '
          '(it changes optim.blr).') in caplog.text
  assert json.loads((tmp_path / 'config.json').read_text())['optim']['blr'] == 1e-3
  assert (tmp_path / 'train_metrics.jsonl').read_text() == ''  # no step twice


OPERATIONAL = {'log_every': 5, 'ckpt_every': 1, 'keep_ckpts': 1,
               'eval.every_steps': 10, 'profile_steps': (2, 3),
               'num_devices': 8, 'mesh.fsdp': 2, 'grad_accum_steps': 2,
               'model.remat': True, 'device_resize_window': 512,
               'data.reads_in_flight': 64}


def test_a_run_saved_before_an_operational_field_existed_resumes(tmp_path):
  with open_run(tmp_path):
    pass
  saved = json.loads((tmp_path / 'config.json').read_text())
  del saved['data']['reads_in_flight']    # as runs before that field wrote it
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  with open_run(tmp_path):
    pass


def test_operational_fields_may_change(tmp_path):
  with open_run(tmp_path):
    pass
  changed = tiny_config(**OPERATIONAL)
  with open_run(tmp_path, changed):
    pass
  saved = json.loads((tmp_path / 'config.json').read_text())
  for field, value in OPERATIONAL.items():
    assert get_field(saved, field) == (list(value) if isinstance(value, tuple)
                                       else value), field


def test_allow_config_change_continues_with_the_new_values(tmp_path):
  with open_run(tmp_path) as run:
    run.save(2, start(run)[0], {})
  changed = tiny_config(**{'optim.blr': 1e-3, 'num_train_steps': 8})
  with open_run(tmp_path, changed, allow_config_change=True) as run:
    state, step = start(run)
  assert step == 2
  np.testing.assert_array_equal(state['w'], STATE['w'])
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['optim']['blr'] == 1e-3 and saved['num_train_steps'] == 8


# ---------------------------------------------------------- rerun, resume ---

@pytest.mark.slow  # the `finished` run
def test_rerun_of_a_finished_run_reports_its_metrics_and_trains_nothing(
    finished, copy_of, monkeypatch, capsys):
  workdir = copy_of(finished)
  log = (workdir / 'train_metrics.jsonl').read_bytes()
  forbid_training(monkeypatch)
  out = train.train(tiny_config(log_every=2), str(workdir))
  assert out['complete'] and out['losses'] == {} and out['last_step'] == 4
  last = logged(workdir)[-1]
  assert last['step'] == 4
  printed = capsys.readouterr().out
  assert (f'Already complete: {workdir} (4/4 steps; loss {last["loss"]:.4f}, '
          f'pos acc {last["acc1"]:.1%}, ') in printed
  assert (workdir / 'train_metrics.jsonl').read_bytes() == log
  assert step_folders(workdir) == ['2', '4']


@pytest.mark.slow  # the `finished` run
def test_resume_after_a_kill_logs_each_step_once(finished, copy_of):
  workdir = copy_of(finished)
  # Killed after logging step 4, before its checkpoint was complete.
  shutil.rmtree(workdir / 'checkpoints' / '4')
  first = {r['step']: r['loss'] for r in logged(workdir)}
  assert sorted(first) == [1, 2, 3, 4]
  out = train.train(tiny_config(), str(workdir))
  assert sorted(out['losses']) == [3, 4]
  records = logged(workdir)
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  # Restored state and data position: steps 3 and 4 are computed again
  # exactly as the killed run computed them.
  assert [r['loss'] for r in records] == [first[s] for s in (1, 2, 3, 4)]


def test_resume_drops_every_log_line_past_the_restored_step(tmp_path):
  with open_run(tmp_path) as run:
    run.save(2, start(run)[0], {})
  for name, steps in (('train', [1, 2, 3, 4]), ('eval', [2, 4])):
    (tmp_path / f'{name}_metrics.jsonl').write_text(
        ''.join(json.dumps({'step': s, 'loss': s / 10}) + '\n' for s in steps))
  with open_run(tmp_path) as run:
    assert start(run)[1] == 2
  assert [r['step'] for r in logged(tmp_path)] == [1, 2]
  assert [r['step'] for r in logged(tmp_path, 'eval')] == [2]


# ------------------------------------------------------------------- lock ---

def test_a_second_trainer_is_refused_naming_the_holder(tmp_path):
  with open_run(tmp_path):
    lock = (tmp_path / 'lock.json').read_text()
    with pytest.raises(UserError, match=(
        rf'{tmp_path} is in use by another trainer \(host '
        rf'{socket.gethostname()}, pid {os.getpid()}, refreshed \d+ s ago\); '
        rf'wait for it to finish, or delete {tmp_path}/lock.json if it is '
        'dead.')):
      with open_run(tmp_path):
        pass
    assert (tmp_path / 'lock.json').read_text() == lock   # still the holder's
  assert not (tmp_path / 'lock.json').exists()            # released


def test_a_fresh_lock_of_another_host_is_refused(tmp_path):
  lock = {'host': 'node-7', 'pid': 4242, 'heartbeat': time.time()}
  (tmp_path / 'lock.json').write_text(json.dumps(lock))
  with pytest.raises(UserError, match=r'\(host node-7, pid 4242, refreshed'):
    with open_run(tmp_path):
      pass
  assert not (tmp_path / 'config.json').exists()


def _dead_pid():
  child = subprocess.Popen([sys.executable, '-c', ''])
  child.wait()
  return child.pid


@pytest.mark.parametrize('holder', ['dead process', 'old heartbeat'])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog, holder):
  if holder == 'dead process':
    lock = {'host': socket.gethostname(), 'pid': _dead_pid(),
            'heartbeat': time.time()}
    reason = f'its process {lock["pid"]} on this host is gone'
  else:
    lock = {'host': 'node-7', 'pid': 4242,
            'heartbeat': time.time() - 2 * run_policy.LOCK_STALE_SECONDS}
    reason = 'it was last refreshed 20 min ago'
  (tmp_path / 'lock.json').write_text(json.dumps(lock))
  with caplog.at_level(logging.WARNING):
    with open_run(tmp_path):
      held = json.loads((tmp_path / 'lock.json').read_text())
      assert (held['host'], held['pid']) == (socket.gethostname(), os.getpid())
  assert (f'Taking over the lock of a dead trainer (host {lock["host"]}, '
          f'pid {lock["pid"]}): {reason}.') in caplog.text
  assert not (tmp_path / 'lock.json').exists()


# ------------------------------------------------------------- non-finite ---

@pytest.mark.slow  # the `finished` run
@pytest.mark.filterwarnings('ignore:overflow encountered in cast')  # the lr
def test_an_overflowing_update_is_never_saved(finished, copy_of):
  """An lr beyond float32 (inf) makes step 3's update non-finite while its
  loss, computed before the update, is finite."""
  workdir = copy_of(finished)
  shutil.rmtree(workdir / 'checkpoints' / '4')
  config = tiny_config(**{'optim.blr': 1e40, 'ckpt_every': 1})
  with pytest.raises(UserError, match=(
      r'^Non-finite values in \d+ of \d+ parameter/optimizer tensors after '
      rf'step 3: not saved. The last good checkpoint is step 2 in '
      rf'{workdir}/checkpoints. Lower the learning rate')):
    train.train(config, str(workdir), allow_config_change=True)
  step3 = logged(workdir)[-1]
  assert step3['step'] == 3 and np.isfinite(step3['loss'])
  assert step3['lr'] == float('inf')
  assert step_folders(workdir) == ['2']
  params, _ = checkpoint.read_step(workdir / 'checkpoints' / '2')
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_a_non_finite_state_before_any_save_says_none_was_saved(tmp_path):
  with open_run(tmp_path) as run:
    start(run)
    with pytest.raises(UserError, match=(
        r'^Non-finite values in 1 of 1 parameter/optimizer tensors after '
        r'step 1: not saved. No checkpoint was saved yet. Lower')):
      run.save(1, {'w': jnp.array([1., np.inf, np.nan])}, {})
  assert step_folders(tmp_path) == []


# --------------------------------------------------------- failed writes ---

def _raise(error):
  def fail(*args, **kwargs):
    raise error
  return fail


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
# What TensorStore raises when the disk fills while it writes an array.
TENSORSTORE_FULL = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database: Failed to '
    "write 219 bytes to file 17: No space left on device [os_error_code='28']")


@pytest.mark.parametrize('where, error, last_good', [
    ('save', ENOSPC, 2), ('save', TENSORSTORE_FULL, 2),
    ('close', TENSORSTORE_FULL, 4)])   # closing awaits the async saves
def test_a_failed_checkpoint_write_is_one_line(tmp_path, monkeypatch, where,
                                               error, last_good):
  with pytest.raises(UserError) as err:
    with open_run(tmp_path) as run:
      state, _ = start(run)
      run.save(2, state, {})
      run._ckpts.wait_until_finished()
      monkeypatch.setattr(ocp.CheckpointManager, where, _raise(error))
      run.save(4, state, {})
  assert str(err.value) == (
      f'Writing to {tmp_path} failed ({type(error).__name__}: {error}). The '
      f'last good checkpoint is step {last_good} in {tmp_path}/checkpoints; '
      'free space (or fix the permissions) and rerun the same command to '
      'resume.')


def test_other_errors_of_a_save_keep_their_traceback(tmp_path, monkeypatch):
  with pytest.raises(TypeError, match='a bug'):
    with open_run(tmp_path) as run:
      monkeypatch.setattr(ocp.CheckpointManager, 'save',
                          _raise(TypeError('a bug')))
      run.save(2, start(run)[0], {})


def test_a_full_disk_while_logging_is_one_line(tmp_path):
  with pytest.raises(UserError, match=(
      rf'^Writing to {tmp_path} failed \(OSError: \[Errno 28\] No space left '
      r'on device\). No checkpoint was saved yet; free space')):
    with open_run(tmp_path) as run:
      start(run)
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def tiny_disk(tmp_path):
  """A 256 KiB tmpfs (needs mount rights: root, as on this machine)."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=256k', 'tmpfs',
                     str(disk)], capture_output=True).returncode:
    pytest.skip('mounting a tmpfs needs root; the monkeypatched cases cover '
                'the same paths')
  yield disk
  subprocess.run(['umount', '-l', str(disk)], check=True)


def test_a_real_full_disk_names_the_last_complete_step(tiny_disk):
  workdir = tiny_disk / 'run'
  with pytest.raises(UserError) as err:
    with open_run(workdir) as run:
      state, _ = start(run)
      run.save(2, state, {})
      run._ckpts.wait_until_finished()
      filler = (tiny_disk / 'filler').open('wb')
      with pytest.raises(OSError):
        while True:
          filler.write(bytes(4096))
          filler.flush()
      run.save(4, state, {})
  message = str(err.value)
  assert message.startswith(f'Writing to {workdir} failed (')
  assert 'No space left on device' in message and '\n' not in message
  assert message.endswith(f'The last good checkpoint is step 2 in {workdir}/'
                          'checkpoints; free space (or fix the permissions) '
                          'and rerun the same command to resume.')


# --------------------------------------------------------------- workdirs ---

def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / 'notes.txt'
  path.write_text('mine')
  with pytest.raises(UserError, match=rf'^--workdir {path} is a file; '
                     r'expected a folder \(new or existing\)\.$'):
    open_run(path).__enter__()
  assert path.read_text() == 'mine'


def test_a_workdir_under_a_file_is_refused(tmp_path):
  path = tmp_path / 'notes.txt'
  path.write_text('mine')
  with pytest.raises(UserError, match=rf'^--workdir {path}/run/a: {path} is '
                     r'a file, not a folder\.$'):
    open_run(path / 'run' / 'a').__enter__()
  assert path.read_text() == 'mine'


def test_a_workdir_that_cannot_be_created_is_refused():
  # /sys refuses new entries even to root: a read-only place on any Linux.
  path = pathlib.Path('/sys/droppos_jax_test_run')
  with pytest.raises(UserError, match=rf'^Cannot write to --workdir {path}: '
                     r'PermissionError: \[Errno 1\] Operation not permitted'):
    open_run(path).__enter__()


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into a folder '
                    'without write permission; /sys covers the refusal above')
def test_a_read_only_existing_workdir_is_refused(tmp_path):
  tmp_path.chmod(0o555)
  try:
    with pytest.raises(UserError, match=rf'^Cannot write to --workdir '
                       rf'{tmp_path}: PermissionError'):
      open_run(tmp_path).__enter__()
  finally:
    tmp_path.chmod(0o755)


@pytest.mark.parametrize('field, value, message', [
    ('keep_ckpts', 0, 'keep_ckpts=0 must be >= 1.'),
    ('ckpt_every', 0, 'ckpt_every=0 must be >= 1.'),
    ('profile_steps', (5, 2), r'profile_steps=\(5, 2\) must be \(first, stop\) '
     r'with 0 <= first < stop, or \(0, 0\) for no profile.'),
])
def test_bad_cadences_are_refused_before_anything_is_written(tmp_path, field,
                                                             value, message):
  with pytest.raises(UserError, match=f'^{message}$'):
    with open_run(tmp_path / 'run', tiny_config(**{field: value})):
      pass
  assert not (tmp_path / 'run').exists()
