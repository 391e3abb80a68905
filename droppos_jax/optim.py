"""Optimizer for pre-training: AdamW with the MAE weight-decay mask, per-tensor
or global gradient clipping, and warm-up + half-cosine learning rate."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from droppos_jax.errors import UserError

CLIP_MODES = ('per_tensor', 'global', 'none')


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: every parameter with ndim > 1.

  Biases and LayerNorm scales/biases (1-D) are not decayed; cls_token and
  mask_pos_token ([1, 1, D]) are, as in the reference.
  """
  return jax.tree.map(lambda x: x.ndim > 1, params)


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
  """Scales each gradient tensor whose own L2 norm exceeds `max_norm` down to
  it (the reference recipe), independently of the other tensors."""

  def update_fn(updates, state, params=None):
    del params

    def clip(g):
      norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      return (g * jnp.minimum(1., max_norm / jnp.maximum(norm, 1e-6))).astype(
          g.dtype)

    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def lr_schedule(peak_lr: float, *, total_steps: int, warmup_steps: int,
                min_lr: float = 0.) -> optax.Schedule:
  """Linear warm-up from 0 to `peak_lr`, then half-cosine down to `min_lr`."""
  if not 0 <= min_lr <= peak_lr:
    raise UserError(f'optim.min_lr={min_lr} must be in [0, {peak_lr:.3g}] (the '
                    'peak lr, optim.blr * batch_size / 256).')
  if warmup_steps >= total_steps:
    raise UserError(f'warm-up ({warmup_steps} steps) must be shorter than the '
                     f'run ({total_steps} steps); reduce warmup_epochs.')
  return optax.warmup_cosine_decay_schedule(
      init_value=0., peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=min_lr)


def check_adamw(cfg: Any) -> None:
  """AdamW's settings `cfg.b1`, `cfg.b2` and `cfg.weight_decay`."""
  for name in ('b1', 'b2'):
    value = getattr(cfg, name)
    if not 0 <= value < 1:
      raise UserError(f'optim.{name}={value} must be in [0, 1) (a decay rate '
                      'of the moment estimates, e.g. 0.9 or 0.999).')
  if not cfg.weight_decay >= 0:
    raise UserError(f'optim.weight_decay={cfg.weight_decay} must be >= 0.')


def make_optimizer(cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """cfg: b1, b2, weight_decay, clip ('per_tensor'|'global'|'none'), clip_norm."""
  check_adamw(cfg)
  if cfg.clip not in CLIP_MODES:
    raise UserError(f'optim.clip={cfg.clip!r}; valid: {CLIP_MODES}.')
  if cfg.clip != 'none' and not cfg.clip_norm > 0:
    raise UserError(f'optim.clip_norm={cfg.clip_norm!r} must be > 0.')
  clip = {'per_tensor': lambda: clip_per_tensor(cfg.clip_norm),
          'global': lambda: optax.clip_by_global_norm(cfg.clip_norm),
          'none': optax.identity}[cfg.clip]()
  return optax.chain(
      clip,
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                  mask=decay_mask))
