"""Orbax checkpoints of the sharded train state plus a JSON side-car (step,
data position, seed, sigma, model identity).

Orbax writes each save to a temporary directory and renames it only once
complete, so an interrupted save is never listed as a step; leftovers are
removed at start-up (`cleanup_tmp_directories`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from droppos_jax.errors import UserError


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


def newest_readable(steps, restore, *, where: str):
  """(step, restore(step)) for the first of `steps` (newest first) that reads.

  An unreadable step (corrupt, truncated, missing files) is skipped with a
  warning naming it and why; a UserError (e.g. another model) is final.
  None readable: a UserError listing each step's reason.
  """
  reasons = []
  for step in steps:
    try:
      return step, restore(step)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      reason = f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:200]}'
      reasons.append(f'step {step}: {reason}')
      logging.warning('Checkpoint step %d in %s is unreadable (%s); trying an '
                      'older one.', step, where, reason)
  raise UserError(f'No readable checkpoint in {where} ({"; ".join(reasons)}).')


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state, shardings)


def resolve_step_dir(path: str) -> str:
  """A pre-training workdir, its checkpoints/ folder or one step folder ->
  the step folder to read (the latest complete one for folders)."""
  for candidate in (path, os.path.join(path, 'checkpoints')):
    if os.path.isdir(os.path.join(candidate, 'state')):
      return candidate
    if os.path.isdir(candidate):
      steps = [int(d) for d in os.listdir(candidate) if d.isdigit() and
               os.path.isdir(os.path.join(candidate, d, 'state'))]
      if steps:
        return os.path.join(candidate, str(max(steps)))
  raise ValueError(f'No DropPos checkpoint found at {path!r}: expected a '
                   'pre-training workdir, its checkpoints/ folder or a step '
                   'folder containing state/.')


def load_pretrained(path: str) -> tuple[Any, dict[str, Any]]:
  """(params, meta) of a pre-training checkpoint, on the default device.

  Reads only what evaluation needs, whatever mesh the run used; `params` is
  the DropPos tree ({'encoder', 'mask_pos_token', 'projector'}) and `meta`
  holds the model config ('model', 'image_hw'), step and sigma.
  """
  step_dir = resolve_step_dir(path)
  ckptr = ocp.StandardCheckpointer()
  tree = ckptr.metadata(os.path.join(step_dir, 'state')).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  state = ckptr.restore(os.path.join(step_dir, 'state'), abstract)
  with open(os.path.join(step_dir, 'meta', 'metadata')) as f:
    meta = json.load(f)
  return state['params'], meta
