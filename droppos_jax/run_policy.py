"""The life of a training run in its workdir, one policy for both trainers.

  run = run_policy.Run(workdir, config, model_id=..., total_steps=...)
  with run:                       # checks, lock, config.json, checkpoints
    state, start = run.restore_or_init(init_fn, abstract_state)
    for step in range(start + 1, total_steps + 1):
      state, metrics = train_step(state, batch)
      if run.should_save(step):   # cadence, last step, preemption
        run.save(step, state, meta)
      if run.stopped:
        break

- Nothing is written before the checks pass: the workdir must not be a file
  or under one, and a workdir that already holds a run must hold this run:
  a config that differs in a field that changes the run (model, data, init,
  schedule lengths, ...) is refused naming each field and both values, unless
  `allow_config_change`. Only then are the lock and config.json written. A
  workdir without a complete checkpoint holds nothing to resume: a corrected
  config starts afresh there.
- One trainer per workdir: `lock.json` names its holder (host, pid) and is
  refreshed every minute; a second trainer is refused while it is fresh. A
  lock left by a killed run (same host and the pid is gone, or no refresh for
  LOCK_STALE_SECONDS) is taken over with a warning.
- Restore-or-init: the newest checkpoint that can be read; unreadable ones
  (corrupt, truncated, half-written) are skipped with a warning naming the
  step and why. Rerunning a complete run reports its final metrics.
- When to save is Orbax's policy (every `ckpt_every` steps, the last step,
  JAX's preemption sync point); a state with any non-finite leaf is never
  saved: the run stops naming the step and the last good checkpoint.
- Preemption: on several hosts, SIGTERM (or SIGINT) on any host reaches every
  host through JAX's preemption sync point, so all save the same step and
  stop with status 'preempted'. On one process SIGTERM stops as 'preempted'
  and Ctrl-C as 'interrupted', after saving (a notice during restore or
  compilation: after the first step). Before the run (start-up) and after
  it, SIGTERM exits 75 at once (exit_codes.exit_on_preemption_notice). A
  second Ctrl-C quits at once.
- The metric logs (*_metrics.jsonl) keep each step once after a resume (or
  a fresh start after a try that saved no checkpoint).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import signal
import socket
import threading
import time
from typing import Any, Callable, Optional

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from droppos_jax import checkpoint
from droppos_jax.errors import UserError
from droppos_jax.formatting import clock, one_line
from droppos_jax.output_path import check_output_path

# Fields that may change when a run is resumed: they change how it is run or
# watched, not what it computes (gradient accumulation is exact; a checkpoint
# restores onto any mesh; the accelerators resize the same crops as the host,
# to one grey level). Any other difference is refused.
OPERATIONAL_FIELDS = (
    'log_every', 'ckpt_every', 'keep_ckpts', 'eval', 'profile_steps',
    'num_devices', 'mesh', 'grad_accum_steps', 'model.remat',
    'eval_batch_size', 'eval_every_epochs', 'device_resize_window',
    'data.reads_in_flight', 'val_data.reads_in_flight')
# errno of writes refused by the storage, not by a mistake in the code.
FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
CHECKPOINTS = 'checkpoints'  # the workdir's Orbax folder
LOCK_NAME = 'lock.json'
LOCK_REFRESH_SECONDS = 60
LOCK_STALE_SECONDS = 600


# ----------------------------------------------------------------- config ---

def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: tree}


def config_changes(saved: dict, new: dict) -> list[tuple[str, Any, Any]]:
  """(field, saved value, new value) for every run-changing difference."""
  a, b = _flatten(saved), _flatten(new)
  operational = lambda key: any(key == f or key.startswith(f + '.')
                                for f in OPERATIONAL_FIELDS)
  return [(k, a.get(k, '<absent>'), b.get(k, '<absent>'))
          for k in sorted(set(a) | set(b))
          if not operational(k) and a.get(k, '<absent>') != b.get(k, '<absent>')]


def check_operational_fields(config) -> None:
  """The run's cadences, checked before anything is written."""
  for name in ('log_every', 'ckpt_every', 'keep_ckpts'):
    if not config[name] >= 1:
      raise UserError(f'{name}={config[name]} must be >= 1.')
  profile = config.get('profile_steps', (0, 0))
  if not (isinstance(profile, (tuple, list)) and len(profile) == 2 and (
      profile[1] == 0 or 0 <= profile[0] < profile[1])):
    raise UserError(f'profile_steps={profile!r} must be (first, stop) with '
                    '0 <= first < stop, or (0, 0) for no profile.')


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


# ------------------------------------------------------------------- lock ---

