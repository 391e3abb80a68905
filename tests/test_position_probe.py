"""Tests of position probing (evaluators/position_probe.py, probe_position.py)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from droppos_jax.configs import position_probe as probe_config
from droppos_jax import checkpoint, sharding
from droppos_jax.errors import UserError
from droppos_jax.evaluators import position_probe
from droppos_jax.models import classifier, convert
from droppos_jax.models import droppos as droppos_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(variant='mu/8', projector='tiny', projector_width=None,
             projector_depth=None, projector_heads=None, dtype='float32',
             remat=False)


def save_tiny_checkpoint(workdir):
  """A DropPos 'mu/8' pre-training workdir (32x32 images, 4x4 grid)."""
  model = droppos_model.droppos_from_config('mu/8', 'tiny')
  params = jax.jit(model.init)(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 1), jnp.int32),
      jnp.ones((1, 1), bool))
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                 max_to_keep=1, save_every=1, last_step=7,
                                 async_save=False)
  ckpts.save(7, {'step': jnp.int32(7), 'params': params['params']},
             {'step': 7, 'model': MODEL, 'image_hw': [32, 32]})
  ckpts.close()
  return params['params']


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  return workdir, save_tiny_checkpoint(workdir)


@pytest.fixture(scope='module')
def position_coded_images(tmp_path_factory):
  """32x32 images whose every 8x8 patch has a colour set by its position, so
  even a random encoder's features tell the position: an easy probe."""
  folder = tmp_path_factory.mktemp('coded')
  rng = np.random.default_rng(0)
  rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing='ij')
  base = np.stack([rows * 80, cols * 80, 40 + 40 * ((rows + cols) % 2)], -1)
  for i in range(32):
    image = np.kron(base, np.ones((8, 8, 1))) + rng.normal(0, 8, (32, 32, 3))
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
        folder / f'{i:02d}.png')
  return str(folder)


@pytest.mark.slow
def test_linear_head_learns_position_coded_features():
  rng = np.random.default_rng(0)
  codes = rng.normal(size=(16, 24))
  labels = rng.integers(0, 16, 2000).astype(np.int32)
  feats = codes[labels] + 0.3 * rng.normal(size=(2000, 24))
  head = position_probe.train_linear_head(feats[:1500], labels[:1500], 16,
                                          steps=200, batch_size=256, lr=3e-2)
  acc, per_position, counts, dist = position_probe.position_accuracy(
      head, feats[1500:], labels[1500:], (4, 4))
  assert acc > 0.95 and dist < 0.1
  assert per_position.shape == counts.shape == (4, 4)
  assert counts.sum() == 500
  sgd = position_probe.train_linear_head(feats, labels, 16, steps=200,
                                         batch_size=256, lr=0.5,
                                         optimizer='sgd')
  assert position_probe.position_accuracy(sgd, feats, labels, (4, 4))[0] > 0.9
  with pytest.raises(ValueError, match='optimizer'):
    position_probe.train_linear_head(feats, labels, 16, steps=1, batch_size=1,
                                     lr=1., optimizer='lars')


def probe_config_for(images, **overrides):
  c = probe_config.get_config()
  c.model.variant = 'mu/8'
  c.image_size = 32
  for data in (c.train_data, c.eval_data):
    data.source, data.path = 'folder', images
  c.batch_size = 16
  c.mask_draws = 2
  c.head.steps = 200
  c.head.batch_size = 256
  for key, value in overrides.items():
    c[key] = value
  return c


@pytest.mark.slow
def test_probe_end_to_end_on_position_coded_images(position_coded_images,
                                                   tmp_path, monkeypatch):
  titles = []
  save = position_probe.save_heatmap
  monkeypatch.setattr(position_probe, 'save_heatmap',
                      lambda *a: titles.append(a[2]) or save(*a))
  config = probe_config_for(position_coded_images, num_eval_images=20)
  res = position_probe.run_probe(config, str(tmp_path), sharding.make_mesh())
  # The title names the encoder, the held-out images by their folder's name
  # (not its path), the grid and chance.
  (title,) = titles
  name = os.path.basename(position_coded_images)
  assert title.startswith('Position probe of random init mu/8 (seed 0)\n'
                          f"held out: folder '{name}'\nmean top-1 ")
  assert title.endswith('over 4x4 positions (chance 6.2 %)')
  assert position_coded_images not in title
  # 4x4 grid, 4 visible, 3 dropped: 32 images x 2 draws x 3 tokens.
  assert res['num_train_tokens'] == 192 and res['num_eval_tokens'] == 120
  assert 0. <= res['acc'] <= 1. and res['acc'] > 0.6, res
  assert res['dropped_pe'] == 'no PE' and res['chance'] == 1 / 16
  assert np.asarray(res['per_position'], float).shape == (4, 4)
  png = tmp_path / 'position_accuracy.png'
  assert png.stat().st_size > 1000
  assert Image.open(png).format == 'PNG'


