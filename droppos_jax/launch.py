"""Plumbing shared by the entry points (train.py, finetune.py): flags, sizes
from configs, epochs -> steps, quiet Orbax logs, and clean error exits."""
from __future__ import annotations

import logging as std_logging
import os
import signal
import sys
from typing import Any, Callable

from absl import flags, logging
import jax
from jax.experimental import multihost_utils
from ml_collections import config_flags

from droppos_jax import sharding


def define_flags() -> None:
  """--config, --workdir, --distributed. Defined by `run`, not at import, so
  that several entry points can be imported in one (test) process."""
  config_flags.DEFINE_config_file('config', None, 'Config file (path.py[:arg]).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Where checkpoints and logs go; resumed.')
  flags.DEFINE_enum('distributed', 'auto', ['auto', 'yes', 'no'],
                    'jax.distributed.initialize(): auto = if a cluster '
                    'launcher (TPU pod, SLURM, MPI, JAX_COORDINATOR_ADDRESS) '
                    'is detected.')


def image_hw(config) -> tuple[int, int]:
  size = config.image_size
  hw = (size, size) if isinstance(size, int) else tuple(size)
  if len(hw) != 2 or min(hw) <= 0:
    raise ValueError(f'image_size={size!r}; expected a positive int or '
                     '(height, width).')
  return hw


def schedule_lengths(config, num_examples: int) -> tuple[int, int, int]:
  """(steps_per_epoch, total_steps, warmup_steps) from epochs, in one place."""
  steps_per_epoch = num_examples // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'batch_size={config.batch_size} exceeds the {num_examples} '
                     'training examples; lower it.')
  total = (config.num_train_steps if config.num_train_steps > 0
           else int(config.epochs * steps_per_epoch))
  return steps_per_epoch, total, int(config.warmup_epochs * steps_per_epoch)


def save_config(config, workdir: str) -> None:
  """Logs the resolved config and writes it to workdir/config.json (main
  process only)."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  logging.info('Config:\n%s', config)


class _QuietOrbax(std_logging.Filter):
  """Orbax logs every save step at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname


def run(train_fn: Callable[[Any, str], Any]) -> None:
  """absl main for `train_fn(config, workdir)`: bad input -> 'error: …' and
  exit status 1, with no traceback."""
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()

  def main(argv):
    del argv
    logging.get_absl_logger().addFilter(_QuietOrbax())
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if config is None or not workdir:
      sys.exit('error: --config and --workdir are required.')
    jax.config.update('jax_threefry_partitionable', True)
    sharding.maybe_initialize_distributed(flags.FLAGS.distributed)
    try:
      train_fn(config, workdir)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
      sys.exit(f'error: {e}')

  app.run(main)


class PreemptionWatch:
  """Tells the training loop to save and stop: on SIGTERM (how a TPU VM is
  preempted) or, across hosts, at JAX's preemption sync point."""

  def __init__(self):
    self.signalled = False
    signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, *_):
    self.signalled = True

  def should_stop(self, step: int) -> bool:
    return self.signalled or (
        jax.process_count() > 1 and
        multihost_utils.reached_preemption_sync_point(step))
