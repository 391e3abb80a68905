"""The one weight reader (models/weights.py): every source format x every
kind x every consumer, damaged checkpoints, and bad inputs."""
import gc
import json
import logging
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest

from droppos_jax import checkpoint, classification, export, pictures
from droppos_jax.errors import UserError
from droppos_jax.evaluators import position_probe
from droppos_jax.models import architecture, classifier, convert, droppos, vit
from droppos_jax.models import weights
from checkpoint_files import data_files
import param_checks

ROOT = pathlib.Path(__file__).resolve().parents[1]
HW = (32, 32)          # mu/8: grid 4 x 4
NUM_CLASSES = 5
RUN_KINDS = ('droppos', 'classifier', 'linear_probe')   # what runs save
FILE_FORMATS = ('.safetensors', '.pth', '.npz')
FORMATS = ('workdir', 'step') + FILE_FORMATS
MODEL_CONFIGS = {
    'droppos': dict(variant='mu/8', projector='tiny', projector_width=None,
                    projector_depth=None, projector_heads=None,
                    dtype='float32', remat=False),
    'classifier': dict(variant='mu/8', drop_path_rate=0.1, dtype='float32',
                       remat=False),
    'linear_probe': dict(variant='mu/8', feature='cls', dtype='float32'),
}


# ----------------------------------------------------------------- sources ---

def _randomised(tree, seed):
  """Random values everywhere (LayerNorm scales included), so that no
  mapping mistake hides behind ones and zeros; variances stay positive."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (np.abs(rng.normal(size=x.shape)) + 0.5 if 'var' in
                       jax.tree_util.keystr(path) else
                       rng.normal(size=x.shape)).astype(np.float32), tree)


def make_variables(kind, seed=0):
  """(params, batch_stats or None) of a mu/8 model of `kind`."""
  images = jnp.zeros((1, *HW, 3))
  if kind == 'droppos':
    model = droppos.droppos_from_config('mu/8', 'tiny')
    args = (images, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool))
  elif kind == 'classifier':
    model, args = classifier.classifier_from_variant('mu/8', NUM_CLASSES), (images,)
  elif kind == 'linear_probe':
    model, args = classifier.linear_probe_from_variant('mu/8', NUM_CLASSES), (images,)
  else:
    model, args = vit.vit_from_variant('mu/8'), (images,)
  variables = _randomised(jax.eval_shape(model.init, jax.random.key(0), *args),
                          seed)
  return variables['params'], variables.get('batch_stats')


def save_run(workdir, kind, steps=(2, 4)):
  """A run's workdir as the trainers write it; step s holds seed s."""
  ckpts = checkpoint.Checkpoints(pathlib.Path(workdir) / 'checkpoints',
                                 max_to_keep=5, save_every=1, last_step=100,
                                 async_save=False)
  for step in steps:
    params, batch_stats = make_variables(kind, seed=step)
    state = {'step': jnp.int32(step), 'params': params,
             'opt_state': {'mu': params}}
    meta = {'step': step, 'data_step': step, 'model': MODEL_CONFIGS[kind],
            'image_hw': list(HW), 'seed': 0}
    if kind != 'droppos':
      state['batch_stats'] = batch_stats
      meta.update(protocol='finetune' if kind == 'classifier' else kind,
                  num_classes=NUM_CLASSES)
      if batch_stats is None:
        del state['batch_stats']
    ckpts.save(step, state, meta)
  ckpts.close()
  (pathlib.Path(workdir) / 'config.json').write_text(json.dumps(
      {'objective': {'mask_ratio': 0.5, 'pos_drop_ratio': 0.5, 'tau': 0.2}}))


def reference_state(kind, seed=4):
  """The reference (PyTorch-named) state dict of make_variables(kind)."""
  params, batch_stats = make_variables(kind, seed)
  tree = dict(params, **(batch_stats or {}))
  return convert.flax_to_torch(tree, kind=kind, grid_hw=(4, 4))