def test_heatmap_colour_scale_follows_the_data():
  per_position = np.full((4, 4), 0.09)
  per_position[0, 0], per_position[3, 3] = 0.18, np.nan
  fig = position_probe.heatmap_figure(per_position, 'title')
  ax, bar = fig.axes
  (im,) = ax.images
  # 0 to the best accuracy rounded up to 5 %: 9 % and 18 % are far apart in
  # colour (a fixed 0-1 scale put them 9 % of the map apart).
  assert im.get_clim() == (0., 0.2)
  assert abs(im.norm(0.18) - im.norm(0.09)) == pytest.approx(0.45)
  # Chance (1/16) is a line on the colour bar and named in its label.
  assert any(np.allclose(line.get_ydata(), 1 / 16) for line in bar.lines)
  assert 'chance 6.2 %' in bar.get_ylabel()
  texts = [t.get_text() for t in ax.texts]
  assert len(texts) == 16 and texts.count('9') == 14
  assert texts[0] == '18' and texts[-1] == '-'
  # The scale floor is twice chance (12.5 % here), rounded up to 5 %; a best
  # of exactly 15 % is not rounded further; below 20 % cells get a decimal.
  for best, vmax in ((0.01, 0.15), (0.15, 0.15), (0.97, 1.)):
    fig = position_probe.heatmap_figure(np.full((4, 4), best), 'title')
    assert fig.axes[0].images[0].get_clim() == (0., vmax), best
  assert fig.axes[0].texts[0].get_text() == '97'
  fig = position_probe.heatmap_figure(np.full((4, 4), 0.01), 'title')
  assert fig.axes[0].texts[0].get_text() == '1.0'


@pytest.mark.slow
def test_load_encoder_sources(tiny_run, tmp_path):
  workdir, params = tiny_run
  frozen = position_probe.load_encoder(workdir)
  assert frozen.image_hw == (32, 32) and frozen.encoder.width == 32
  assert frozen.label == f"DropPos mu/8 '{os.path.basename(workdir)}', step 7"
  np.testing.assert_array_equal(frozen.mask_pos_token,
                                params['mask_pos_token'])
  # PyTorch layout (.npz needs no torch): same weights, grid from pos_embed;
  # an MAE-style encoder file carries no mask token.
  state = convert.flax_to_torch(params['encoder'], kind='encoder',
                                grid_hw=(4, 4))
  np.savez(tmp_path / 'enc.npz', **state)
  frozen = position_probe.load_encoder(str(tmp_path / 'enc.npz'))
  assert frozen.image_hw == (32, 32) and frozen.mask_pos_token is None
  np.testing.assert_allclose(frozen.params['blocks_1']['mlp']['fc2']['kernel'],
                             params['encoder']['blocks_1']['mlp']['fc2']['kernel'])
  random = position_probe.load_encoder('', variant='mu/8')
  assert random.mask_pos_token is None and random.image_hw is None


def test_bad_init_gives_clear_errors(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match='empty holds no checkpoint'):
    position_probe.load_encoder(str(tmp_path / 'empty'))
  with pytest.raises(UserError, match="init.path '.*missing' does not exist"):
    position_probe.load_encoder(str(tmp_path / 'missing'))
  (tmp_path / 'notes.txt').write_text('hi')
  with pytest.raises(UserError, match='notes.txt is not a weights file'):
    position_probe.load_encoder(str(tmp_path / 'notes.txt'))
  with pytest.raises(ValueError, match='Unknown ViT variant'):
    position_probe.load_encoder('', variant='huge/16')


@pytest.mark.slow
def test_command(tiny_run, position_coded_images, tmp_path):
  """The documented command on a pre-training workdir: results + heat-map."""
  data = [f'--config.{d}.{k}={v}' for d in ('train_data', 'eval_data')
          for k, v in (('source', 'folder'), ('path', position_coded_images))]
  out = subprocess.run(
      [sys.executable, 'probe_position.py',
       '--config', 'configs/position_probe.py', f'--config.init.path={tiny_run[0]}',
       '--config.batch_size=16', '--config.head.steps=50',
       '--config.mask_draws=1', f'--workdir={tmp_path}'] + data,
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((tmp_path / 'position_probe.json').read_text())
  assert results['results']['dropped_pe'] == 'mask_pos_token'
  assert results['results']['image_hw'] == [32, 32]
  assert 0. <= results['results']['acc'] <= 1.
  assert results['config']['init']['path'] == tiny_run[0]
  assert (tmp_path / 'position_accuracy.png').is_file()


@pytest.mark.slow
def test_load_fine_tuned_classifier_uses_fc_norm(tmp_path):
  model = classifier.classifier_from_variant('mu/8', num_classes=5)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  state = convert.flax_to_torch(params, kind='classifier', grid_hw=(4, 4))
  assert 'head.weight' in state and 'norm.weight' not in state
  np.savez(tmp_path / 'finetuned.npz', **state)
  frozen = position_probe.load_encoder(str(tmp_path / 'finetuned.npz'))
  assert frozen.image_hw == (32, 32)
  np.testing.assert_array_equal(frozen.params['norm']['scale'],
                                params['fc_norm']['scale'])
  np.testing.assert_array_equal(frozen.params['blocks_0']['attn']['qkv']['kernel'],
                                params['encoder']['blocks_0']['attn']['qkv']['kernel'])
