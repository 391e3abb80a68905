"""Name mapping (models/convert.py): parity with a torch reference, round
trips, layout errors. Reading files: test_weights.py; writing: test_export.py."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from droppos_jax.errors import UserError
from droppos_jax.models import classifier, convert, droppos, vit
import param_checks

HW = (32, 48)  # non-square: grid 4 x 6
WIDTH, DEPTH, HEADS, PATCH = 32, 2, 2, 8


@pytest.fixture(scope='module')
def tr():
  pytest.importorskip('torch')
  import torch_reference
  return torch_reference


def _images(hw, seed=0):
  return np.random.default_rng(seed).normal(size=(2, *hw, 3)).astype(np.float32)


def _torch_run(model, *args):
  import torch
  tensors = [torch.from_numpy(np.asarray(a)) for a in args]
  tensors[0] = tensors[0].permute(0, 3, 1, 2)  # NHWC -> NCHW
  with torch.no_grad():
    return model(*tensors).numpy()


def _state(model):
  return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _encoder():
  return vit.VisionTransformer(WIDTH, DEPTH, 4 * WIDTH, HEADS, PATCH)


def _random_like(tree, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: rng.normal(size=s.shape).astype(np.float32), tree)


def _assert_trees_equal(a, b):
  fa, fb = convert._flatten(a), convert._flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg='/'.join(k))


# ------------------------------------------------------------------- parity ---

@pytest.mark.slow
@pytest.mark.parametrize('hw', [(32, 32), HW])
def test_encoder_matches_torch(tr, hw):
  tm = tr.VisionTransformer(hw, PATCH, WIDTH, DEPTH, HEADS)
  params, report = convert.torch_to_flax(_state(tm), kind='encoder')
  grid = (hw[0] // PATCH, hw[1] // PATCH)
  assert report.ok and not report.unused and not report.warnings
  assert report.config == convert.infer_vit_config(tm.state_dict())
  assert {k: report.config[k] for k in
          ('width', 'depth', 'mlp_dim', 'num_heads', 'patch_size', 'grid',
           'pos_embed')} == dict(width=WIDTH, depth=DEPTH, mlp_dim=4 * WIDTH,
                                 num_heads=HEADS, patch_size=PATCH, grid=grid,
                                 pos_embed='sincos')
  model = _encoder()
  images = _images(hw)
  param_checks.check_compatible(params, jax.eval_shape(model.init, jax.random.key(0),
                                                  images))
  param_checks.check_compatible(params, param_checks.abstract_params('encoder', report.config))
  ours = model.apply({'params': params}, images)['tokens']
  np.testing.assert_allclose(ours, _torch_run(tm.forward_features, images),
                             atol=1e-4, rtol=1e-4)


def test_classifier_matches_torch(tr):
  """MAE's fine-tuned model: no final norm; fc_norm(mean of patch tokens)."""
  tm = tr.VisionTransformer(HW, PATCH, WIDTH, DEPTH, HEADS, num_classes=5,
                            global_pool=True)
  params, report = convert.torch_to_flax(_state(tm), kind='classifier')
  assert report.ok and not report.unused and report.config['num_classes'] == 5
  assert set(params) == {'encoder', 'fc_norm', 'head'}
  assert 'norm' not in params['encoder']
  param_checks.check_compatible(params,
                           param_checks.abstract_params('classifier', report.config))

  def trunk(module, images):  # embed + PE + [cls] + blocks, no final norm
    x, grid = module.embed_patches(images)
    x = x + module.posemb(grid)
    cls = jnp.broadcast_to(module.cls_token, (x.shape[0], 1, module.width))
    x = jnp.concatenate([cls, x], axis=1)
    for blk in module.blocks:
      x = blk(x)
    return x

  images = _images(HW)
  tokens = _encoder().apply({'params': params['encoder']}, images, method=trunk)
  pooled = nn.LayerNorm(epsilon=1e-6).apply({'params': params['fc_norm']},
                                            tokens[:, 1:].mean(axis=1))
  logits = pooled @ params['head']['kernel'] + params['head']['bias']
  np.testing.assert_allclose(logits, _torch_run(tm, images), atol=1e-4, rtol=1e-4)