def write_foreign(state, path):
  """A file as other code writes it: no metadata of ours."""
  path = pathlib.Path(path)
  if path.suffix == '.safetensors':
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
  elif path.suffix == '.npz':
    np.savez(path, **state)
  else:
    import torch
    torch.save({'model': {f'module.{k}': torch.tensor(v)
                          for k, v in state.items()}, 'epoch': 3}, path)


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  """kind -> format -> path; step 4 (the newest) holds make_variables(seed 4)."""
  root = tmp_path_factory.mktemp('sources')
  out = {}
  for kind in RUN_KINDS:
    save_run(root / kind, kind)
    out[kind] = {'workdir': str(root / kind),
                 'step': str(root / kind / 'checkpoints' / '4')}
  out['encoder'] = {}
  for kind in RUN_KINDS + ('encoder',):
    for suffix in FILE_FORMATS:
      if suffix == '.pth' and not _has_torch():
        continue
      path = root / f'{kind}{suffix}'
      write_foreign(reference_state(kind), path)
      out[kind][suffix] = str(path)
  return out


def _has_torch():
  try:
    import torch  # pylint: disable=unused-import
    return True
  except ImportError:
    return False


def source(sources, kind, fmt):
  if fmt == '.pth':
    pytest.importorskip('torch')
  return sources[kind][fmt]


CASES = [(k, f) for k in RUN_KINDS for f in FORMATS] + [
    ('encoder', f) for f in FILE_FORMATS]


def assert_trees_equal(a, b):
  fa, fb = convert._flatten(a), convert._flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg='/'.join(k))


# ------------------------------------------------------------------ reader ---

@pytest.mark.parametrize('kind, fmt', CASES)
def test_reader_reads_every_format_of_every_kind(sources, kind, fmt):
  w = weights.read(source(sources, kind, fmt))
  params, batch_stats = make_variables(kind, seed=4)
  assert w.kind == kind
  assert_trees_equal(w.params, params)
  assert (w.batch_stats is None) == (batch_stats is None)
  if batch_stats is not None:
    assert_trees_equal(w.batch_stats, batch_stats)
  assert w.image_hw == HW and w.grid == (4, 4) and w.pos_embed == 'sincos'
  a = w.arch
  assert (a.width, a.depth, a.mlp_dim, a.num_heads, a.patch_size) == (
      32, 2, 128, 2, 8) and a.variant == 'mu/8'
  if kind == 'droppos':
    assert a.projector == architecture.ProjectorSize(64, 1, 4, 16)
    np.testing.assert_array_equal(w.mask_pos_token, params['mask_pos_token'])
  else:
    assert a.projector is None and w.mask_pos_token is None
  assert a.num_classes == (None if kind in ('droppos', 'encoder') else NUM_CLASSES)
  if fmt in ('workdir', 'step'):
    assert w.step == 4 and w.workdir == pathlib.Path(sources[kind]['workdir'])
    assert w.meta['image_hw'] == list(HW) and not w.dropped
  else:
    assert w.step is None and w.workdir is None
    assert w.meta == {} and not w.dropped   # foreign files carry none of ours


def test_reader_reports_unused_tensors_and_learned_pe(sources, tmp_path):
  state = reference_state('droppos')
  state['decoder_pos_embed'] = np.zeros((1, 17, 64), np.float32)  # MAE's
  state['pos_embed'] = np.random.default_rng(0).normal(
      size=state['pos_embed'].shape).astype(np.float32)
  np.savez(tmp_path / 'x.npz', **state)
  w = weights.read(tmp_path / 'x.npz')
  assert w.pos_embed == 'learned' and w.image_hw == HW   # square: 4 x 4
  assert any('LEARNED' in d for d in w.dropped)
  assert any('decoder_pos_embed' in d for d in w.dropped)
  with pytest.raises(UserError, match='LEARNED pos_embed'):
    w.check_fixed_pe()


def test_containers_prefixes_and_dtypes(tmp_path):
  torch = pytest.importorskip('torch')
  import argparse
  state = reference_state('encoder')
  tensors = {k: torch.tensor(v) for k, v in state.items()}
  ddp = {f'module.{k}': v for k, v in tensors.items()}
  cases = {
      'model.pth': {'model': ddp, 'epoch': 3, 'args': argparse.Namespace(lr=1.)},
      'sd.pth': {'state_dict': tensors},
      'module.bin': {'module': tensors},
  }
  for name, obj in cases.items():
    torch.save(obj, tmp_path / name)
    assert_trees_equal(weights.read(tmp_path / name).params,
                       make_variables('encoder', 4)[0])
  torch.save({k: v.bfloat16() for k, v in tensors.items()}, tmp_path / 'bf16.pth')
  w = weights.read(tmp_path / 'bf16.pth')
  assert w.params['cls_token'].dtype == np.float32
  assert w.pos_embed == 'sincos'                      # bf16 tolerance
  assert any('bfloat16' in n for n in w.notes)
  np.testing.assert_array_equal(
      w.params['cls_token'],
      state['cls_token'].astype(ml_dtypes.bfloat16).astype(np.float32))
  # The format is read from the bytes, not the suffix.
  shutil.copy(tmp_path / 'sd.pth', tmp_path / 'renamed.npz')
  assert weights.read(tmp_path / 'renamed.npz').kind == 'encoder'


