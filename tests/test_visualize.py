"""Tests of the pictures (droppos_jax/visualize.py, visualize.py)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from droppos_jax import checkpoint
from droppos_jax.data import device
from droppos_jax.errors import UserError
from droppos_jax import pictures as visualize
from droppos_jax.models import droppos as droppos_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_render_writes_png_of_expected_size(tmp_path):
  rng = np.random.default_rng(0)
  ids_keep = np.stack([rng.permutation(16)[:4] for _ in range(3)])
  drop_mask = np.array([[False, True, True, True]] * 3)
  predicted = ids_keep.copy()
  predicted[:, 1] = (predicted[:, 1] + 1) % 16  # one error per image
  path = visualize.render(rng.uniform(size=(3, 32, 32, 3)), ids_keep, drop_mask,
                          predicted, rng.dirichlet(np.ones(16), 3),
                          patch_size=8, path=str(tmp_path / 'grid.png'),
                          panel_inches=1.5, dpi=80, title='test')
  image = Image.open(path)
  assert image.size == (5 * 120, 3 * 120)
  assert np.asarray(image).std() > 10


def test_denormalize_inverts_the_input_normalisation():
  rgb = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3))
  normalised = (rgb - np.array(device.MEAN_RGB)) / np.array(
      device.STDDEV_RGB)
  np.testing.assert_allclose(visualize.denormalize(normalised), rgb / 255.,
                             atol=1e-6)


def test_command_writes_png(tmp_path):
  model = droppos_model.droppos_from_config('mu/8', 'tiny')
  params = jax.jit(model.init)(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 1), jnp.int32),
      jnp.ones((1, 1), bool))
  ckpts = checkpoint.Checkpoints(str(tmp_path / 'run' / 'checkpoints'),
                                 max_to_keep=1, save_every=1, last_step=3,
                                 async_save=False)
  ckpts.save(3, {'step': jnp.int32(3), 'params': params['params']}, {
      'step': 3, 'image_hw': [32, 32], 'model': dict(
          variant='mu/8', projector='tiny', projector_width=None,
          projector_depth=None, projector_heads=None, dtype='float32',
          remat=False)})
  ckpts.close()
  out = tmp_path / 'vis.png'
  run = subprocess.run(
      [sys.executable, 'visualize.py', f'--config.init.path={tmp_path / "run"}',
       f'--output={out}', '--config.num_images=2'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'wrote' in run.stdout
  assert Image.open(out).size == (1000, 400)  # 5 x 2 panels of 2 in at 100 dpi
  with pytest.raises(UserError, match='holds no checkpoint'):
    visualize.visualize_checkpoint(str(tmp_path), str(tmp_path / 'x.png'),
                                   data_cfg=None, num_images=1)
