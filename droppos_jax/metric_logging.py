"""Live view of a run: console progress line, TensorBoard events (clu) and a
JSON-lines log in the workdir."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Optional

from absl import logging
from clu import metric_writers
import jax
import numpy as np


# (metric, console label, format) of the progress line.
PRETRAIN_FIELDS = (('loss', 'loss', '.4f'), ('acc1', 'pos acc', '.1%'),
                   ('acc1_kept', 'kept-PE acc', '.1%'), ('dist_err', 'dist', '.2f'),
                   ('sigma', 'sigma', '.3f'), ('lr', 'lr', '.2e'))
CLASSIFICATION_FIELDS = (('loss', 'loss', '.4f'), ('acc1', 'acc1', '.2%'),
                         ('acc5', 'acc5', '.2%'), ('lr', 'lr', '.2e'),
                         ('grad_norm', 'grad norm', '.3f'))
ONLINE_EVAL_FIELDS = (('knn_top1', 'k-NN top-1', '.1%'),
                      ('heldout_pos_acc', 'held-out pos acc', '.1%'),
                      ('heldout_dist_err', 'held-out dist', '.2f'))


def _eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class MetricLogger:
  """Averages per-step metrics over an interval and writes them out.

  Only the main process writes files; every process may call `add`/`flush`.
  """

  def __init__(self, workdir: str, *, total_steps: int, steps_per_epoch: int,
               global_batch: int, is_main: bool = True, prefix: str = 'train',
               fields=PRETRAIN_FIELDS):
    self.fields = fields
    self.total_steps = total_steps
    self.steps_per_epoch = steps_per_epoch
    self.global_batch = global_batch
    self.prefix = prefix
    self.is_main = is_main
    self._writer = (metric_writers.SummaryWriter(workdir) if is_main
                    else None)
    self._jsonl = (open(os.path.join(workdir, f'{prefix}_metrics.jsonl'), 'a')
                   if is_main else None)
    self._sums: dict[str, float] = {}
    self._count = 0
    self._t0: Optional[float] = None
    self._t0_step = 0

  def start(self, step: int) -> None:
    """Marks the time origin for throughput (call after the first compile)."""
    self._t0, self._t0_step = time.perf_counter(), step

  def add(self, metrics: dict[str, float]) -> None:
    for k, v in metrics.items():
      self._sums[k] = self._sums.get(k, 0.) + float(v)
    self._count += 1

  def flush(self, step: int) -> dict[str, float]:
    """Writes the interval's means at `step`; returns them."""
    if not self._count:
      return {}
    means = {k: v / self._count for k, v in self._sums.items()}
    self._sums, self._count = {}, 0
    now = time.perf_counter()
    if self._t0 is not None and step > self._t0_step:
      sec_per_step = (now - self._t0) / (step - self._t0_step)
      means['images_per_sec'] = self.global_batch / sec_per_step
      eta = (self.total_steps - step) * sec_per_step
      self._t0, self._t0_step = now, step
    else:
      eta = float('nan')
    means['epoch'] = step / self.steps_per_epoch
    if self.is_main:
      self._writer.write_scalars(step, {f'{self.prefix}/{k}': v
                                        for k, v in means.items()})
      self._writer.flush()
      self._jsonl.write(json.dumps({'step': step, **means}) + '\n')
      self._jsonl.flush()
    parts = [f'{label} {format(means[key], fmt)}'
             for key, label, fmt in self.fields if key in means]
    if 'images_per_sec' in means:
      parts += [f'{means["images_per_sec"]:.0f} img/s', f'ETA {_eta(eta)}']
    logging.info('[%d/%d] %s ep %.2f | %s', step, self.total_steps,
                 self.prefix, means['epoch'], ' | '.join(parts))
    return means

  def close(self) -> None:
    if self.is_main:
      self._writer.close()
      self._jsonl.close()


class LaggedRecorder:
  """Feeds per-step device metrics to a MetricLogger one step late.

  Fetching step t's metrics after step t+1 is dispatched keeps the device
  busy, yet every loss is checked: a non-finite one raises FloatingPointError
  naming the step, before the caller can save that state.
  """

  def __init__(self, logger: MetricLogger, *, start: int, log_every: int,
               last_good_step: Callable[[], Optional[int]],
               drop_keys: tuple[str, ...] = ()):
    self.logger = logger
    self.start = start
    self.log_every = log_every
    self.last_good_step = last_good_step
    self.drop_keys = drop_keys
    self.losses: dict[int, float] = {}
    self._pending = None

  def push(self, step: int, metrics) -> None:
    """Records the previous step's metrics, then holds on to these."""
    self.flush()
    self._pending = (step, metrics)

  def flush(self) -> None:
    """Records the held metrics now (before a save or an evaluation)."""
    if self._pending is None:
      return
    step, metrics = self._pending
    self._pending = None
    metrics = jax.device_get(metrics)
    if not np.isfinite(metrics['loss']):
      raise FloatingPointError(
          f'Non-finite loss ({metrics["loss"]}) at step {step}; stopping. The '
          f'last good checkpoint (step {self.last_good_step()}) is kept.')
    self.losses[step] = float(metrics['loss'])
    self.logger.add({k: v for k, v in metrics.items()
                     if k not in self.drop_keys})
    if step == self.start + 1:
      self.logger.start(step)  # throughput excludes the first compile
    if step % self.log_every == 0 or step == self.logger.total_steps:
      self.logger.flush(step)
