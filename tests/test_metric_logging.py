"""The live view (metric_logging.py): throughput, MFU, data wait and ETA on
training time only, and the lagged recorder's non-finite stop."""
import json

import numpy as np
import pytest

from droppos_jax import metric_logging
from droppos_jax.errors import UserError


class Clock:
  def __init__(self):
    self.now = 100.

  def __call__(self):
    return self.now


def test_interval_means_throughput_mfu_data_wait_and_eta(tmp_path, monkeypatch,
                                                         caplog):
  clock = Clock()
  monkeypatch.setattr(metric_logging.time, 'perf_counter', clock)
  logger = metric_logging.MetricLogger(
      str(tmp_path), total_steps=100, steps_per_epoch=10, global_batch=64,
      flops_per_device=2e12, peak_tflops=10.)
  logger.resume()
  for loss in (3., 1.):          # two steps of 0.5 s, 0.1 s waiting each
    clock.now += 0.1
    logger.add_data_wait(0.1)
    clock.now += 0.4
    logger.add({'loss': loss})
  logger.pause()
  clock.now += 60.               # an evaluation: not training time
  logger.resume()
  with caplog.at_level('INFO'):
    means = logger.flush(2)
  logger.close()
  assert means['loss'] == 2.
  assert means['images_per_sec'] == pytest.approx(128.)
  assert means['tflops_per_device'] == pytest.approx(4.)
  assert means['mfu'] == pytest.approx(0.4)
  assert means['data_wait_frac'] == pytest.approx(0.2)
  assert 'ETA 0:00:49' in caplog.text and '(MFU 40.0%)' in caplog.text
  logged = json.loads((tmp_path / 'train_metrics.jsonl').read_text())
  assert logged['step'] == 2 and logged['epoch'] == 0.2


def test_no_mfu_where_the_chip_is_unknown(tmp_path):
  logger = metric_logging.MetricLogger(
      str(tmp_path), total_steps=10, steps_per_epoch=5, global_batch=8,
      flops_per_device=1e9, is_main=False)
  logger.resume()
  logger.add({'loss': 1.})
  means = logger.flush(1)
  assert 'tflops_per_device' in means and 'mfu' not in means
  assert not list(tmp_path.iterdir())  # only the main process writes


def test_recorder_stops_on_a_non_finite_loss_naming_the_step(tmp_path):
  logger = metric_logging.MetricLogger(
      str(tmp_path), total_steps=10, steps_per_epoch=5, global_batch=8)
  recorder = metric_logging.LaggedRecorder(
      logger, start=0, log_every=1, last_good=lambda: 'No checkpoint was '
      'saved yet.')
  recorder.push(1, {'loss': np.float32(2.)})
  recorder.push(2, {'loss': np.float32(np.nan)})
  with pytest.raises(UserError, match=r'Non-finite loss \(nan\) at step 2; '
                     r'stopping\. No checkpoint was saved yet\.'):
    recorder.flush()
  assert recorder.losses == {1: 2.}
  logger.close()