def test_timm_style_classifier_keeps_final_norm(tr):
  """timm's default head: [cls] after the final norm, no fc_norm."""
  tm = tr.VisionTransformer(HW, PATCH, WIDTH, DEPTH, HEADS, num_classes=5)
  state = _state(tm)
  params, report = convert.torch_to_flax(state, kind='classifier')
  assert report.ok and not report.unused and 'fc_norm' not in params
  assert any('pools [cls] after the final norm' in n for n in report.notes)
  images = _images(HW)
  cls = _encoder().apply({'params': params['encoder']}, images)['cls']
  logits = cls @ params['head']['kernel'] + params['head']['bias']
  np.testing.assert_allclose(logits, _torch_run(tm, images)[:, 0],
                             atol=1e-4, rtol=1e-4)
  back = convert.flax_to_torch(params, kind='classifier', grid_hw=(4, 6))
  assert back.keys() == state.keys()


def test_linear_probe_matches_torch(tr):
  """MAE's linear probe: [cls] after the final norm -> BatchNorm1d(affine=
  False) -> Linear, as `head.0` / `head.1`."""
  import torch
  tm = tr.VisionTransformer(HW, PATCH, WIDTH, DEPTH, HEADS, num_classes=5)
  tm.head = torch.nn.Sequential(
      torch.nn.BatchNorm1d(WIDTH, affine=False, eps=1e-6), tm.head)
  with torch.no_grad():
    tm.head[0].running_mean.normal_()
    tm.head[0].running_var.uniform_(0.5, 2.)
  tm.eval()
  state = _state(tm)
  assert convert.guess_kind(state) == 'linear_probe'
  tree, report = convert.torch_to_flax(state, kind='linear_probe')
  assert report.ok and not report.unused and report.config['num_classes'] == 5
  stats = {'head_norm': tree.pop('head_norm')}
  model = classifier.LinearProbe(_encoder(), 5)
  images = _images(HW)
  param_checks.check_compatible({'params': tree, 'batch_stats': stats},
                           jax.eval_shape(model.init, jax.random.key(0), images))
  ours = model.apply({'params': tree, 'batch_stats': stats}, images)
  theirs = _torch_run(lambda x: tm.head(tm.forward_features(x)[:, 0]), images)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
  back = convert.flax_to_torch(dict(tree, **stats), kind='linear_probe',
                               grid_hw=(4, 6))
  assert back.keys() == state.keys()
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)


@pytest.mark.slow
def test_droppos_matches_torch(tr):
  tm = tr.DropPos(HW, PATCH, WIDTH, DEPTH, HEADS, decoder_dim=16,
                  decoder_depth=2, decoder_heads=2)
  params, report = convert.torch_to_flax(_state(tm), kind='droppos',
                                         projector_num_heads=2)
  assert report.ok and not report.unused
  assert report.config['projector'] == dict(width=16, depth=2, num_heads=2,
                                            num_positions=24, head='transformer')
  rng = np.random.default_rng(1)
  ids_keep = np.stack([rng.permutation(24)[:12] for _ in range(2)])
  drop_mask = rng.random((2, 12)) < 0.75
  model = droppos.DropPos(_encoder(), droppos.Projector(16, 2, 2))
  images = _images(HW)
  param_checks.check_compatible(params, jax.eval_shape(
      model.init, jax.random.key(0), images, ids_keep, drop_mask))
  param_checks.check_compatible(params, param_checks.abstract_params('droppos', report.config))
  ours = model.apply({'params': params}, images, ids_keep, drop_mask,
                     train=False)['logits']
  np.testing.assert_allclose(ours, _torch_run(tm, images, ids_keep, drop_mask),
                             atol=1e-4, rtol=1e-4)


