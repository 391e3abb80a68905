"""The export command (droppos_jax/export.py, export.py): runs and weights
files -> .safetensors/.pth/.npz in the authors'/timm naming, and back."""
import argparse
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from droppos_jax import export
from droppos_jax.configs import export as export_config
from droppos_jax.errors import UserError
from droppos_jax.models import classifier, convert, droppos, weights
from test_weights import (HW, NUM_CLASSES, RUN_KINDS, assert_trees_equal,
                          make_variables, save_run)

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  for kind in RUN_KINDS:
    save_run(root / kind, kind)
  return {kind: str(root / kind) for kind in RUN_KINDS}


def run_export(source, output, **fields):
  """The export command in-process: `python export.py
  --config.init.path=<source> --output=<output> [--config.<field>=...]`."""
  config = export_config.get_config()
  config.init.path = source
  config.update(fields)
  return export.run(config, str(output))


@pytest.fixture(scope='module')
def tr():
  pytest.importorskip('torch')
  import torch_reference
  return torch_reference


@pytest.mark.parametrize('suffix', ['.safetensors', '.npz', '.pth'])
@pytest.mark.parametrize('kind', RUN_KINDS)
def test_run_export_reads_back_identical(runs, kind, suffix, tmp_path, capsys):
  if suffix == '.pth':
    pytest.importorskip('torch')
  out = tmp_path / f'exported{suffix}'
  run_export(runs[kind], out)
  assert f'({kind}) to {out}' in capsys.readouterr().out
  run, back = weights.read(runs[kind]), weights.read(out)
  assert (back.kind, back.arch, back.image_hw, back.step) == (
      kind, run.arch, run.image_hw, 4)
  assert back.arch.num_heads == 2   # from the metadata, not the size table
  assert_trees_equal(back.params, run.params)
  if kind == 'linear_probe':
    assert_trees_equal(back.batch_stats, run.batch_stats)
  # Exporting the export again changes nothing: the way back is exact.
  again = tmp_path / f'again{suffix}'
  run_export(str(out), again)
  assert_trees_equal(weights.read(again).params, run.params)


def test_safetensors_header_names_kind_architecture_and_image_size(runs,
                                                                    tmp_path):
  from safetensors import safe_open
  out = tmp_path / 'droppos.safetensors'
  export.export(runs['droppos'], str(out))
  with safe_open(str(out), 'np') as f:
    meta = f.metadata()
  assert meta['kind'] == 'droppos' and meta['format'] == 'pt'
  assert json.loads(meta['image_hw']) == [32, 32]
  assert json.loads(meta['architecture']) == dict(
      width=32, depth=2, mlp_dim=128, num_heads=2, patch_size=8, in_chans=3,
      projector=dict(width=64, depth=1, num_heads=4, num_positions=16,
                     head='transformer'),
      num_classes=None, decoder=None)
  assert meta['source'].endswith('droppos step 4') and meta['step'] == '4'


def _torch_model(tr, kind):
  import torch
  if kind == 'droppos':
    return tr.DropPos(HW, 8, 32, 2, 2, decoder_dim=64, decoder_depth=1,
                      decoder_heads=4)
  if kind == 'classifier':
    return tr.VisionTransformer(HW, 8, 32, 2, 2, num_classes=NUM_CLASSES,
                                global_pool=True)
  model = tr.VisionTransformer(HW, 8, 32, 2, 2, num_classes=NUM_CLASSES)
  model.head = torch.nn.Sequential(
      torch.nn.BatchNorm1d(32, affine=False, eps=1e-6), model.head)
  return model


