"""The position-awareness analysis command (position_awareness.py): its
table, figure and JSON end to end at tiny sizes, given runs skipping their
stages, and bad encoder lists refused in one line before anything is
written."""
import copy
import json
import os

import jax
import numpy as np
import pytest

from droppos_jax import position_awareness, visualize
from droppos_jax.configs import position_awareness as awareness_config
from droppos_jax.configs import visualize as visualize_config
from droppos_jax.errors import UserError
from droppos_jax.models import convert, weights
import param_checks

_CFG = dict(width=64, depth=1, mlp_dim=256, num_heads=4, patch_size=8,
            grid=(4, 4), num_classes=7,
            decoder=dict(width=16, depth=1, num_heads=2))

TINY_PRETRAIN = '''
from droppos_jax.configs import demo, mae_demo

def get_config(arg=None):
  c = (mae_demo if arg == 'mae' else demo).get_config()
  c.model.variant = 'mu/8'
  c.num_train_steps, c.warmup_epochs, c.log_every = 3, 0, 1
  c.eval.enabled = False
  return c
'''
TINY_FINETUNE = '''
from droppos_jax.configs import finetune

def get_config(arg=None):
  c = finetune.get_config('demo')
  c.model.variant = 'mu/8'
  c.num_train_steps, c.warmup_epochs, c.log_every = 3, 0, 1
  return c
'''


def _weights_file(path, kind):
  """A random-valued weights file of `kind` in the reference naming."""
  shapes = param_checks.abstract_params(kind, _CFG)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                        shapes)
  np.savez(path, **convert.flax_to_torch(params, kind=kind, grid_hw=(4, 4)))
  return str(path)


def _config(**encoders):
  c = awareness_config.get_config()
  for name, fields in encoders.items():
    c.encoders[name].update(fields)
  return c


def test_bad_encoder_lists_are_refused_in_one_line_and_nothing_written(
    tmp_path):
  classifier = _weights_file(tmp_path / 'ft.npz', 'classifier')
  mae = _weights_file(tmp_path / 'mae.npz', 'mae')
  out = tmp_path / 'out'
  cases = [
      (dict(droppos=dict(pretrained=str(tmp_path / 'nope'))),
       rf"^encoders.droppos.pretrained '{tmp_path}/nope' does not exist"),
      (dict(droppos=dict(pretrained=classifier)),
       rf'^encoders.droppos.pretrained={classifier} is a fine-tuned '
       r'classifier; expected a DropPos pre-training checkpoint\.$'),
      (dict(droppos=dict(pretrained=mae)),
       rf'^encoders.droppos.pretrained={mae} is a MAE pre-training '
       r'checkpoint; expected a DropPos pre-training checkpoint\.$'),
      (dict(mae=dict(finetuned=mae)),
       rf'^encoders.mae.finetuned={mae} is a MAE pre-training checkpoint; '
       r'expected a fine-tuned classifier\.$'),
  ]
  for encoders, message in cases:
    with pytest.raises(UserError, match=message):
      position_awareness.analyse(_config(**encoders), str(out))
  c = _config()
  c.order = ('random', 'moco')
  with pytest.raises(UserError, match=r"^order=\('random', 'moco'\) must "
                     r'name encoders, at least one; defined: droppos, mae, '
                     r'random\.$'):
    position_awareness.analyse(c, str(out))
  assert not out.exists()


def test_an_mae_checkpoint_is_refused_by_the_droppos_only_command(tmp_path):
  mae = _weights_file(tmp_path / 'mae.npz', 'mae')
  assert weights.read(mae).kind == 'mae'
  c = visualize_config.get_config()
  c.init.path = mae
  with pytest.raises(UserError, match=rf'^init.path: MAE pre-training '
                     rf'checkpoint .*\({mae}\) has no DropPos projector'):
    visualize.visualize(c, str(tmp_path / 'v.png'))
  assert not (tmp_path / 'v.png').exists()


@pytest.mark.slow
def test_the_analysis_runs_end_to_end_and_given_runs_skip_their_stages(
    tmp_path, capsys):
  (tmp_path / 'tiny_pre.py').write_text(TINY_PRETRAIN)
  (tmp_path / 'tiny_ft.py').write_text(TINY_FINETUNE)
  c = _config(droppos=dict(pretrain_config=str(tmp_path / 'tiny_pre.py')),
              mae=dict(pretrain_config=f'{tmp_path / "tiny_pre.py"}:mae'))
  c.finetune_config = str(tmp_path / 'tiny_ft.py')
  c.order = ('random', 'mae')
  c.probe.model.variant = 'mu/8'
  c.probe.head.steps = 20
  c.probe.mask_draws = 1
  c.probe.train_data.num_images, c.probe.eval_data.num_images = 64, 32
  c.regions = {'val': 'held-out band'}
  results = position_awareness.analyse(c, str(tmp_path / 'a'))
  rows = [(r['encoder'], r['stage']) for r in results['rows']]
  assert rows == [('random init', 'as initialised'),
                  ('random init', 'fine-tuned'),
                  ('MAE', 'pre-trained'), ('MAE', 'fine-tuned')]
  assert weights.read(results['rows'][2]['path']).kind == 'mae'
  assert weights.read(results['rows'][3]['path']).kind == 'classifier'
  for r in results['rows']:
    band = r['held-out band']
    assert 0 <= band['acc'] <= 1 and band['chance'] == 1 / 16
  printed = capsys.readouterr().out
  assert '| MAE | fine-tuned |' in printed and 'Chance: 6.25 %' in printed
  saved = json.loads((tmp_path / 'a' / 'position_awareness.json').read_text())
  assert saved['results']['rows'] == json.loads(json.dumps(results['rows']))
  assert (tmp_path / 'a' / 'position_awareness.png').stat().st_size > 10_000

  # The same encoders given as runs: no stage runs again, same probes.
  given = copy.deepcopy(c)
  given.encoders.mae.update(pretrained=results['rows'][2]['path'],
                            finetuned=results['rows'][3]['path'])
  given.encoders.random.finetuned = results['rows'][1]['path']
  again = position_awareness.analyse(given, str(tmp_path / 'b'))
  assert sorted(os.listdir(tmp_path / 'b')) == [
      'position_awareness.json', 'position_awareness.png', 'probes']
  assert [r['held-out band']['acc'] for r in again['rows']] == [
      r['held-out band']['acc'] for r in results['rows']]