def test_cls_row_of_pos_embed_is_folded_into_cls_token(tr):
  import torch
  tm = tr.VisionTransformer(HW, PATCH, WIDTH, DEPTH, HEADS)
  with torch.no_grad():
    tm.pos_embed[0, 0] = torch.linspace(-1, 1, WIDTH)
  params, report = convert.torch_to_flax(_state(tm), kind='encoder')
  assert report.config['pos_embed'] == 'sincos'
  assert any('folded into cls_token' in w for w in report.warnings)
  images = _images(HW)
  np.testing.assert_allclose(_encoder().apply({'params': params}, images)['tokens'],
                             _torch_run(tm.forward_features, images),
                             atol=1e-4, rtol=1e-4)


def test_learned_pos_embed_is_reported_and_dropped(tr):
  tm = tr.VisionTransformer((32, 32), PATCH, WIDTH, DEPTH, HEADS)
  state = _state(tm)
  state['pos_embed'] = np.random.default_rng(0).normal(
      size=state['pos_embed'].shape).astype(np.float32) * 0.02
  params, report = convert.torch_to_flax(state, kind='encoder')
  assert report.config['pos_embed'] == 'learned'
  assert report.config['grid'] == (4, 4)  # square table: side = sqrt(N)
  assert 'LEARNED' in str(report) and 'DROPPED' in str(report)
  assert 'pos_embed' not in convert._flatten(params)


def test_exported_pos_embed_matches_mae_table(tr):
  params = _random_like(param_checks.abstract_params(
      'encoder', dict(width=WIDTH, depth=1, mlp_dim=64, patch_size=PATCH)))
  state = convert.flax_to_torch(params, kind='encoder', grid_hw=(4, 6))
  np.testing.assert_allclose(state['pos_embed'], tr.sincos_pos_embed(WIDTH, (4, 6)),
                             atol=1e-6)


# --------------------------------------------------------------- round trips ---

_CFG = dict(width=WIDTH, depth=DEPTH, mlp_dim=4 * WIDTH, num_heads=HEADS,
            patch_size=PATCH, grid=(4, 6), num_classes=7,
            projector=dict(width=16, depth=2, num_heads=2, num_positions=24),
            decoder=dict(width=16, depth=2, num_heads=2))


def _random_params(kind):
  if kind == 'linear_probe':  # (abstract_params has no linear-probe layout)
    shapes = jax.eval_shape(
        classifier.LinearProbe(_encoder(), _CFG['num_classes']).init,
        jax.random.key(0), jnp.zeros((1, 32, 48, 3)))
    return _random_like(dict(shapes['params'], **shapes['batch_stats']))
  return _random_like(param_checks.abstract_params(kind, _CFG))


@pytest.mark.parametrize('kind', convert.KINDS)
def test_flax_torch_flax_round_trip_is_exact(kind):
  params = _random_params(kind)
  state = convert.flax_to_torch(params, kind=kind, grid_hw=(4, 6))
  assert state['pos_embed'].shape == (1, 25, WIDTH)
  assert not state['pos_embed'][0, 0].any()
  assert convert.guess_kind(state) == kind
  back, report = convert.torch_to_flax(state, kind=kind, projector_num_heads=2)
  assert report.ok and not report.unused and report.config['grid'] == (4, 6)
  _assert_trees_equal(back, params)
  assert convert.flax_config(params, kind) == {
      k: v for k, v in report.config.items()
      if k not in ('num_heads', 'grid', 'pos_embed')} | (
          {'projector': dict(width=16, depth=2, num_positions=24,
                             head='transformer')}
          if kind == 'droppos' else {}) | (
              {'decoder': dict(width=16, depth=2)} if kind == 'mae' else {})


def test_torch_flax_torch_round_trip_is_exact(tr):
  tm = tr.DropPos(HW, PATCH, WIDTH, DEPTH, HEADS, 16, 2, 2)
  state = _state(tm)
  params, _ = convert.torch_to_flax(state, kind='droppos')
  back = convert.flax_to_torch(params, kind='droppos', grid_hw=(4, 6))
  assert back.keys() == state.keys()
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)


# ---------------------------------------------------------------- bad inputs ---