# --------------------------------------------------------------- consumers ---

CONSUMERS = ('finetune', 'linear_probe', 'position_probe', 'pictures', 'export')


def _init_config(path):
  return ml_collections.ConfigDict(dict(path=path))


def _abstract(protocol):
  model = (classifier.classifier_from_variant('mu/8', NUM_CLASSES)
           if protocol == 'finetune' else
           classifier.linear_probe_from_variant('mu/8', NUM_CLASSES))
  return jax.eval_shape(model.init, jax.random.key(0),
                        jnp.zeros((1, *HW, 3)))['params']


def expected_encoder(kind, final_norm):
  """The encoder each consumer must get, computed from the saved tree."""
  params = make_variables(kind, seed=4)[0]
  encoder = dict(params if kind == 'encoder' else params['encoder'])
  if final_norm and 'norm' not in encoder:
    encoder['norm'] = params['fc_norm']
  if not final_norm:
    encoder.pop('norm', None)
  return encoder


@pytest.mark.parametrize('consumer', CONSUMERS)
@pytest.mark.parametrize('kind, fmt', CASES)
def test_every_consumer_takes_every_source(sources, kind, fmt, consumer,
                                           tmp_path):
  path = source(sources, kind, fmt)
  params = make_variables(kind, seed=4)[0]
  if consumer in ('finetune', 'linear_probe'):
    loaded = classification.load_init(_init_config(path), consumer,
                                      _abstract(consumer), HW, 8)
    assert_trees_equal(loaded['encoder'],
                       expected_encoder(kind, consumer == 'linear_probe'))
    with_head = kind == 'classifier' and consumer == 'finetune'
    assert set(loaded) == ({'encoder', 'fc_norm', 'head'} if with_head
                           else {'encoder'})
    if with_head:
      assert_trees_equal(loaded['head'], params['head'])
  elif consumer == 'position_probe':
    frozen = position_probe.load_encoder(path)
    assert_trees_equal(jax.device_get(frozen.params),
                       expected_encoder(kind, final_norm=True))
    assert frozen.image_hw == HW and frozen.encoder.num_heads == 2
    if kind == 'droppos':
      np.testing.assert_array_equal(frozen.mask_pos_token,
                                    params['mask_pos_token'])
    else:
      assert frozen.mask_pos_token is None
  elif consumer == 'pictures':
    if kind != 'droppos':
      with pytest.raises(UserError, match='has no DropPos projector'):
        pictures.load_droppos(path)
      return
    model, w, objective = pictures.load_droppos(path)
    assert_trees_equal(w.params, params)
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, *HW, 3)),
        jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool))['params']
    param_checks.check_compatible(w.params, shapes)
    # A run's own objective; files fall back to the paper's.
    assert objective['tau'] == (0.2 if fmt in ('workdir', 'step') else 0.1)
  else:
    out = tmp_path / 'exported.npz'
    export.export(path, str(out))
    back = weights.read(out)
    assert back.kind == kind and back.image_hw == HW
    assert_trees_equal(back.params, params)


# ------------------------------------------------------ damaged checkpoints ---

# Which data files hold the parameters (the rest: optimizer state, which
# weights.read does not need) depends on the writers' timing, so each damage
# to data files hits them all.
DAMAGES = {
    'truncated data files': lambda s: [p.write_bytes(p.read_bytes()[:100])
                                       for p in data_files(s)],
    'zeroed data files': lambda s: [p.write_bytes(bytes(p.stat().st_size))
                                    for p in data_files(s)],
    'deleted data files': lambda s: [p.unlink() for p in data_files(s)],
    'damaged _METADATA': lambda s: (s / 'state' / '_METADATA').write_text('{"tr'),
    'damaged manifest': lambda s: (s / 'state' / 'manifest.ocdbt').write_bytes(
        b'garbage'),
    'deleted meta/': lambda s: shutil.rmtree(s / 'meta'),
    'meta without image_hw': lambda s: (s / 'meta' / 'metadata').write_text(
        json.dumps({'step': 4, 'model': MODEL_CONFIGS['droppos']})),
}