@pytest.mark.parametrize('kind', RUN_KINDS)
def test_export_loads_into_the_torch_reference_and_computes_the_same(
    tr, runs, kind, tmp_path):
  import torch
  out = tmp_path / 'exported.pth'
  export.export(runs[kind], str(out))
  state = torch.load(out, weights_only=True)['model']
  model = _torch_model(tr, kind)
  model.load_state_dict(state, strict=True)   # every key, every shape
  model.eval()
  w = weights.read(runs[kind])
  images = np.random.default_rng(0).normal(size=(2, *HW, 3)).astype(np.float32)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    if kind == 'droppos':   # the encoder a timm model would use
      theirs = model.forward_features(x).numpy()
      ours = w.vit().apply({'params': w.params['encoder']}, images)['tokens']
    elif kind == 'classifier':
      theirs = model(x).numpy()
      ours = classifier.ViTClassifier(w.vit(final_norm=False, pool='gap'),
                                      NUM_CLASSES).apply(
          {'params': w.params}, images)
    else:
      theirs = model.head(model.forward_features(x)[:, 0]).numpy()
      ours = classifier.LinearProbe(w.vit(), NUM_CLASSES).apply(
          {'params': w.params, 'batch_stats': w.batch_stats}, images)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_authors_file_converts_to_safetensors_and_back_exactly(tr, tmp_path):
  """The import direction: an authors'-style DropPos .pth (DDP prefixes,
  pickled args) -> torch-free .safetensors -> .pth with the same tensors."""
  import torch
  model = tr.DropPos(HW, 8, 32, 2, 2, decoder_dim=64, decoder_depth=1,
                     decoder_heads=4)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  torch.save({'model': {f'module.{k}': torch.from_numpy(v)
                        for k, v in state.items()},
              'epoch': 99, 'args': argparse.Namespace(model='mu')},
             tmp_path / 'DropPos_pretrain.pth')
  out = tmp_path / 'droppos.safetensors'
  run_export(str(tmp_path / 'DropPos_pretrain.pth'), out)
  expected, _ = convert.torch_to_flax(state, kind='droppos')
  w = weights.read(out)
  assert w.kind == 'droppos' and w.image_hw == HW
  assert_trees_equal(w.params, expected)
  run_export(str(out), tmp_path / 'back.pth')
  back = torch.load(tmp_path / 'back.pth', weights_only=True)['model']
  assert back.keys() == state.keys()
  for k in state:
    np.testing.assert_array_equal(back[k].numpy(), state[k], err_msg=k)


def test_image_size_sets_the_exported_pos_embed(runs, tmp_path):
  out = tmp_path / 'clf.npz'
  export.export(runs['classifier'], str(out), image_hw=(48, 32))
  with np.load(out) as npz:
    assert npz['pos_embed'].shape == (1, 1 + 6 * 4, 32)
  assert weights.read(out).image_hw == (48, 32)


def test_bad_input_gives_one_line_errors(runs, tmp_path, monkeypatch):
  (tmp_path / 'empty').mkdir()
  cases = [
      ((str(tmp_path / 'empty'), tmp_path / 'x.npz'), {},
       'holds no checkpoint: expected a pre-training or fine-tuning workdir'),
      ((runs['droppos'], tmp_path / 'x.bin'), {}, re.escape(
          "Unknown output format 'x.bin': the name must end in .safetensors, "
          '.pth, .pt, .npz.')),
      ((runs['droppos'], tmp_path / 'x.npz'), {'image_size': 48},
       r'grid_hw \(6, 6\) has 36 positions but the projector predicts 16'),
      (('', tmp_path / 'x.npz'), {}, r'--config.init.path is required'),
  ]
  for args, fields, message in cases:
    with pytest.raises(UserError, match=message):
      run_export(*args, **fields)
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(UserError, match=re.escape(
      'Writing x.pth needs PyTorch (`pip install torch`); write .safetensors '
      'or .npz instead.')):
    run_export(runs['droppos'], tmp_path / 'x.pth')
  assert not list(tmp_path.glob('x.*'))


@pytest.mark.slow
def test_documented_command(runs, tmp_path):
  out = tmp_path / 'demo.safetensors'
  run = subprocess.run([sys.executable, 'export.py',
                        f'--config.init.path={runs["droppos"]}',
                        f'--output={out}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f'wrote 49 tensors (droppos) to {out}' in run.stdout
  assert weights.read(out).step == 4
  bad = subprocess.run([sys.executable, 'export.py',
                        f'--config.init.path={runs["droppos"]}',
                        f'--output={tmp_path / "x.bin"}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and 'Traceback' not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith(
      "error: Unknown output format 'x.bin'")