def _holder() -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'processes': jax.process_count(), 'started': time.time(),
          'heartbeat': time.time()}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _stale_reason(lock: dict) -> Optional[str]:
  """Why an existing lock may be taken over, or None if it is held."""
  if lock.get('host') == socket.gethostname() and not _pid_alive(lock['pid']):
    return f'its process {lock["pid"]} on this host is gone'
  age = time.time() - float(lock.get('heartbeat', 0))
  if age > LOCK_STALE_SECONDS:
    return f'it was last refreshed {age / 60:.0f} min ago'
  return None


class _WorkdirLock:
  """lock.json naming this trainer, refreshed by a thread while it runs."""

  def __init__(self, path: epath.Path):
    self.path = path
    self._holder = _holder()
    self._done = threading.Event()
    self._thread = None

  def acquire(self) -> None:
    if self.path.exists():
      try:
        lock = json.loads(self.path.read_text())
      except (ValueError, OSError):
        lock = {'host': '?', 'pid': -1, 'heartbeat': 0}
      reason = _stale_reason(lock)
      if reason is None:
        raise UserError(
            f'{self.path.parent} is in use by another trainer (host '
            f'{lock.get("host")}, pid {lock.get("pid")}, refreshed '
            f'{time.time() - float(lock.get("heartbeat", 0)):.0f} s ago); wait '
            f'for it to finish, or delete {self.path} if it is dead.')
      logging.warning('Taking over the lock of a dead trainer (host %s, pid %s): '
                      '%s.', lock.get('host'), lock.get('pid'), reason)
    self._write()
    # Two trainers that start together both write; the last one wins, and
    # the other sees a foreign holder when it reads back.
    time.sleep(0.2)
    if json.loads(self.path.read_text()).get('started') != self._holder['started']:
      raise UserError(f'{self.path.parent} was just locked by another trainer '
                      'starting at the same time.')
    self._thread = threading.Thread(target=self._refresh, daemon=True)
    self._thread.start()

  def _write(self) -> None:
    self._holder['heartbeat'] = time.time()
    self.path.write_text(json.dumps(self._holder))

  def _refresh(self) -> None:
    while not self._done.wait(LOCK_REFRESH_SECONDS):
      with contextlib.suppress(OSError):
        self._write()

  def release(self) -> None:
    self._done.set()
    if self._thread is not None:
      self._thread.join()
      with contextlib.suppress(OSError):
        self.path.unlink()


# ---------------------------------------------------------------- signals ---

class _StopSignals:
  """SIGTERM / SIGINT while the run is on.

  One process: a flag the loop reads after each step (not an exit from
  restore or compilation: a process ended while tf.data's threads start
  can crash at exit). Several processes: JAX's preemption notifier owns
  SIGTERM (it reaches every host at the same step), and Ctrl-C is turned
  into a SIGTERM for it.
  """

  def __init__(self):
    self.received: Optional[str] = None
    self._multi_host = jax.process_count() > 1
    self._previous = {}
    wanted = [(signal.SIGINT, 'interrupted')]
    if not self._multi_host:
      wanted.append((signal.SIGTERM, 'preempted'))
    for sig, name in wanted:
      self._previous[sig] = signal.signal(sig, functools.partial(
          self._on_signal, name))

  def _on_signal(self, name, signum, frame):
    del frame
    if self.received == 'interrupted' and signum == signal.SIGINT:
      raise KeyboardInterrupt  # Second Ctrl-C: quit without waiting.
    self.received = self.received or name
    logging.warning('%s received: saving at the end of this step, then '
                    'stopping.', signal.Signals(signum).name)
    if self._multi_host:
      os.kill(os.getpid(), signal.SIGTERM)

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


# -------------------------------------------------------------------- run ---

