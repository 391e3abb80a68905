"""Orbax checkpoints of the sharded train state plus a JSON side-car (step,
data position, seed, sigma, model identity).

Orbax writes each save to a temporary directory and renames it only once
complete, so an interrupted save is never listed as a step; leftovers are
removed at start-up (`cleanup_tmp_directories`). Readers take only steps
that carry Orbax's commit marker (`complete_steps`) and fall back past
unreadable ones with a warning (`newest_readable`). Before Orbax reads a
step, its files are checked against its manifest (`check_step_files`), so a
missing or cut-short file is named instead of read, and a read that fails
anyway lets Orbax's other reads finish (`_settle_abandoned_reads`) instead
of printing a traceback for each of them.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any, Callable, Optional, Sequence, TypeVar

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src import asyncio_utils
from orbax.checkpoint._src.serialization import tensorstore_utils
import tensorstore as ts

from droppos_jax.errors import UserError
from droppos_jax.formatting import one_line

T = TypeVar('T')
# How long a failed read or write waits for Orbax's other reads and writes.
SETTLE_SECONDS = 60


def _run_and_settle(coro):
  """Orbax's run_sync loop (orbax 0.12.8 `_run_sync_via_new_loop`), except
  that when `coro` fails, the tasks it leaves behind (the other arrays'
  reads or writes, gathered without return_exceptions) finish before the
  loop closes. Orbax closes it at once: each task then prints a traceback
  when collected, and each TensorStore read that completes later prints
  'Event loop is closed' (hundreds per damaged checkpoint or full disk)."""
  loop = asyncio.new_event_loop()
  try:
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(coro)
  except Exception:
    _settle(loop)
    raise
  finally:
    asyncio.set_event_loop(None)
    loop.close()


def _settle(loop: asyncio.AbstractEventLoop) -> None:
  with contextlib.suppress(RuntimeError):  # all_tasks racing another thread
    pending = asyncio.all_tasks(loop)
    if not pending:
      return
    _, late = loop.run_until_complete(asyncio.wait(pending,
                                                   timeout=SETTLE_SECONDS))
    for task in late:  # e.g. a barrier that will not come: give up on it
      task.cancel()
    if late:
      loop.run_until_complete(asyncio.wait(late, timeout=5))
    for task in pending:  # retrieved, so not reported as never retrieved
      if task.done() and not task.cancelled():
        task.exception()


if not hasattr(asyncio_utils, '_run_sync_via_new_loop'):
  raise ImportError('orbax-checkpoint changed run_sync: update '
                    'droppos_jax.checkpoint._run_and_settle (written for 0.12.8).')
asyncio_utils._run_sync_via_new_loop = _run_and_settle  # pylint: disable=protected-access


def absolute(path: str | epath.Path) -> epath.Path:
  """Orbax needs absolute paths: local ones are made absolute, gs:// kept."""
  path = epath.Path(path)
  return path if '://' in str(path) else path.absolute()


class Checkpoints:
  """Orbax CheckpointManager of a run: async saves, keep the last
  `max_to_keep`, restore onto any mesh (pass an abstract state whose leaves
  carry the target shardings).

  When to save is Orbax's own policy: every `save_every` steps, at
  `last_step`, and at JAX's preemption sync point (a notice that reached any
  host makes every host save the same step).
  """

  def __init__(self, directory: str | epath.Path, *, max_to_keep: int,
               save_every: int, last_step: int, async_save: bool = True):
    policies = ocp.checkpoint_managers
    self.directory = absolute(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(save_every),
                policies.SpecificStepsPolicy((last_step,)),
                policies.PreemptionCheckpointingPolicy()])))

  def all_steps(self) -> list[int]:
    """Complete steps (with the commit marker), oldest first: Orbax lists
    any numbered folder on a local disk, a half-written one included."""
    return sorted(set(self._manager.all_steps()) &
                  set(complete_steps(self.directory)))

  def reached_preemption(self, step: int) -> bool:
    """True on every host at the same step once any host got a notice."""
    return self._manager.reached_preemption(step)

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                       force=True)

  def restore_meta(self, step: int) -> dict[str, Any]:
    return self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `step` into the shapes/shardings of `abstract_state`."""
    step_dir = self.directory / str(step)
    with naming_damage(step_dir, check_step_files(step_dir)):
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          meta=ocp.args.JsonRestore()))
    return out['state'], out['meta']

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    # The start-up removal of half-written saves runs in a thread that only
    # a save awaits; a run that stops before saving must await it too, or it
    # fails at interpreter exit (orbax 0.12.8 has no public call for this).
    self._manager._maybe_await_cleanup_tmp_directory()  # pylint: disable=protected-access
    self._manager.wait_until_finished()
    self._manager.close()


# Orbax writes this file last into a step folder; without it the save never
# finished (killed mid-write, or a copy cut short). Orbax's own step listing
# trusts any numbered folder on a local disk, so the readers check for it.
COMMIT_MARKER = 'commit_success.txt'


def complete_steps(directory: str | epath.Path) -> list[int]:
  """Steps of an Orbax checkpoint folder whose save finished, newest first."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  return sorted((int(p.name) for p in directory.iterdir()
                 if p.name.isdigit() and (p / COMMIT_MARKER).exists()),
                reverse=True)


