"""End-to-end tests of fine-tuning / linear probing (finetune.py) on tiny data."""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from droppos_jax import finetune
from droppos_jax.errors import UserError
from droppos_jax import train
from droppos_jax.configs import finetune as finetune_config
from droppos_jax.configs import linear_probe as probe_config
from droppos_jax.configs import pretrain as pretrain_config
from droppos_jax import classification
from droppos_jax.data import sources, streams, transforms
from droppos_jax.models import convert, weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(config_module=finetune_config, **overrides):
  """runlocal: mu/8 at 32 px, 32 train / 24 val demo crops, batch 16."""
  c = config_module.get_config('runlocal')
  c.ckpt_every = 2
  for key, value in overrides.items():
    c[key] = value
  return c


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A 2-step DropPos pre-training workdir of the same tiny ViT."""
  workdir = str(tmp_path_factory.mktemp('pt'))
  c = pretrain_config.get_config('runlocal')
  c.image_size = 32
  c.model.variant = 'mu/8'
  c.data.num_images, c.data.crop_size = 32, 40
  c.num_train_steps = c.ckpt_every = 2
  train.train(c, workdir)
  return workdir


@pytest.mark.slow
def test_finetune_end_to_end_and_resume(tmp_path):
  full = finetune.train(tiny(), str(tmp_path / 'full'))
  assert sorted(full['losses']) == [1, 2, 3, 4]
  assert np.isfinite(list(full['losses'].values())).all()
  assert sorted(full['evals']) == [2, 4]    # every epoch (2 steps)
  for metrics in full['evals'].values():
    assert 0 <= metrics['acc1'] <= metrics['acc5'] <= 1
    assert metrics['count'] == 24 and np.isfinite(metrics['loss'])
  for name in ('train_metrics.jsonl', 'val_metrics.jsonl', 'config.json'):
    assert os.path.isfile(tmp_path / 'full' / name)
  # Resume from step 2 of a copy: steps 3, 4 are the uninterrupted ones.
  shutil.copytree(tmp_path / 'full', tmp_path / 'cut')
  shutil.rmtree(tmp_path / 'cut' / 'checkpoints' / '4')
  resumed = finetune.train(tiny(), str(tmp_path / 'cut'))
  assert sorted(resumed['losses']) == [3, 4]
  np.testing.assert_allclose([resumed['losses'][s] for s in (3, 4)],
                             [full['losses'][s] for s in (3, 4)], rtol=1e-6)
  assert resumed['evals'][4] == pytest.approx(full['evals'][4])


@pytest.mark.slow
def test_finetune_from_pretraining_checkpoint_loads_its_encoder(pretrained,
                                                                tmp_path):
  c = tiny(num_train_steps=2)
  c.init.path = pretrained
  model = classification.build_model(c, 16)
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
  loaded = classification.load_init(c.init, c.protocol, abstract['params'],
                                    (32, 32), 8)
  want = dict(weights.read(pretrained).params['encoder'])
  del want['norm']   # global pooling has fc_norm instead
  jax.tree.map(np.testing.assert_array_equal, loaded['encoder'], want)
  finetune.train(c, str(tmp_path))
  tuned = weights.read(str(tmp_path))
  assert (tuned.kind, tuned.step, tuned.image_hw) == ('classifier', 2, (32, 32))
  assert jax.tree.map(np.shape, tuned.params['encoder']) == jax.tree.map(
      np.shape, want)


@pytest.mark.slow
def test_linear_probe_trains_head_only(pretrained, tmp_path):
  c = tiny(probe_config)
  c.init.path = pretrained
  out = finetune.train(c, str(tmp_path))
  assert np.isfinite(list(out['losses'].values())).all()
  assert 0 <= out['evals'][4]['acc1'] <= out['evals'][4]['acc5'] <= 1
  tuned = weights.read(str(tmp_path))
  assert tuned.kind == 'linear_probe' and set(tuned.batch_stats) == {'head_norm'}
  jax.tree.map(np.testing.assert_array_equal, tuned.params['encoder'],
               weights.read(pretrained).params['encoder'])
  assert np.abs(np.asarray(tuned.params['head']['kernel'])).max() > 0.


def forbid_compile(monkeypatch):
  """jit may wrap functions (the trainer builds its steps first), but
  compiling or running one fails the test."""
  class Uncompilable:
    def __init__(self, *args, **kwargs):
      del args, kwargs

    def __call__(self, *args, **kwargs):
      raise AssertionError('compiled before rejecting bad input')

    lower = __call__

  monkeypatch.setattr(finetune.jax, 'jit', Uncompilable)


@pytest.mark.slow
def test_bad_init_fails_before_compile(pretrained, tmp_path, monkeypatch):
  forbid_compile(monkeypatch)
  state = convert.flax_to_torch(weights.read(pretrained).params,
                                kind='droppos', grid_hw=(4, 4))
  learned = dict(state, pos_embed=np.random.default_rng(0).normal(
      size=state['pos_embed'].shape).astype(np.float32))
  np.savez(tmp_path / 'learned.npz', **learned)
  (tmp_path / 'junk.npz').write_text('not a checkpoint')
  cases = [
      (pretrained, dict(variant='mu/16'), 'has patch size 8, the model 16'),
      (pretrained, dict(variant='nano/8'),
       'does not fit this model .* e.g. missing blocks_2'),
      (str(tmp_path / 'junk.npz'), {}, 'junk.npz is not a weights file'),
      (str(tmp_path / 'learned.npz'), {}, 'LEARNED pos_embed'),
      (str(tmp_path / 'none'), {}, 'does not exist'),
  ]
  for i, (path, model, message) in enumerate(cases):
    c = tiny()
    c.init.path = path
    c.model.update(model)
    with pytest.raises(UserError, match=message):
      finetune.train(c, str(tmp_path / f'w{i}'))


@pytest.mark.parametrize('field,value,message', [
    ('batch_size', 12, 'batch_size=12 must be a positive multiple of the 8'),
    ('mix.prob', 2., r'mix.prob=2.0 is a probability'),
    ('augment.crop_scale', (0.5, 0.1), 'crop_scale'),
    ('protocol', 'knn', "protocol='knn'"),
])
def test_bad_settings_fail_before_compile(tmp_path, monkeypatch, field, value,
                                          message):
  forbid_compile(monkeypatch)
  c = tiny()
  node, _, leaf = field.rpartition('.')
  (c[node] if node else c)[leaf] = value
  with pytest.raises(ValueError, match=message):
    finetune.train(c, str(tmp_path))


def test_configs_load():
  for arg, variant, epochs in [('', 'B/16', 100), ('variant=L/16', 'L/16', 50),
                               ('demo', 'nano/8', 30)]:
    c = finetune_config.get_config(arg)
    assert (c.model.variant, c.epochs) == (variant, epochs)
  p = probe_config.get_config('variant=L/16')
  assert (p.batch_size, p.epochs, p.optim.blr, p.protocol) == (
      16384, 90, 0.1, 'linear_probe')
  assert probe_config.get_config('demo').val_data.split == 'val'
  with pytest.raises(ValueError, match="Unknown config arg 'epochs'"):
    finetune_config.get_config('epochs=3')


@pytest.mark.slow
def test_finetune_stream_is_reproducible_and_resumable():
  """RandAugment and erasing draws are keyed by the example's position."""
  c = tiny()
  source = sources.open_source(c.data)
  augment = transforms.finetune_augment(c.augment)
  stream = lambda start: streams.train_stream(
      source, augment, image_size=32, global_batch_size=8, seed=0,
      start_step=start)
  take = lambda it, n: [next(it) for _ in range(n)]
  full, again = take(stream(0), 5), take(stream(3), 2)
  for x, y in zip(full[3:], again):
    for k in ('image', 'label', 'erase'):
      np.testing.assert_array_equal(x[k], y[k])
  assert full[0]['image'].shape == (8, 32, 32, 3)
  assert full[0]['erase'].shape == (8, 5) and full[0]['label'].max() < 16


@pytest.mark.slow
def test_command_line_reports_bad_input_without_traceback(tmp_path):
  run = subprocess.run(
      [sys.executable, 'finetune.py', '--config', 'configs/finetune.py:runlocal',
       '--workdir', str(tmp_path), '--config.init.path=/no/such/dir'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode != 0
  assert "error: init.path '/no/such/dir' does not exist" in run.stderr
  assert 'Traceback' not in run.stderr
