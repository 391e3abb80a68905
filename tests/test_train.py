"""End-to-end tests of the pre-training trainer (train.py) on tiny data."""
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from droppos_jax import train
from droppos_jax.configs import pretrain as pretrain_config
from droppos_jax.data import device
from droppos_jax.errors import UserError
import data_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def image_dir(tmp_path_factory):
  """64 real-photo PNGs in class folders, read through tf.data."""
  return data_fixtures.write_image_folder(
      str(tmp_path_factory.mktemp('images')), num_images=64, crop_size=48)


def tiny_config(image_dir, **overrides):
  c = pretrain_config.get_config('runlocal')
  c.image_size = 32
  c.model.variant = 'mu/8'          # 4x4 grid: 16 positions, 4 visible, 3 dropped
  c.data.source = 'folder'
  c.data.path = image_dir
  c.batch_size = 16
  c.num_train_steps = 6
  c.warmup_epochs = 0
  c.optim.blr = 2e-2
  c.log_every = 1
  c.ckpt_every = 3
  for key, value in overrides.items():
    c[key] = value
  return c


@pytest.mark.slow
def test_loss_falls_and_checkpoint_written(image_dir, tmp_path):
  config = tiny_config(image_dir, num_train_steps=24, ckpt_every=12,
                       profile_steps=(3, 5))
  out = train.train(config, str(tmp_path))
  losses = [out['losses'][s] for s in sorted(out['losses'])]
  assert len(losses) == 24 and np.isfinite(losses).all()
  assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1, losses
  assert sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints')
                if d.isdigit()) == [12, 24]
  assert json.loads((tmp_path / 'config.json').read_text())['batch_size'] == 16
  logged = [json.loads(l) for l in (tmp_path / 'train_metrics.jsonl').open()]
  assert [r['step'] for r in logged] == list(range(1, 25))
  for key in ('loss', 'acc1', 'acc1_unweighted', 'acc1_kept', 'dist_err',
              'sigma', 'lr', 'grad_norm', 'param_norm', 'epoch',
              'images_per_sec', 'data_wait_frac', 'tflops_per_device'):
    assert key in logged[-1], key
  assert all(0 <= r['data_wait_frac'] <= 1 for r in logged)
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path))
  # profile_steps=(3, 5): a jax.profiler trace of steps 3 and 4.
  assert list((tmp_path / 'profile').rglob('*.xplane.pb'))


@pytest.mark.slow
def test_data_parallel_fsdp_single_device_and_device_resize_agree(
    image_dir, tmp_path):
  runs = {}
  for name, overrides in {
      'dp8': {}, 'fsdp8': dict(mesh={'data': 1, 'fsdp': -1}),
      'one': dict(num_devices=1),
      'device_resize': dict(device_resize_window=40)}.items():
    runs[name] = train.train(tiny_config(image_dir, num_train_steps=3,
                                         ckpt_every=10, **overrides),
                             str(tmp_path / name))['losses']
  assert jax.device_count() == 8
  for name in ('fsdp8', 'one'):
    np.testing.assert_allclose([runs[name][s] for s in (1, 2, 3)],
                               [runs['dp8'][s] for s in (1, 2, 3)], rtol=2e-5)
  # The same crops resized on the devices: a pixel may move one grey level
  # (measured: 4e-5 apart; flipping the wrong crops moves the loss by 1e-2).
  np.testing.assert_allclose([runs['device_resize'][s] for s in (1, 2, 3)],
                             [runs['dp8'][s] for s in (1, 2, 3)], rtol=2e-4)


@pytest.mark.slow
def test_gradient_accumulation_matches_full_batch(image_dir, tmp_path):
  full = train.train(tiny_config(image_dir, num_train_steps=3),
                     str(tmp_path / 'full'))['losses']
  accum = train.train(tiny_config(image_dir, num_train_steps=3,
                                  grad_accum_steps=2, num_devices=4),
                      str(tmp_path / 'accum'))['losses']
  np.testing.assert_allclose([accum[s] for s in (1, 2, 3)],
                             [full[s] for s in (1, 2, 3)], rtol=2e-5)


def sigterm_after(monkeypatch, num_batches):
  """Makes the data stream deliver SIGTERM (a preemption) after N batches."""
  original = device.global_batches

  def wrapped(iterator, sharding, **kwargs):
    for i, batch in enumerate(original(iterator, sharding, **kwargs)):
      if i == num_batches:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(device, 'global_batches', wrapped)


