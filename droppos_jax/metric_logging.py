"""Live view of a run: console progress line, TensorBoard events (clu) and a
JSON-lines log in the workdir.

The progress line shows step/total, epoch, the run's metrics, images/s,
model TFLOP/s per device and MFU (where the chip's peak is known), the share
of each step spent waiting for data, and an ETA. Throughput and ETA count
training time only: the clock is paused for compilation and evaluation.
"""
from __future__ import annotations

import functools
import json
import math
import time
from typing import Callable, Optional

from absl import logging
from clu import metric_writers
from etils import epath
import jax
import numpy as np
import tensorflow as tf  # clu's writer imports it anyway

from droppos_jax.errors import UserError
from droppos_jax.formatting import clock

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


def _tensorboard_writer(workdir: epath.Path):
  """clu's TensorBoard writer, or None (with a warning) where TensorFlow has
  no file system for the workdir's scheme (it has local paths and gs://)."""
  try:
    return metric_writers.SummaryWriter(str(workdir))
  except tf.errors.UnimplementedError as e:
    _warn_once(f'No TensorBoard events in {workdir}: '
               f'{str(e).split("(")[0].strip()}. The metrics are in the '
               '*_metrics.jsonl logs.')
    return None


@functools.cache
def _warn_once(message: str) -> None:
  logging.warning(message)


def brief(metrics: dict[str, float], fields) -> str:
  """'loss 2.4119, pos acc 16.9%' for the `fields` present in `metrics`."""
  return ', '.join(f'{label} {format(metrics[key], fmt)}'
                   for key, label, fmt in fields if key in metrics
                   ) or 'no metrics logged'


class MetricLogger:
  """Averages per-step metrics over an interval and writes them out.

  Only the main process writes files; every process may call `add`/`flush`.
  `flops_per_device` (compiled FLOPs of one step on one device) and
  `peak_tflops` (the chip's) add TFLOP/s and MFU to the line.
  """

  def __init__(self, workdir: str, *, total_steps: int, steps_per_epoch: int,
               global_batch: int, is_main: bool = True, prefix: str = 'train',
               fields=PRETRAIN_FIELDS, flops_per_device: Optional[float] = None,
               peak_tflops: Optional[float] = None):
    self.fields = fields
    self.total_steps = total_steps
    self.steps_per_epoch = steps_per_epoch
    self.global_batch = global_batch
    self.prefix = prefix
    self.is_main = is_main
    self.flops_per_device = flops_per_device
    self.peak_tflops = peak_tflops
    self.last: dict[str, float] = {}
    workdir = epath.Path(workdir)
    self._writer = _tensorboard_writer(workdir) if is_main else None
    self._jsonl = ((workdir / f'{prefix}_metrics.jsonl').open('a') if is_main
                   else None)
    self._sums: dict[str, float] = {}
    self._count = 0
    self._busy = 0.           # training seconds in the current interval
    self._busy_steps = 0
    self._data_wait = 0.      # of which waiting for input
    self._running_since: Optional[float] = None

  # The step clock: only time between resume() and pause() counts.
  def resume(self) -> None:
    if self._running_since is None:
      self._running_since = time.perf_counter()

  def pause(self) -> None:
    if self._running_since is not None:
      self._busy += time.perf_counter() - self._running_since
      self._running_since = None

  def add_data_wait(self, seconds: float) -> None:
    """Time the loop just spent waiting for its next batch (measured on the
    same clock as the interval, so the fraction is of training time)."""
    self._data_wait += seconds

  def add(self, metrics: dict[str, float]) -> None:
    for k, v in metrics.items():
      self._sums[k] = self._sums.get(k, 0.) + float(v)
    self._count += 1
    self._busy_steps += 1

  def flush(self, step: int) -> dict[str, float]:
    """Writes the interval's means at `step`; returns them."""
    if not self._count:
      return {}
    means = {k: v / self._count for k, v in self._sums.items()}
    running = self._running_since is not None
    self.pause()
    eta = float('nan')
    if self._busy > 0 and self._busy_steps:
      sec_per_step = self._busy / self._busy_steps
      means['images_per_sec'] = self.global_batch / sec_per_step
      eta = (self.total_steps - step) * sec_per_step
      means['data_wait_frac'] = self._data_wait / self._busy
      if self.flops_per_device:
        means['tflops_per_device'] = self.flops_per_device / sec_per_step / 1e12
        if self.peak_tflops:
          means['mfu'] = means['tflops_per_device'] / self.peak_tflops
    self._sums, self._count, self._busy, self._busy_steps = {}, 0, 0., 0
    self._data_wait = 0.
    if running:
      self.resume()
    means['epoch'] = step / self.steps_per_epoch
    self.last = means
    if self.is_main:
      if self._writer:
        self._writer.write_scalars(step, {f'{self.prefix}/{k}': v
                                          for k, v in means.items()})
        self._writer.flush()
      self._jsonl.write(json.dumps({'step': step, **means}) + '\n')
      self._jsonl.flush()
    parts = [f'{label} {format(means[key], fmt)}'
             for key, label, fmt in self.fields if key in means]
    if 'images_per_sec' in means:
      parts.append(f'{means["images_per_sec"]:.0f} img/s')
    if 'tflops_per_device' in means:
      parts.append(f'{means["tflops_per_device"]:.2f} TFLOP/s/dev' + (
          f' (MFU {means["mfu"]:.1%})' if 'mfu' in means else ''))
    if 'data_wait_frac' in means:
      parts.append(f'data wait {means["data_wait_frac"]:.0%}')
    if math.isfinite(eta):
      parts.append(f'ETA {clock(eta)}')
    logging.info('[%d/%d] %s ep %.2f | %s', step, self.total_steps,
                 self.prefix, means['epoch'], ' | '.join(parts))
    return means

  def close(self) -> None:
    if self.is_main:
      if self._writer:
        self._writer.close()
      self._jsonl.close()

  def __enter__(self) -> 'MetricLogger':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class LaggedRecorder:
  """Feeds per-step device metrics to a MetricLogger one step late.

  Fetching step t's metrics after step t+1 is dispatched keeps the device
  busy, yet every loss is checked: a non-finite one stops the run naming the
  step, before the caller can save that state.
  """

  def __init__(self, logger: MetricLogger, *, start: int, log_every: int,
               last_good: Callable[[], str], drop_keys: tuple[str, ...] = ()):
    self.logger = logger
    self.start = start
    self.log_every = log_every
    self.last_good = last_good
    self.drop_keys = drop_keys
    self.losses: dict[int, float] = {}
    self._pending = None

  def push(self, step: int, metrics) -> None:
    """Records the previous step's metrics, then holds on to these (device
    arrays)."""
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
      raise UserError(
          f'Non-finite loss ({metrics["loss"]}) at step {step}; stopping. '
          f'{self.last_good()} Lower the learning rate (optim.blr) or check '
          'the data.')
    self.losses[step] = float(metrics['loss'])
    self.logger.add({k: v for k, v in metrics.items()
                     if k not in self.drop_keys})
    if step % self.log_every == 0 or step == self.logger.total_steps:
      self.logger.flush(step)
