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

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """Async save every N steps, keep the last `max_to_keep`, restore onto any
  mesh by passing an abstract state whose leaves carry the target shardings."""

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
    if max_to_keep < 1:
      raise ValueError(f'keep_ckpts={max_to_keep} must be >= 1.')
    if '://' not in directory:  # Orbax needs absolute local paths.
      directory = os.path.abspath(directory)
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

  def restore_run(self, step: int, abstract_state: Any,
                  model_id: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Resumes a run: like `restore`, after checking that the checkpoint was
    saved for the same model (`model_id`, JSON-able, stored in its meta)."""
    meta = self.restore_meta(step)
    saved = {key: meta.get(key) for key in model_id}
    if json.loads(json.dumps(model_id)) != saved:
      raise ValueError(
          f'{self._manager.directory} holds a checkpoint of another model '
          f'({saved}) than the config asks for ({model_id}); use a new '
          '--workdir.')
    return self.restore(step, abstract_state)

  def close(self) -> None:
    # The start-up removal of half-written saves runs in a thread that only
    # a save awaits; a run that stops before saving must await it too, or it
    # fails at interpreter exit (orbax 0.12.8 has no public call for this).
    self._manager._maybe_await_cleanup_tmp_directory()  # pylint: disable=protected-access
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> 'Checkpoints':
    return self

  def __exit__(self, *exc_info) -> None:
    # Also on errors: a background save thread left open prints a traceback
    # at interpreter exit, burying the real message.
    self.close()


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