@pytest.fixture(scope='module')
def droppos_state(tr):
  return _state(tr.DropPos(HW, PATCH, WIDTH, DEPTH, HEADS, 16, 2, 2))


def test_missing_and_misshapen_tensors_raise(droppos_state):
  state = dict(droppos_state)
  del state['blocks.1.attn.qkv.weight']
  state['decoder_blocks.0.mlp.fc1.weight'] = np.zeros((48, 16), np.float32)
  with pytest.raises(UserError) as err:
    convert.torch_to_flax(state, kind='droppos')
  msg = str(err.value)
  assert 'missing tensors (1): blocks.1.attn.qkv.weight' in msg
  assert 'decoder_blocks.0.mlp.fc1.weight is [48, 16], expected [64, 16]' in msg
  params, report = convert.torch_to_flax(state, kind='droppos', strict=False)
  assert report.missing == ['blocks.1.attn.qkv.weight']
  assert 'kernel' not in params['encoder']['blocks_1']['attn']['qkv']


def test_unused_tensors_are_listed(droppos_state):
  params, report = convert.torch_to_flax(droppos_state, kind='encoder')
  expected = sorted(k for k in droppos_state
                    if k.startswith('decoder_') or k == 'mask_pos_token')
  assert report.ok and report.unused == expected
  assert 'decoder_pred.weight' in str(report) and 'NOT converted' in str(report)
  assert set(params) == {'patch_embed', 'cls_token', 'blocks_0', 'blocks_1', 'norm'}


def test_wrong_kind_gives_hints(tr, droppos_state):
  finetuned = _state(tr.VisionTransformer(HW, PATCH, WIDTH, DEPTH, HEADS,
                                          num_classes=5, global_pool=True))
  with pytest.raises(UserError, match="(?s)norm.weight.*kind='classifier'"):
    convert.torch_to_flax(finetuned, kind='encoder')
  mae = {k: v for k, v in droppos_state.items()
         if not k.startswith('decoder_') and k != 'mask_pos_token'}
  with pytest.raises(UserError, match="(?s)mask_pos_token.*kind='encoder'"):
    convert.torch_to_flax(mae, kind='droppos')
  with pytest.raises(UserError, match='Unknown kind'):
    convert.torch_to_flax(mae, kind='decoder')
  with pytest.raises(UserError, match=r'grid_hw \(5, 5\) has 25 patches.*24'):
    convert.torch_to_flax(mae, kind='encoder', grid_hw=(5, 5))


@pytest.mark.parametrize('size, expected', [
    (dict(width=64), 'patch_embed/kernel: checkpoint [8, 8, 3, 32] vs model [8, 8, 3, 64]'),
    (dict(patch_size=16), 'patch_embed/kernel: checkpoint [8, 8, 3, 32] vs model [16, 16, 3, 32]'),
    (dict(depth=3), 'missing blocks_2/attn/qkv/kernel [32, 96]'),
    (dict(depth=1), 'unexpected blocks_1/mlp/fc2/bias [32]'),
])
def test_wrong_model_size_is_named(droppos_state, size, expected):
  params, report = convert.torch_to_flax(droppos_state, kind='encoder')
  target = dict(report.config, **size)
  with pytest.raises(UserError, match=re.escape(expected)):
    param_checks.check_compatible(params, param_checks.abstract_params('encoder', target))


def test_export_checks_layout_and_grid():
  params = _random_like(param_checks.abstract_params('droppos', _CFG))
  with pytest.raises(UserError, match='predicts 24'):
    convert.flax_to_torch(params, kind='droppos', grid_hw=(5, 5))
  del params['projector']['norm']
  with pytest.raises(UserError, match='(?s)missing.*projector/norm/scale'):
    convert.flax_to_torch(params, kind='droppos', grid_hw=(4, 6))
  enc = _random_like(param_checks.abstract_params('encoder', _CFG))
  enc['extra'] = np.zeros(3, np.float32)
  with pytest.raises(UserError, match='(?s)unexpected.*extra'):
    convert.flax_to_torch(enc, kind='encoder', grid_hw=(4, 6))
