"""Tests of the pictures (droppos_jax/pictures.py, visualize.py)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from matplotlib import colors
import ml_collections
import numpy as np
from PIL import Image
import pytest

from droppos_jax import checkpoint
from droppos_jax.data import device
from droppos_jax.errors import UserError
from droppos_jax import pictures as visualize
from droppos_jax.models import droppos as droppos_model
from droppos_jax.models import weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TRAIN = dict(source='demo', name=None, data_dir=None, split='train',
                  path=None)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """A DropPos 'mu/8' workdir at step 3 (32x32 images) whose config.json
  says it pre-trained on the demo's train split."""
  run = tmp_path_factory.mktemp('pics') / 'run'
  model = droppos_model.droppos_from_config('mu/8', 'tiny')
  params = jax.jit(model.init)(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 1), jnp.int32),
      jnp.ones((1, 1), bool))
  ckpts = checkpoint.Checkpoints(str(run / 'checkpoints'),
                                 max_to_keep=1, save_every=1, last_step=3,
                                 async_save=False)
  ckpts.save(3, {'step': jnp.int32(3), 'params': params['params']}, {
      'step': 3, 'image_hw': [32, 32], 'model': dict(
          variant='mu/8', projector='tiny', projector_width=None,
          projector_depth=None, projector_heads=None, dtype='float32',
          remat=False)})
  ckpts.close()
  (run / 'config.json').write_text(json.dumps({'data': DEMO_TRAIN}))
  return run


def fake_predictions(b):
  """b images of 32x32 (4x4 grid of 8 px): 4 visible, 3 of them PE-dropped,
  one wrong guess each; attention rows summing to 1."""
  rng = np.random.default_rng(0)
  ids_keep = np.stack([rng.permutation(16)[:4] for _ in range(b)])
  drop_mask = np.array([[False, True, True, True]] * b)
  predicted = ids_keep.copy()
  predicted[:, 1] = (predicted[:, 1] + 1) % 16
  return (rng.uniform(size=(b, 32, 32, 3)), ids_keep, drop_mask, predicted,
          rng.dirichlet(np.ones(16), b))


def test_render_writes_png_of_expected_size(tmp_path):
  path = visualize.render(*fake_predictions(3), patch_size=8,
                          path=str(tmp_path / 'grid.png'), panel_inches=1.5,
                          dpi=80, title='test')
  image = Image.open(path)
  # 5 x 3 panels of 1.5 in, plus the 0.85 in title strip and the 0.8 in
  # legend strip, at 80 dpi.
  assert image.size == (5 * 120, 3 * 120 + 132)
  assert np.asarray(image).std() > 10


def test_figure_has_legend_and_fitted_colour_bar():
  images, ids_keep, drop_mask, predicted, attention = fake_predictions(2)
  fig = visualize.figure(images, ids_keep, drop_mask, predicted, attention,
                         patch_size=8)
  # One legend naming every outline colour.
  (legend,) = fig.legends
  edges = {colors.to_hex(h.get_edgecolor()) for h in legend.legend_handles
           if hasattr(h, 'get_facecolor')}
  for colour in (visualize.KEPT, visualize.RIGHT, visualize.WRONG):
    assert colors.to_hex(colour) in edges
  # Both heat-maps share a scale from 0 to the largest weight, and a colour
  # bar shows it with the number of patches in its title.
  heat = [ax.images[-1] for ax in fig.axes[4:10:5]]
  assert all(h.get_clim() == (0., attention.max()) for h in heat)
  bar = fig.axes[-1]
  assert 'over 16 patches' in bar.get_title()
  np.testing.assert_allclose(bar.get_xlim(), (0., attention.max()))
  # The outlines: 1 blue (kept PE) + 2 green + 1 red per image; the
  # reassembly outlines the anchor too unless a wrong guess covers its cell.
  edge = lambda ax: [colors.to_hex(p.get_edgecolor()) for p in ax.patches]
  assert edge(fig.axes[1]) == [colors.to_hex(visualize.KEPT)]
  anchor_shown = int(predicted[0, 1] != ids_keep[0, 0])
  assert sorted(edge(fig.axes[3])) == sorted(
      [colors.to_hex(visualize.WRONG)] + 2 * [colors.to_hex(visualize.RIGHT)]
      + anchor_shown * [colors.to_hex(visualize.KEPT)])


def test_labels_name_run_and_split_not_paths(tiny_run, tmp_path):
  w = weights.read(str(tiny_run))
  assert visualize.weights_label(w, str(tiny_run)) == "DropPos mu/8 'run', step 3"
  step_folder = tiny_run / 'checkpoints' / '3'
  assert visualize.weights_label(
      weights.read(str(step_folder)), str(step_folder)).endswith("'run', step 3")
  val = ml_collections.ConfigDict(dict(DEMO_TRAIN, split='val'))
  title = visualize.make_title(w, str(tiny_run), val, right=4, dropped=12,
                               num_positions=16)
  assert title == ("DropPos mu/8 'run', step 3 - demo val crops (never seen "
                   'in pre-training)\n33 % of PE-dropped patches placed right '
                   '(4 of 12; chance 6.2 %)')
  assert visualize.data_label(DEMO_TRAIN, DEMO_TRAIN) == (
      'demo train crops (the pre-training split)')
  assert visualize.data_label(dict(DEMO_TRAIN, seed=2)) == (
      'demo train crops, crop seed 2')
  folder = dict(source='folder', path=str(tmp_path / 'photos'))
  assert visualize.data_label(folder, DEMO_TRAIN) == "folder 'photos'"
  imagenet = dict(source='tfds', name='imagenet2012', split='train')
  assert visualize.data_label(dict(imagenet, split='validation'), imagenet) == (
      'imagenet2012 validation (never seen in pre-training)')


def test_denormalize_inverts_the_input_normalisation():
  rgb = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3))
  normalised = (rgb - np.array(device.MEAN_RGB)) / np.array(
      device.STDDEV_RGB)
  np.testing.assert_allclose(visualize.denormalize(normalised), rgb / 255.,
                             atol=1e-6)


@pytest.mark.slow
def test_command_writes_png(tiny_run, tmp_path):
  out = tmp_path / 'vis.png'
  run = subprocess.run(
      [sys.executable, 'visualize.py', f'--config.init.path={tiny_run}',
       f'--output={out}', '--config.num_images=2'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f'wrote {out} (step 3, demo val crops: ' in run.stdout
  # 5 x 2 panels of 2 in plus 0.85 + 0.8 in of title and legend, at 100 dpi.
  assert Image.open(out).size == (1000, 565)
  with pytest.raises(UserError, match='holds no checkpoint'):
    visualize.visualize_checkpoint(str(tmp_path), str(tmp_path / 'x.png'),
                                   data_cfg=None, num_images=1)
