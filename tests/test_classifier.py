"""Classification models, layer-wise lr decay, mixup/cutmix and the eval step."""
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from droppos_jax.configs import finetune as finetune_config
from droppos_jax import classification as finetune
from droppos_jax.models import classifier, convert, vit
import param_checks

HW = (16, 24)  # non-square: grid 2 x 3 with patch 8


def _images(seed=0, n=4):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, *HW, 3)),
                     jnp.float32)


def _init(model, seed=0):
  # One compile instead of an eager (op by op) init.
  return jax.jit(model.init)(jax.random.key(seed), _images())


def _shapes(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


@pytest.mark.slow
def test_classifier_tree_is_the_converted_finetune_layout():
  model = classifier.classifier_from_variant('mu/8', 5, drop_path_rate=0.1)
  params = _init(model)['params']
  assert set(params) == {'encoder', 'fc_norm', 'head'}
  assert 'norm' not in params['encoder']
  size = vit.decode_variant('mu/8')
  want = param_checks.abstract_params('classifier', dict(
      width=size.width, depth=size.depth, mlp_dim=size.mlp_dim,
      patch_size=size.patch_size, num_classes=5))
  param_checks.check_compatible(params, want)
  assert float(jnp.std(params['head']['kernel'])) < 1e-4   # std 2e-5 init
  logits = jax.jit(model.apply)({'params': params}, _images())
  assert logits.shape == (4, 5) and logits.dtype == jnp.float32
  # Drop-path makes train mode stochastic, inference deterministic.
  rand = jax.jit(lambda k: model.apply(
      {'params': params}, _images(), train=True,
      rngs={'dropout': jax.random.key(k)}))
  assert not np.allclose(rand(1), rand(2))


def test_classifier_matches_torch_global_pool_model():
  pytest.importorskip('torch')
  import torch_reference
  ref = torch_reference.VisionTransformer(HW, 8, 32, 2, 2, num_classes=5,
                                          global_pool=True)
  state = {k: v.numpy().copy() for k, v in ref.state_dict().items()}
  params, _ = convert.torch_to_flax(state, kind='classifier')
  model = classifier.classifier_from_variant('mu/8', 5)
  images = np.array(_images())
  import torch
  with torch.no_grad():
    want = ref(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  got = jax.jit(model.apply)({'params': params}, images)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_linear_probe_freezes_encoder_and_uses_batchnorm():
  model = classifier.linear_probe_from_variant('mu/8', 3)
  variables = _init(model)
  assert set(variables['params']) == {'encoder', 'head'}
  assert 'norm' in variables['params']['encoder']
  assert _shapes(variables['batch_stats']) == {
      'head_norm': {'mean': (32,), 'var': (32,)}}

  def loss(params):
    logits, _ = model.apply({'params': params,
                             'batch_stats': variables['batch_stats']},
                            _images(), train=True, mutable=['batch_stats'])
    return logits.sum()
  grads = jax.jit(jax.grad(loss))(variables['params'])
  assert all(float(jnp.abs(g).max()) == 0
             for g in jax.tree.leaves(grads['encoder']))
  assert float(jnp.abs(grads['head']['kernel']).max()) > 0
  gap = classifier.linear_probe_from_variant('mu/8', 3, feature='gap')
  assert not np.allclose(jax.jit(gap.apply)(variables, _images()),
                         jax.jit(model.apply)(variables, _images()))
  with pytest.raises(ValueError, match="Probe feature 'mean'"):
    classifier.linear_probe_from_variant('mu/8', 3, feature='mean')


@pytest.mark.slow
def test_layer_wise_lr_decay_scales_each_update():
  config = finetune_config.get_config('runlocal')  # mu/8: depth 2
  config.optim.layer_decay = 0.5
  config.optim.weight_decay = 0.
  model = finetune.build_model(config, 4)
  params = _init(model)['params']
  scales = finetune.layer_scales(params, 2, 0.5)
  assert scales['encoder']['patch_embed']['kernel'] == 0.125
  assert scales['encoder']['cls_token'] == 0.125
  assert scales['encoder']['blocks_0']['attn']['qkv']['kernel'] == 0.25
  assert scales['encoder']['blocks_1']['norm2']['scale'] == 0.5
  assert scales['fc_norm']['bias'] == scales['head']['kernel'] == 1.
  lr = 1e-2
  tx = finetune.make_optimizer(config, lambda _: lr, params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # Adam's first step is -lr * g / (|g| + eps): -lr * scale here.
  got = jax.tree.map(lambda u: float(jnp.mean(u)), updates)
  want = jax.tree.map(lambda s: -lr * s, scales)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g == pytest.approx(w, rel=1e-5)


@pytest.mark.slow
def test_weight_decay_mask_skips_biases_norms_and_cls_token():
  model = classifier.classifier_from_variant('mu/8', 4)
  params = _init(model)['params']
  mask = finetune.finetune_decay_mask(params)
  assert mask['head']['kernel'] and mask['encoder']['patch_embed']['kernel']
  assert not mask['encoder']['cls_token']
  assert not mask['head']['bias'] and not mask['fc_norm']['scale']


def _mix(**kw):
  cfg = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0,
             label_smoothing=0.1)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


def test_label_smoothing_targets():
  t = finetune.smooth_one_hot(jnp.array([2]), 4, 0.1)
  np.testing.assert_allclose(t, [[0.025, 0.025, 0.925, 0.025]], rtol=1e-6)


def test_mixup_mixes_images_and_targets_by_lam():
  x, labels = _images(n=6), jnp.arange(6) % 4
  images, targets, lam = jax.jit(lambda k: finetune.mix_batch(
      k, x, labels, 4, _mix(cutmix_alpha=0.)))(jax.random.key(3))
  lam = float(lam)
  assert 0 < lam < 1
  np.testing.assert_allclose(images, lam * x + (1 - lam) * x[::-1], atol=1e-6)
  t = finetune.smooth_one_hot(labels, 4, 0.1)
  np.testing.assert_allclose(targets, lam * t + (1 - lam) * t[::-1], atol=1e-6)
  np.testing.assert_allclose(targets.sum(-1), 1, atol=1e-6)


def test_cutmix_box_area_sets_lam():
  x = jnp.broadcast_to(jnp.arange(6.)[:, None, None, None], (6, 32, 32, 3))
  labels = jnp.arange(6)
  mix = jax.jit(lambda k: finetune.mix_batch(
      k, x, labels, 6, _mix(mixup_alpha=0., label_smoothing=0.)))
  for seed in range(4):
    images, targets, lam = mix(jax.random.key(seed))
    # Image i is constant i; pixels of i[::-1] = 5 - i mark the pasted box.
    pasted = np.mean(np.asarray(images[0, ..., 0]) == 5.)
    assert float(lam) == pytest.approx(1 - pasted, abs=1e-6)
    assert float(targets[0, 0]) == pytest.approx(float(lam), abs=1e-6)
    assert float(targets[0, 5]) == pytest.approx(1 - float(lam), abs=1e-6)


def test_mixing_off_or_never_applied_keeps_the_batch():
  x, labels = _images(n=4), jnp.arange(4)
  for cfg in (_mix(prob=0.), _mix(mixup_alpha=0., cutmix_alpha=0.)):
    images, targets, lam = jax.jit(lambda k: finetune.mix_batch(
        k, x, labels, 4, cfg))(jax.random.key(0))
    np.testing.assert_array_equal(images, x)
    assert float(lam) == 1.
    np.testing.assert_allclose(targets,
                               finetune.smooth_one_hot(labels, 4, 0.1))


def test_eval_step_counts_top1_top5_over_real_examples():
  logits = jnp.array([[9., 8, 7, 6, 5, 4],    # label 0: top-1
                      [9., 8, 7, 6, 5, 4],    # label 4: top-5 only
                      [9., 8, 7, 6, 5, 4],    # label 5: neither
                      [9., 8, 7, 6, 5, 4]])   # padding, label 0
  stub = types.SimpleNamespace(apply=lambda *a, **k: logits)
  out = jax.jit(finetune.make_eval_step(stub, 6))(
      {'params': None}, {'image': None, 'label': jnp.array([0, 4, 5, 0]),
                         'mask': jnp.array([1., 1., 1., 0.])})
  assert float(out['correct1']) == 1 and float(out['correct5']) == 2
  assert float(out['count']) == 3
  want = optax.softmax_cross_entropy_with_integer_labels(
      logits[:3], jnp.array([0, 4, 5])).sum()
  assert float(out['loss_sum']) == pytest.approx(float(want), rel=1e-6)