@pytest.fixture
def two_step_run(sources, tmp_path):
  run = tmp_path / 'run'
  shutil.copytree(sources['droppos']['workdir'], run)
  return run


@pytest.mark.parametrize('damage', DAMAGES)
def test_unreadable_latest_step_falls_back_to_the_previous(two_step_run, damage,
                                                          caplog):
  DAMAGES[damage](two_step_run / 'checkpoints' / '4')
  with caplog.at_level(logging.WARNING):
    w = weights.read(two_step_run)
  assert w.step == 2
  assert_trees_equal(w.params, make_variables('droppos', seed=2)[0])
  warning = [r.getMessage() for r in caplog.records
             if 'is unreadable' in r.getMessage()]
  assert len(warning) == 1, caplog.text
  assert warning[0].startswith(
      f'checkpoint step 4 in {two_step_run / "checkpoints"} is unreadable (')
  assert warning[0].endswith('); trying step 2.')
  assert 'another model' not in caplog.text
  # The same damage in the step folder named directly: an error, no fallback.
  with pytest.raises(UserError, match=r'checkpoints/4 is unreadable \('):
    weights.read(two_step_run / 'checkpoints' / '4')
  gc.collect()  # the abandoned reads, while their warning is filtered


def test_no_readable_step_names_each_reason(two_step_run):
  for step in ('2', '4'):
    shutil.rmtree(two_step_run / 'checkpoints' / step / 'meta')
  with pytest.raises(UserError) as err:
    weights.read(two_step_run)
  message = str(err.value)
  assert message.startswith(
      f'No readable checkpoint in {two_step_run / "checkpoints"}: step 4: '
      'FileNotFoundError')
  assert '; step 2: FileNotFoundError' in message and '\n' not in message


def test_unfinished_step_folders_are_never_read(two_step_run, caplog):
  # A save killed mid-write that lost its tmp suffix (e.g. a copy): no marker.
  shutil.copytree(two_step_run / 'checkpoints' / '4',
                  two_step_run / 'checkpoints' / '6')
  (two_step_run / 'checkpoints' / '6' / checkpoint.COMMIT_MARKER).unlink()
  (two_step_run / 'checkpoints' / '8' / 'state').mkdir(parents=True)
  with caplog.at_level(logging.WARNING):
    assert weights.read(two_step_run).step == 4
  assert 'Ignoring step folder(s) 8, 6' in caplog.text
  assert checkpoint.complete_steps(two_step_run / 'checkpoints') == [4, 2]
  with pytest.raises(UserError, match='save never finished'):
    weights.read(two_step_run / 'checkpoints' / '6')
  for step in ('2', '4'):
    shutil.rmtree(two_step_run / 'checkpoints' / step)
  with pytest.raises(UserError, match=r'holds no checkpoint \(only step '
                     r'folders whose save never finished: 8, 6\)'):
    weights.read(two_step_run)


def test_newest_readable_stops_at_a_user_error():
  calls = []

  def restore(step):
    calls.append(step)
    if step == 3:
      raise OSError('disk gone')
    raise UserError('another model')

  with pytest.raises(UserError, match='another model'):
    checkpoint.newest_readable([3, 2, 1], restore, where='x')
  assert calls == [3, 2]
  with pytest.raises(UserError, match='No complete checkpoint in x'):
    checkpoint.newest_readable([], restore, where='x')


# --------------------------------------------------------------- bad input ---

def test_bad_paths_and_files_give_one_line_errors(sources, tmp_path):
  accepted = r'accepted: a pre-training or fine-tuning workdir'
  (tmp_path / 'empty').mkdir()
  cases = [
      (tmp_path / 'empty', 'holds no checkpoint: expected a pre-training'),
      (tmp_path / 'missing', "'.*missing' does not exist: expected"),
      ('', "'' does not exist"),
  ]
  for name, content in [('notes.txt', 'hello'), ('junk.pth', 'not a checkpoint'),
                        ('junk.safetensors', 'x' * 40), ('empty.npz', '')]:
    (tmp_path / name).write_text(content)
    cases.append((tmp_path / name, rf'{name} is not a weights file \(it .*\); '
                  + accepted))
  np.savez(tmp_path / 'other.npz', weights=np.zeros(3))
  cases.append((tmp_path / 'other.npz', 'Not a ViT checkpoint'))
  for path, message in cases:
    with pytest.raises(UserError, match=message) as err:
      weights.read(path)
    assert '\n' not in str(err.value) and 'needs PyTorch' not in str(err.value)