@jax.jit
def _finite_leaves(tree):
  """[L] bool, one per floating leaf: all its values are finite."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype,
                                                               jnp.inexact)]
  return jnp.stack([jnp.isfinite(x).all() for x in leaves])


class Run:
  """One trainer's run in `workdir` (see the module docstring)."""

  def __init__(self, workdir: str, config, *, model_id: dict[str, Any],
               total_steps: int, allow_config_change: bool = False):
    self.workdir = checkpoint.absolute(workdir)
    self.config = config
    self.model_id = json.loads(json.dumps(model_id))
    self.total_steps = total_steps
    self.allow_config_change = allow_config_change
    self.is_main = jax.process_index() == 0
    self.stopped: Optional[str] = None
    self.last_saved: Optional[int] = None
    self.final_meta: Optional[dict] = None
    check_operational_fields(config)
    self._stack = contextlib.ExitStack()
    self._ckpts: Optional[checkpoint.Checkpoints] = None
    self._signals: Optional[_StopSignals] = None

  def has_checkpoint(self) -> bool:
    """Whether the workdir holds a complete checkpoint (reads a listing,
    writes nothing: callable before the workdir is claimed)."""
    return bool(checkpoint.complete_steps(self.workdir / CHECKPOINTS))

  # ---------------------------------------------------------- enter / exit
  def __enter__(self) -> 'Run':
    try:
      self._agree(self._claim_workdir if self.is_main else lambda: None)
      self._ckpts = self._stack.enter_context(contextlib.closing(
          checkpoint.Checkpoints(
              self.workdir / CHECKPOINTS, max_to_keep=self.config.keep_ckpts,
              save_every=self.config.ckpt_every, last_step=self.total_steps)))
    except BaseException:
      self._stack.close()
      raise
    self._signals = _StopSignals()
    self._stack.callback(self._signals.restore)
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      self._stack.close()
    except Exception as e:  # pylint: disable=broad-except
      # An async save that failed surfaces here (after the run's own error,
      # if any, which then goes on).
      reason = checkpoint.write_failure(e)
      if reason is None:
        raise
      if exc is None:
        raise UserError(self._write_failure(reason)) from None
    if isinstance(exc, OSError) and exc.errno in FULL_OR_READ_ONLY:
      # The disk filled (or turned read-only) while writing logs.
      raise UserError(self._write_failure(one_line(exc))) from None

  def enter_context(self, manager):
    """Closes `manager` (a logger...) when the run ends, errors included."""
    return self._stack.enter_context(manager)

  def _agree(self, check: Callable[[], None]) -> None:
    """Runs `check` (process 0) and makes every process fail with it."""
    error = None
    try:
      check()
    except UserError as e:
      error = e
    if jax.process_count() > 1:
      failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
      if failed and error is None:
        error = UserError(f'process 0 refused {self.workdir}; see its log.')
    if error is not None:
      raise error

  def _claim_workdir(self) -> None:
    """Checks, then the lock and config.json: nothing is written on failure."""
    wd = self.workdir
    check_output_path(wd, folder=True, flag='workdir')
    saved_file = wd / 'config.json'
    new = _config_json(self.config)
    if saved_file.exists():
      saved = json.loads(saved_file.read_text())
      changes = config_changes(saved, new)
      if changes and not self.has_checkpoint():
        # Nothing to resume (the last try failed before its first save):
        # the corrected config starts afresh.
        logging.warning('%s holds no checkpoint: starting afresh with this '
                        'config (it changes %s).', wd,
                        ', '.join(k for k, _, _ in changes))
      elif changes and not self.allow_config_change:
        listed = '; '.join(f'{k}: {a!r} -> {b!r}' for k, a, b in changes[:8])
        more = f' (and {len(changes) - 8} more)' if len(changes) > 8 else ''
        raise UserError(
            f'{wd} holds a run with another config ({listed}{more}); use a new '
            '--workdir, or --allow_config_change to continue this run with the '
            'new values.')
    try:
      wd.mkdir(parents=True, exist_ok=True)
      self._lock = _WorkdirLock(wd / LOCK_NAME)
      self._lock.acquire()
      self._stack.callback(self._lock.release)
      saved_file.write_text(json.dumps(new, indent=2))
      self._set_aside_unfinished()
    except OSError as e:
      raise UserError(f'Cannot write to --workdir {wd}: {one_line(e)}') from None
    logging.info('Config:\n%s', self.config)

  def _set_aside_unfinished(self) -> None:
    """Renames step folders whose save never finished (no commit marker: a
    copy cut short, a save killed on a bucket) to <step>.unfinished, with a
    warning: never read, and this run saves that step again."""
    folder = self.workdir / CHECKPOINTS
    unfinished = checkpoint.unfinished_steps(folder)
    if not unfinished:
      return
    for step in unfinished:
      target = folder / f'{step}.unfinished'
      if target.exists():
        target = folder / f'{step}.unfinished.{int(time.time())}'
      (folder / str(step)).rename(target)
    logging.warning('Ignoring step folder(s) %s in %s: their save never '
                    'finished (renamed to <step>.unfinished).',
                    ', '.join(map(str, unfinished)), folder)

  # ---------------------------------------------------------------- restore
  def restore_or_init(self, init_fn: Callable[[], Any], abstract_state: Any
                      ) -> tuple[Any, int]:
    """(state, step): the newest readable checkpoint, else `init_fn()`.

    `abstract_state` carries the target shardings (restore onto any mesh).
    """
    steps = self._ckpts.all_steps()
    if not steps:
      if self.is_main:
        self._trim_logs(0)  # lines of a try that saved no checkpoint
      return init_fn(), 0
    step, (state, meta) = checkpoint.newest_readable(
        steps[::-1], functools.partial(self._restore, abstract_state),
        where=str(self._ckpts.directory))
    logging.info('Resumed from step %d of %d.', step, self.total_steps)
    self.last_saved = step
    self.final_meta = meta
    if self.is_main:
      self._trim_logs(step)
    return state, step

  def _restore(self, abstract_state, step: int):
    meta = self._ckpts.restore_meta(step)
    saved = {key: meta.get(key) for key in self.model_id}
    if saved != self.model_id:
      raise UserError(
          f'{self._ckpts.directory} step {step} holds another model ({saved}) '
          f'than the config asks for ({self.model_id}); use a new --workdir.')
    return self._ckpts.restore(step, abstract_state)

  def _trim_logs(self, step: int) -> None:
    """Drops log lines of steps after `step` (logged, then lost to a kill)."""
    for log in self.workdir.glob('*_metrics.jsonl'):
      lines = log.read_text().splitlines(keepends=True)
      kept = [l for l in lines if json.loads(l).get('step', 0) <= step]
      if len(kept) < len(lines):
        log.write_text(''.join(kept))

  # ------------------------------------------------------------------- save
  def should_save(self, step: int) -> bool:
    """Whether to save after `step` (every host gets the same answer);
    sets `stopped` when a preemption notice or Ctrl-C asks to stop."""
    if self._ckpts.reached_preemption(step):
      self.stopped = 'preempted'
    elif self._signals.received and jax.process_count() == 1:
      self.stopped = self._signals.received
    return self.stopped is not None or self._ckpts.should_save(step)

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves `state` after checking every leaf is finite."""
    finite = np.asarray(_finite_leaves(state))
    if not finite.all():
      raise UserError(
          f'Non-finite values in {int((~finite).sum())} of {finite.size} '
          f'parameter/optimizer tensors after step {step}: not saved. '
          f'{self.last_good()} Lower the learning rate (optim.blr) or check the '
          'data.')
    meta = {'step': step, 'data_step': step, 'total_steps': self.total_steps,
            **self.model_id, **meta}
    try:
      self._ckpts.save(step, state, meta)
      if self.stopped or step == self.total_steps:
        self._ckpts.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      # Saves are asynchronous: this may be an earlier step's write failing.
      reason = checkpoint.write_failure(e)
      if reason is None:
        raise
      raise UserError(self._write_failure(reason)) from None
    self.last_saved = step
    self.final_meta = meta
    if self.stopped:
      logging.warning('Stopped (%s): saved step %d in %s; rerun the same '
                      'command to resume.', self.stopped, step,
                      self._ckpts.directory)

  def last_good(self) -> str:
    if self.last_saved is None:
      return 'No checkpoint was saved yet.'
    return (f'The last good checkpoint is step {self.last_saved} in '
            f'{self._ckpts.directory}.')

  def _write_failure(self, reason: str) -> str:
    """The message for a failed write; the last good checkpoint is the
    newest complete one on disk (an asynchronous save may have failed)."""
    steps = checkpoint.complete_steps(self._ckpts.directory)
    good = (f'The last good checkpoint is step {steps[0]} in '
            f'{self._ckpts.directory}' if steps else 'No checkpoint was saved yet')
    return (f'Writing to {self.workdir} failed ({reason}). {good}; free space '
            '(or fix the permissions) and rerun the same command to resume.')

  # --------------------------------------------------------------- reports
  def report_complete(self, metrics_text: str) -> None:
    """A rerun of a finished run: says so, with its final metrics."""
    logging.info('The run in %s is complete (%d/%d steps): %s.', self.workdir,
                 self.total_steps, self.total_steps, metrics_text)
    print(f'Already complete: {self.workdir} ({self.total_steps}/'
          f'{self.total_steps} steps; {metrics_text}).')

  def report_end(self, step: int, seconds: float, metrics_text: str) -> None:
    """The one-line summary of a run that ended or stopped."""
    status = f'stopped ({self.stopped})' if self.stopped else 'done'
    where = (self._ckpts.directory / str(self.last_saved)
             if self.last_saved is not None else 'none')
    logging.info('Run %s: %d/%d steps in %s; %s; checkpoint %s.', status,
                 step, self.total_steps, clock(seconds),
                 metrics_text, where)
