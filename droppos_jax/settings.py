"""Values every trainer derives from its config, computed and checked once:
the image size and the schedule (lengths in steps, peak learning rate).
Trainers, evaluators, the planner and the data streams take these typed
values; nothing parses the raw fields again."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from droppos_jax import optim
from droppos_jax.errors import UserError


def require_fields(config: Any, fields: Sequence[tuple[str, str]], *,
                   chosen: str, what: str, config_file: str) -> None:
  """Refuses a config switched to another component (`chosen`, e.g.
  "protocol='finetune'") that lacks the (block, field)s it reads."""
  missing = [f'{block}.{name}' for block, name in fields
             if name not in config[block]]
  if missing:
    raise UserError(
        f'{chosen} needs {", ".join(missing)}, which this config lacks (it '
        f'was made for another {what}); start from {config_file} instead.')


def image_hw(size: int | Sequence[int]) -> tuple[int, int]:
  """`image_size` (an int, or (height, width) for non-square) as (h, w)."""
  hw = (size, size) if isinstance(size, int) else tuple(size)
  if len(hw) != 2 or min(hw) <= 0:
    raise UserError(f'image_size={size!r}; expected a positive int or '
                    '(height, width).')
  return int(hw[0]), int(hw[1])


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A run's length in steps (epochs converted once) and its learning rate:
  linear warm-up to peak_lr = optim.blr * batch_size / 256, then a half
  cosine to optim.min_lr."""
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  peak_lr: float
  min_lr: float

  def lr_fn(self):
    return optim.lr_schedule(self.peak_lr, total_steps=self.total_steps,
                             warmup_steps=self.warmup_steps,
                             min_lr=self.min_lr)


def schedule(config: Any, num_examples: int) -> Schedule:
  """The schedule of a trainer's config (epochs, warmup_epochs,
  num_train_steps, batch_size, optim.blr/min_lr) over `num_examples`."""
  steps_per_epoch = num_examples // config.batch_size
  if steps_per_epoch < 1:
    raise UserError(f'batch_size={config.batch_size} exceeds the {num_examples} '
                    'training examples; lower it.')
  steps = config.num_train_steps
  if steps == 0 or steps < -1:
    raise UserError(f'num_train_steps={steps} must be > 0, or -1 to train for '
                    f'epochs={config.epochs}.')
  if steps == -1 and not config.epochs > 0:
    raise UserError(f'epochs={config.epochs} must be > 0 (or set '
                    'num_train_steps > 0).')
  if config.warmup_epochs < 0:
    raise UserError(f'warmup_epochs={config.warmup_epochs} must be >= 0.')
  total = steps if steps > 0 else int(config.epochs * steps_per_epoch)
  warmup = int(config.warmup_epochs * steps_per_epoch)
  if total < 1:
    raise UserError(f'epochs={config.epochs} is less than one step of '
                    f'batch_size={config.batch_size} over {num_examples} '
                    'examples; raise it.')
  if warmup >= total:
    raise UserError(f'warmup_epochs={config.warmup_epochs} ({warmup} steps) '
                    f'must be shorter than the run ({total} steps); reduce it.')
  if not config.optim.blr > 0:
    raise UserError(f'optim.blr={config.optim.blr} must be > 0 (the paper '
                    'uses 1.5e-4 for pre-training, 1e-3 for fine-tuning).')
  return Schedule(steps_per_epoch, total, warmup,
                  config.optim.blr * config.batch_size / 256,
                  config.optim.min_lr)