def test_torch_files_need_torch_only_when_they_are_torch_files(
    sources, monkeypatch, tmp_path):
  pth = source(sources, 'encoder', '.pth')
  torch = pytest.importorskip('torch')
  torch.save([1, 2, 3], tmp_path / 'list.pth')
  with pytest.raises(UserError, match='list.pth is not a checkpoint'):
    weights.read(tmp_path / 'list.pth')
  monkeypatch.setitem(sys.modules, 'torch', None)   # import torch fails
  with pytest.raises(UserError, match=r'encoder.pth is a PyTorch file: '
                     r'reading it needs PyTorch \(`pip install torch`\)'):
    weights.read(pth)
  assert weights.read(sources['encoder']['.npz']).kind == 'encoder'


def test_pictures_refuse_a_fine_tuning_workdir_by_name(sources):
  with pytest.raises(UserError, match=(
      r'fine-tuned classifier mu/8 \(.*classifier step 4\) has no DropPos '
      r'projector .* pass a DropPos pre-training workdir')):
    pictures.load_droppos(sources['classifier']['workdir'])


def test_every_consumer_refuses_a_learned_pos_embed(tmp_path):
  state = reference_state('droppos')
  state['pos_embed'] = state['pos_embed'] + 0.5
  np.savez(tmp_path / 'learned.npz', **state)
  path = str(tmp_path / 'learned.npz')
  calls = [
      lambda: classification.load_init(_init_config(path), 'finetune',
                                       _abstract('finetune'), HW, 8),
      lambda: position_probe.load_encoder(path),
      lambda: pictures.load_droppos(path),
      lambda: export.export(path, str(tmp_path / 'out.npz')),
  ]
  for call in calls:
    with pytest.raises(UserError, match='has a LEARNED pos_embed'):
      call()
  assert not (tmp_path / 'out.npz').exists()


def test_finetune_init_names_a_model_mismatch(sources):
  path = sources['droppos']['workdir']
  abstract = jax.eval_shape(
      classifier.classifier_from_variant('nano/8', NUM_CLASSES).init,
      jax.random.key(0), jnp.zeros((1, *HW, 3)))['params']
  with pytest.raises(UserError, match=r'DropPos pre-training checkpoint mu/8 '
                     r'.* does not fit this model .*: 51 tensors differ, e.g. '
                     r'missing blocks_2/attn/proj/bias \[64\]; ') as err:
    classification.load_init(_init_config(path), 'finetune', abstract, HW, 8)
  assert '\n' not in str(err.value)
  with pytest.raises(UserError, match='has patch size 8, the model 16'):
    classification.load_init(_init_config(path), 'finetune', abstract, HW, 16)


def test_library_import_does_not_import_torch():
  code = ('import sys, droppos_jax.models.weights, droppos_jax.export; '
          'assert "torch" not in sys.modules')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT)


def test_remote_workdir_reads_and_exports_through_epath(tmp_path, monkeypatch):
  """A run on a non-local scheme (the offline fake:// store of fakefs.py
  stands in for gs://): read, exported there in every format, read back."""
  fakefs = pytest.importorskip('fakefs')
  root = tmp_path / 'store'
  root.mkdir()
  monkeypatch.chdir(tmp_path)   # a stray os.path/open would write ./fake:/...
  with fakefs.fake_filesystem(str(root), monkeypatch):
    save_run(root / 'bucket' / 'run', 'droppos')
    w = weights.read('fake://bucket/run')
    assert w.step == 4 and str(w.workdir) == 'fake://bucket/run'
    assert_trees_equal(w.params, make_variables('droppos', 4)[0])
    assert pictures.load_droppos('fake://bucket/run')[2]['tau'] == 0.2
    for suffix in FILE_FORMATS:
      if suffix == '.pth' and not _has_torch():
        continue
      export.export('fake://bucket/run', f'fake://bucket/out/w{suffix}')
      assert (root / 'bucket' / 'out' / f'w{suffix}').is_file()
      assert_trees_equal(weights.read(f'fake://bucket/out/w{suffix}').params,
                         w.params)
  assert not (tmp_path / 'fake:').exists(), 'a user path bypassed epath'
