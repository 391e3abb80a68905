"""The pre-training optimizer (optim.py) against independent restatements:
per-tensor clipping, the weight-decay mask, MAE's lr schedule, AdamW."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from droppos_jax import optim
from droppos_jax.errors import UserError
from droppos_jax.models import droppos


def opt_cfg(**kw):
  return ml_collections.ConfigDict(dict(
      b1=0.9, b2=0.95, weight_decay=0.05, clip='per_tensor', clip_norm=5.0,
      **kw))


def test_per_tensor_clipping_scales_each_tensor_on_its_own():
  rng = np.random.default_rng(0)
  grads = {'big': rng.normal(size=(40, 30)) * 10, 'small': rng.normal(size=7),
           'edge': np.full(4, 2.5)}  # norm exactly 5: unchanged
  clipped, _ = optim.clip_per_tensor(5.0).update(
      jax.tree.map(jnp.asarray, grads), None)
  for name, g in grads.items():
    norm = np.linalg.norm(g)
    expected = g * min(1., 5.0 / norm)
    np.testing.assert_allclose(clipped[name], expected, rtol=1e-5)
  assert np.linalg.norm(clipped['big']) == pytest.approx(5.0, rel=1e-5)
  # Global-norm clipping would have scaled the small tensor too.
  np.testing.assert_allclose(clipped['small'], grads['small'], rtol=1e-6)


def test_decay_mask_decays_matrices_and_tokens_not_biases_or_norms():
  model = droppos.droppos_from_config('mu/8', 'tiny')
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 16, 16, 3)),
                          jnp.zeros((1, 1), jnp.int32),
                          jnp.ones((1, 1), bool))['params']
  mask = optim.decay_mask(params)
  enc = mask['encoder']
  assert mask['mask_pos_token'] and enc['cls_token']
  assert enc['blocks_0']['attn']['qkv']['kernel']
  assert not enc['blocks_0']['attn']['qkv']['bias']
  assert not enc['blocks_0']['norm1']['scale'] and not enc['norm']['bias']
  assert enc['patch_embed']['kernel'] and not enc['patch_embed']['bias']


def test_lr_schedule_is_maes_warmup_and_half_cosine():
  peak, total, warm, floor = 1e-3, 100, 10, 1e-5
  lr = optim.lr_schedule(peak, total_steps=total, warmup_steps=warm,
                         min_lr=floor)
  for step in (0, 5, 10, 11, 50, 99, 100):
    if step < warm:
      expected = peak * step / warm
    else:
      expected = floor + (peak - floor) * 0.5 * (
          1 + math.cos(math.pi * (step - warm) / (total - warm)))
    assert float(lr(step)) == pytest.approx(expected, rel=1e-5, abs=1e-9)
  with pytest.raises(UserError, match='warm-up \\(100 steps\\) must be shorter'):
    optim.lr_schedule(peak, total_steps=100, warmup_steps=100)


def test_adamw_step_matches_a_numpy_restatement():
  """Two steps of clip -> AdamW (decoupled decay on the mask) by hand."""
  rng = np.random.default_rng(1)
  params = {'w': rng.normal(size=(3, 4)), 'b': rng.normal(size=4)}
  lr = 0.1
  tx = optim.make_optimizer(opt_cfg(), lambda step: lr)
  state = tx.init(jax.tree.map(jnp.asarray, params))
  p = jax.tree.map(jnp.asarray, params)
  ref = {k: v.copy() for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  for t in (1, 2):
    grads = {'w': rng.normal(size=(3, 4)) * 4, 'b': rng.normal(size=4)}
    updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
    for k in ref:
      g = grads[k] * min(1., 5.0 / np.linalg.norm(grads[k]))
      m[k] = 0.9 * m[k] + 0.1 * g
      v[k] = 0.95 * v[k] + 0.05 * g * g
      step = (m[k] / (1 - 0.9**t)) / (np.sqrt(v[k] / (1 - 0.95**t)) + 1e-8)
      decay = 0.05 * ref[k] if ref[k].ndim > 1 else 0.
      ref[k] = ref[k] - lr * (step + decay)
  for k in ref:
    np.testing.assert_allclose(p[k], ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('field,value,message', [
    ('clip', 'norm', "optim.clip='norm'"),
    ('clip_norm', 0., 'optim.clip_norm=0.0 must be > 0'),
])
def test_bad_settings(field, value, message):
  cfg = opt_cfg()
  cfg[field] = value
  with pytest.raises(UserError, match=message):
    optim.make_optimizer(cfg, lambda step: 1e-3)
