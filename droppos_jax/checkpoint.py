"""Orbax checkpoints of the sharded train state plus a JSON side-car (step,
data position, seed, sigma, model identity).

Orbax writes each save to a temporary directory and renames it only once
complete, so an interrupted save is never listed as a step; leftovers are
removed at start-up (`cleanup_tmp_directories`).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """Async save every N steps, keep the last `max_to_keep`, restore onto any
  mesh by passing an abstract state whose leaves carry the target shardings."""

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
    if max_to_keep < 1:
      raise ValueError(f'keep_ckpts={max_to_keep} must be >= 1.')
    self._manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                       force=True)

  def restore_meta(self, step: int) -> dict[str, Any]:
    return self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `step` into the shapes/shardings of `abstract_state`."""
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f'Checkpoint step {step} in {self._manager.directory} does not match '
          f'the model being trained (another variant, patch size or image '
          f'size?): {e}') from e
    return out['state'], out['meta']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state, shardings)
