"""Orbax checkpoints of the sharded train state plus a JSON side-car (step,
data position, seed, sigma, model identity).

Orbax writes each save to a temporary directory and renames it only once
complete, so an interrupted save is never listed as a step; leftovers are
removed at start-up (`cleanup_tmp_directories`). Readers take only steps
that carry Orbax's commit marker (`complete_steps`) and fall back past
unreadable ones with a warning (`newest_readable`).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Optional, Sequence, TypeVar

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from droppos_jax.errors import UserError

T = TypeVar('T')


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
    if max_to_keep < 1:
      raise UserError(f'keep_ckpts={max_to_keep} must be >= 1.')
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
    """Complete (finalized) steps, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

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


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and the exceptions it was raised from, outermost first."""
  chain = [error]
  while error.__cause__ is not None or (
      error.__context__ is not None and not error.__suppress_context__):
    error = error.__cause__ or error.__context__
    chain.append(error)
  return chain


def _one_line(error: BaseException) -> str:
  text = (str(error).strip().splitlines() or [''])[0]
  text = text.split(' [tensorstore_spec=')[0]
  if len(text) > 240:
    text = text[:240] + '...'
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def unreadable_reason(error: BaseException) -> str:
  """One short line saying why reading failed: the innermost cause (Orbax
  wraps TensorStore's message in a bare Exception), without its spec dump."""
  return _one_line(_chain(error)[-1])


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
      return _one_line(e)
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
  mesh the run used. Damaged files raise what Orbax/TensorStore raise; see
  `newest_readable`.
  """
  step_dir = absolute(step_dir)
  meta = json.loads((step_dir / 'meta' / 'metadata').read_text())
  if not isinstance(meta, dict):
    raise ValueError(f'meta/metadata holds a {type(meta).__name__}, not a dict')
  handler = ocp.PyTreeCheckpointHandler()
  try:
    saved = handler.metadata(step_dir / 'state').tree
    if 'params' not in saved:
      raise ValueError(f'state has no params (it holds {sorted(saved)})')
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {key: jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        saved[key]) for key in ('params', 'batch_stats') if key in saved}
    tree = handler.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
        item=target, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  finally:
    handler.close()
  return jax.device_get(tree), meta