@pytest.mark.slow
def test_preempt_resume_matches_uninterrupted_and_restores_on_one_device(
    image_dir, tmp_path, monkeypatch):
  full = train.train(tiny_config(image_dir), str(tmp_path / 'full'))['losses']

  with monkeypatch.context() as m:
    sigterm_after(m, 2)  # the signal arrives while step 3 is being fed
    first = train.train(tiny_config(image_dir), str(tmp_path / 'cut'))
  assert first['stopped'] == 'preempted' and first['last_step'] == 3
  assert os.path.isdir(tmp_path / 'cut' / 'checkpoints' / '3')
  shutil.copytree(tmp_path / 'cut', tmp_path / 'cut1')

  resumed = train.train(tiny_config(image_dir), str(tmp_path / 'cut'))['losses']
  assert sorted(resumed) == [4, 5, 6]
  np.testing.assert_array_equal([resumed[s] for s in (4, 5, 6)],
                                [full[s] for s in (4, 5, 6)])
  # Saved on 8 devices, restored on 1: same state, same data, same masks.
  one = train.train(tiny_config(image_dir, num_devices=1),
                    str(tmp_path / 'cut1'))['losses']
  np.testing.assert_allclose([one[s] for s in (4, 5, 6)],
                             [full[s] for s in (4, 5, 6)], rtol=2e-5)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    image_dir, tmp_path, monkeypatch):
  original = device.global_batches

  def poisoned(iterator, sharding, **kwargs):
    for i, batch in enumerate(original(iterator, sharding, **kwargs)):
      if i == 4:  # step 5
        batch = dict(batch, image=batch['image'] * np.nan)
      yield batch

  monkeypatch.setattr(device, 'global_batches', poisoned)
  with pytest.raises(UserError, match='at step 5.*last good checkpoint is step 3'):
    train.train(tiny_config(image_dir, num_train_steps=8), str(tmp_path))
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints')
                 if d.isdigit())
  assert steps == [3]


def forbid_compile(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('compiled before rejecting bad input')
  monkeypatch.setattr(train.Setup, 'compile', fail)


@pytest.mark.parametrize('overrides,message', [
    (dict(batch_size=12), 'batch_size=12 must be a positive multiple of the 8 devices'),
    (dict(image_size=30), 'Patch size 8 must divide the image size 30x30'),
    (dict(mesh={'data': 3, 'fsdp': -1}), 'mesh.data=3'),
    (dict(grad_accum_steps=3), 'not divisible by grad_accum_steps=3'),
])
def test_bad_settings_fail_before_compile(image_dir, tmp_path, monkeypatch,
                                          overrides, message):
  forbid_compile(monkeypatch)
  with pytest.raises(UserError, match=message):
    train.train(tiny_config(image_dir, **overrides), str(tmp_path))
  assert not os.listdir(tmp_path)  # a refused launch writes nothing


def test_bad_data_and_variant_fail_before_compile(image_dir, tmp_path,
                                                  monkeypatch):
  forbid_compile(monkeypatch)
  config = tiny_config(image_dir)
  config.data.path = str(tmp_path / 'missing')
  with pytest.raises(ValueError, match='missing'):
    train.train(config, str(tmp_path / 'w1'))
  os.makedirs(tmp_path / 'empty')
  config.data.path = str(tmp_path / 'empty')
  with pytest.raises(ValueError, match='No images found'):
    train.train(config, str(tmp_path / 'w2'))
  config = tiny_config(image_dir)
  config.model.variant = 'Q/8'
  with pytest.raises(ValueError, match="Unknown ViT variant 'Q/8'"):
    train.train(config, str(tmp_path / 'w3'))


@pytest.mark.slow
def test_resume_refuses_checkpoint_of_another_model(image_dir, tmp_path):
  train.train(tiny_config(image_dir, num_train_steps=3), str(tmp_path))
  saved = (tmp_path / 'config.json').read_text()
  config = tiny_config(image_dir, num_train_steps=6)
  config.model.projector = 'small'
  with pytest.raises(UserError, match="another config .*model.projector: "
                     "'tiny' -> 'small'; num_train_steps: 3 -> 6"):
    train.train(config, str(tmp_path))
  assert (tmp_path / 'config.json').read_text() == saved


@pytest.mark.slow
def test_command_line_rejects_unknown_key_and_bad_batch(image_dir, tmp_path):
  def run(*args):
    return subprocess.run(
        [sys.executable, 'train.py', '--config', 'configs/pretrain.py:runlocal',
         '--workdir', str(tmp_path), *args], cwd=REPO, capture_output=True,
        text=True, timeout=300)

  bad_key = run('--config.no_such_key=1')
  assert bad_key.returncode != 0 and 'no_such_key' in bad_key.stderr
  bad_batch = run('--config.batch_size=0')
  assert bad_batch.returncode != 0
  assert 'error: batch_size=0 must be a positive multiple' in bad_batch.stderr
  assert 'Traceback' not in bad_batch.stderr
  missing = run('--config.data.source=folder', '--config.data.path=/no/such/dir')
  assert missing.returncode != 0
  assert "error: data.path '/no/such/dir' is not an existing directory" in (
      missing.stderr)


@pytest.mark.slow
def test_online_evaluator_runs_inside_pretraining(image_dir, tmp_path):
  config = tiny_config(image_dir)
  config.eval.enabled = True
  config.eval.every_steps = 3
  config.eval.num_bank_examples, config.eval.num_query_examples = 32, 16
  config.eval.batch_size = 16
  train.train(config, str(tmp_path))
  logged = [json.loads(l) for l in (tmp_path / 'eval_metrics.jsonl').open()]
  assert [r['step'] for r in logged] == [3, 6]
  for r in logged:
    assert 0 <= r['knn_top1'] <= 1 and 0 <= r['heldout_pos_acc'] <= 1
