"""What every objective's train step shares: micro-batches and the update."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import dataclasses

import jax
import jax.numpy as jnp
import optax

from droppos_jax.models import vit


@dataclasses.dataclass(frozen=True)
class PatchGrid:
  """The image size and patch size an objective's settings start with."""
  image_hw: tuple[int, int]
  patch_size: int

  @property
  def grid(self) -> tuple[int, int]:
    return vit.grid_size(self.image_hw, self.patch_size)

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]


def microbatches(arrays: Sequence[jax.Array], accum_steps: int):
  """Each of `arrays` [B, ...] as [A, B/A, ...]: micro-batch m takes rows m,
  m+A, m+2A, ... so every device contributes to every micro-batch."""
  def split(x):
    x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return tuple(split(x) for x in arrays)


def sum_over(fn: Callable[..., Any], micro: Sequence[jax.Array]):
  """The sum over micro-batches of the pytree fn(*micro-batch), in one scan
  (one micro-batch's activations live at a time)."""
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
      fn, *jax.tree.map(lambda x: x[0], tuple(micro))))
  total, _ = jax.lax.scan(
      lambda carry, m: (jax.tree.map(jnp.add, carry, fn(*m)), None),
      init, tuple(micro))
  return total


def apply_gradients(state, grads, metrics, tx, lr_fn):
  """(state after the optimizer's update by `grads`, `metrics` with the
  learning rate and the gradient and parameter norms)."""
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  metrics = dict(metrics, lr=lr_fn(state['step']),
                 grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params))
  return ({'step': state['step'] + 1, 'params': params, 'opt_state': opt_state},
          metrics)
