"""Components chosen by name in the config: the second masking strategy and
the second position head run through every command, from the command line."""
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from droppos_jax import masking, train
from droppos_jax.configs import demo as demo_config
from droppos_jax.models import architecture, convert, droppos, weights
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
    tmp_path, monkeypatch):
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
  # The run's own checkpoints carry their architecture: no shape inference.
  def inferred(*args, **kwargs):
    raise AssertionError('the architecture of our checkpoint was inferred')
  monkeypatch.setattr(convert, 'flax_config', inferred)
  w = weights.read(str(tmp_path / 'run'))
  assert w.meta['architecture'] == w.arch.to_dict()
  assert w.arch.projector == architecture.ProjectorSize(None, 0, None, 16,
                                                        'linear')
  for path in (tmp_path / 'run', out):
    w = weights.read(str(path))
    assert (w.kind, w.arch.projector.head) == ('droppos', 'linear')
    assert isinstance(w.droppos().projector, droppos.LinearHead)


def readme_example() -> str:
  """The ```python block of the README's 'Adding a component' section."""
  text = (pathlib.Path(REPO) / 'README.md').read_text()
  section = text.split('## Adding a component', 1)[1].split('\n## ', 1)[0]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_component_example_registers_and_trains(tmp_path,
                                                           monkeypatch):
  monkeypatch.setattr(masking, 'MASKINGS', dict(masking.MASKINGS))
  exec(readme_example(), {})  # pylint: disable=exec-used
  assert 'outer' in masking.MASKINGS
  spec = masking.Masking('outer', 0.75, 0.5)
  ids, drop = map(np.asarray, spec.sample(jax.random.key(0), 8, (4, 4)))
  # The 4 visible patches of a 4x4 grid farthest from its centre: the corners.
  assert all(sorted(row) == [0, 3, 12, 15] for row in ids.tolist())
  assert len({tuple(r) for r in ids.tolist()}) > 1  # in a random order
  assert (drop.sum(1) == 2).all()
  config = demo_config.get_config()
  config.masking.strategy, config.masking.mask_ratio = 'outer', 0.75
  config.num_train_steps, config.warmup_epochs, config.log_every = 3, 0, 1
  config.eval.enabled = False
  out = train.train(config, str(tmp_path))
  assert out['complete'] and all(np.isfinite(list(out['losses'].values())))