def unfinished_steps(directory: str | epath.Path) -> list[int]:
  """Numbered step folders without the commit marker, newest first."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  return sorted((int(p.name) for p in directory.iterdir()
                 if p.name.isdigit() and p.is_dir()
                 and not (p / COMMIT_MARKER).exists()), reverse=True)


class DamagedCheckpoint(Exception):
  """A step folder lacks a file its manifest names, or holds it cut short."""


# An OCDBT location: kind:base/:relative path:offset:length, e.g.
# 'value:ocdbt.process_0/:d/f4708f62...:11504:3856'.
_LOCATION = re.compile(r'^(btreenode|value|versionnode):([^:]*):([^:]+):'
                       r'(\d+):(\d+)$')


def check_step_files(step_dir: str | epath.Path) -> dict[str, str]:
  """Raises DamagedCheckpoint naming the first file of `step_dir/state` that
  is missing, shorter than its OCDBT manifest says or unparsable (deleted,
  truncated, half-copied data files, a missing manifest or _METADATA).
  Reads the manifest and B-tree nodes only, not the arrays: a zeroed data
  file of the right size fails in Orbax's read (`naming_damage` names it).
  Returns {array chunk key: its data file}."""
  state = epath.Path(step_dir) / 'state'
  name = lambda rel: f'{epath.Path(step_dir).name}/state/{rel}'
  if not (state / '_METADATA').exists():
    raise DamagedCheckpoint(f'missing file {name("_METADATA")}')
  if not (state / 'manifest.ocdbt').exists():
    if (state / 'd').exists() or list(state.glob('ocdbt.process_*')):
      raise DamagedCheckpoint(f'missing file {name("manifest.ocdbt")}')
    return {}  # not an OCDBT checkpoint: Orbax reads it its own way
  spec = tensorstore_utils.build_kvstore_tspec(state.as_posix(),
                                               use_ocdbt=False)
  kvstore = ts.KvStore.open(spec).result()
  sizes, files = {}, {}

  def dump(location: Optional[str], path: str) -> Any:
    try:
      return ts.ocdbt.dump(kvstore, location).result()
    except ValueError as e:
      raise DamagedCheckpoint(f'file {name(path)} is unreadable '
                              f'({one_line(e)})') from None

  def check(location: str) -> str:
    kind, base, rel, offset, length = _LOCATION.match(location).groups()
    path = base + rel
    if path not in sizes:
      try:
        sizes[path] = (state / path).stat().length
      except FileNotFoundError:
        raise DamagedCheckpoint(f'missing file {name(path)}') from None
    end = int(offset) + int(length)
    if sizes[path] < end:
      raise DamagedCheckpoint(f'file {name(path)} is cut short ({sizes[path]} '
                              f'bytes; its manifest reads up to byte {end})')
    if kind == 'btreenode':
      walk(dump(location, path))
    return path

  def walk(tree: Any) -> None:
    if isinstance(tree, list):
      for item in tree:
        walk(item)
    elif isinstance(tree, dict):
      if isinstance(tree.get('indirect_value'), str):
        files[_key(tree.get('key'))] = check(tree['indirect_value'])
      else:
        walk(list(tree.values()))
    elif isinstance(tree, str) and _LOCATION.match(tree):
      check(tree)

  walk(dump(None, 'manifest.ocdbt'))
  return files


def _key(dumped: Any) -> str:
  """A key as ocdbt.dump writes it ("b'params.w/0'") -> params.w/0."""
  text = str(dumped)
  return text[2:-1] if text[:2] in ("b'", 'b"') else text


# TensorStore's message for a chunk that failed to read or decode.
_READ_ERROR = re.compile(r'Error reading "([^"]+)" in OCDBT database at '
                         r'[^"]*"[^"]*": ([^;]*)')


@contextlib.contextmanager
def naming_damage(step_dir: str | epath.Path, files: dict[str, str]):
  """Turns TensorStore's failure to read an array chunk into a
  DamagedCheckpoint naming its data file (`files`: check_step_files)."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    for error in _chain(e):
      match = _READ_ERROR.search(str(error))
      if match and match.group(1) in files:
        raise DamagedCheckpoint(
            f'file {epath.Path(step_dir).name}/state/{files[match.group(1)]} '
            f'is unreadable ({match.group(2)}, in {match.group(1)})') from e
    raise


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and the exceptions it was raised from, outermost first."""
  chain = [error]
  while error.__cause__ is not None or (
      error.__context__ is not None and not error.__suppress_context__):
    error = error.__cause__ or error.__context__
    chain.append(error)
  return chain


def unreadable_reason(error: BaseException) -> str:
  """One short line saying why reading failed: the damage found, else the
  innermost cause (Orbax wraps TensorStore's message in a bare Exception)."""
  chain = _chain(error)
  damage = [e for e in chain if isinstance(e, DamagedCheckpoint)]
  return str(damage[0]) if damage else one_line(chain[-1])


# TensorStore reports storage failures as ValueErrors led by these statuses.
STORAGE_STATUSES = ('RESOURCE_EXHAUSTED', 'PERMISSION_DENIED', 'UNAVAILABLE',
                    'UNAUTHENTICATED', 'DEADLINE_EXCEEDED', 'DATA_LOSS')


def write_failure(error: BaseException) -> Optional[str]:
  """One line saying why a checkpoint write failed when the storage refused
  it (an OSError such as a full disk, or TensorStore's status for one), else
  None: any other error is a bug and keeps its traceback."""
  for e in _chain(error):
    if isinstance(e, OSError) or (isinstance(e, ValueError) and str(e).startswith(
        tuple(f'{status}: ' for status in STORAGE_STATUSES))):
      return one_line(e)
  return None


def newest_readable(steps: Sequence[int], restore: Callable[[int], T], *,
                    where: str) -> tuple[int, T]:
  """(step, restore(step)) for the first of `steps` (newest first) that reads.

  `restore` raises a UserError for a final verdict (e.g. a checkpoint of
  another model), which ends the search; any other exception means the step
  is unreadable (truncated, zeroed or deleted data files, damaged metadata,
  missing meta/ or keys): a warning names the step and why, and the next
  one is tried. None readable: a UserError naming `where` and each reason.
  """
  steps = list(steps)
  if not steps:
    raise UserError(f'No complete checkpoint in {where}.')
  reasons = []
  for i, step in enumerate(steps):
    try:
      return step, restore(step)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # Broad on purpose: Orbax reports damaged files as bare Exceptions,
      # damaged metadata as JSON, Key or Attribute errors.
      reason = unreadable_reason(e)
      reasons.append(f'step {step}: {reason}')
      then = (f'trying step {steps[i + 1]}' if i + 1 < len(steps)
              else 'no older step to try')
      logging.warning('checkpoint step %d in %s is unreadable (%s); %s.',
                      step, where, reason, then)
  raise UserError(f'No readable checkpoint in {where}: {"; ".join(reasons)}.')


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state, shardings)


def read_step(step_dir: str | epath.Path) -> tuple[dict[str, Any], dict[str, Any]]:
  """({'params'[, 'batch_stats']}, meta) of one step folder as host arrays.

  Reads only what evaluation and export need (no optimizer state), whatever
  mesh the run used. Damaged files raise DamagedCheckpoint naming the file
  (or what Orbax/TensorStore raise); see `newest_readable`.
  """
  step_dir = absolute(step_dir)
  meta = json.loads((step_dir / 'meta' / 'metadata').read_text())
  if not isinstance(meta, dict):
    raise ValueError(f'meta/metadata holds a {type(meta).__name__}, not a dict')
  files = check_step_files(step_dir)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    with naming_damage(step_dir, files):
      tree = _read_params(handler, step_dir)
  finally:
    handler.close()
  return jax.device_get(tree), meta


def _read_params(handler, step_dir: epath.Path) -> dict[str, Any]:
  saved = handler.metadata(step_dir / 'state').tree
  if 'params' not in saved:
    raise ValueError(f'state has no params (it holds {sorted(saved)})')
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {key: jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      saved[key]) for key in ('params', 'batch_stats') if key in saved}
  return handler.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
      item=target, partial_restore=True,
      restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
