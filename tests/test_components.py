"""Components chosen by name in the config: the second masking strategy and
the second position head run through every command, from the command line."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from droppos_jax.models import convert, droppos, weights
import param_checks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_linear_head_gives_position_logits_and_converts_both_ways():
  model = droppos.droppos_from_config('mu/8', head='linear')
  images = jax.random.normal(jax.random.key(0), (2, 16, 32, 3))  # 2x4 grid
  ids = jnp.tile(jnp.arange(3, dtype=jnp.int32), (2, 1))
  drop = jnp.ones((2, 3), bool)
  params = model.init(jax.random.key(1), images, ids, drop)['params']
  assert set(params['projector']) == {'pred'}
  logits = model.apply({'params': params}, images, ids, drop)['logits']
  assert logits.shape == (2, 3, 8)
  # The head is one matmul on the encoder's final-LN tokens.
  enc = model.apply({'params': params}, images, ids, drop)['encoder']['tokens']
  pred = params['projector']['pred']
  np.testing.assert_allclose(
      logits, np.asarray(enc[:, 1:]) @ pred['kernel'] + pred['bias'], atol=1e-5)
  state = convert.flax_to_torch(params, kind='droppos', grid_hw=(2, 4))
  assert sorted(k for k in state if k.startswith('decoder')) == [
      'decoder_pred.bias', 'decoder_pred.weight']
  back, report = convert.torch_to_flax(state, kind='droppos')
  assert report.ok and not report.unused
  assert report.config['projector']['head'] == 'linear'
  jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(params))
  param_checks.check_compatible(back, param_checks.abstract_params(
      'droppos', report.config))


@pytest.mark.slow
def test_demo_with_block_masking_and_linear_head_from_the_command_line(
    tmp_path):
  """No code change: the demo config, block masking and the linear head
  chosen by --config, trains and evaluates; the run exports and reads back
  with its head."""
  run = subprocess.run(
      [sys.executable, 'train.py', '--config', 'configs/demo.py',
       '--workdir', str(tmp_path / 'run'), '--config.num_train_steps=4',
       '--config.warmup_epochs=0',
       '--config.log_every=2', '--config.eval.every_steps=2',
       '--config.masking.strategy=block', '--config.masking.mask_ratio=0.5',
       '--config.model.head=linear'],
      cwd=REPO, capture_output=True, text=True, timeout=400)
  assert run.returncode == 0, run.stderr[-3000:]
  assert '[4/4] eval' in run.stderr + run.stdout
  out = tmp_path / 'demo.safetensors'
  export = subprocess.run(
      [sys.executable, 'export.py', f'--config.init.path={tmp_path / "run"}',
       f'--output={out}'], cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert export.returncode == 0, export.stderr[-3000:]
  assert {k for k in load_file(str(out)) if k.startswith('decoder')} == {
      'decoder_pred.weight', 'decoder_pred.bias'}
  for path in (tmp_path / 'run', out):
    w = weights.read(str(path))
    assert (w.kind, w.arch.projector.head) == ('droppos', 'linear')
    assert isinstance(w.droppos().projector, droppos.LinearHead)
