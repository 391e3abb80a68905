"""DropPos model + objective: gradients, sharded == single device, one trace."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from droppos_jax import pretrain
from droppos_jax.models import droppos

CFG = pretrain.ObjectiveConfig(image_hw=(16, 32), patch_size=8)  # 2x4 grid
MODEL = droppos.droppos_from_config('mu/8', 'tiny')


@pytest.fixture(scope='module')
def setup():
  images = jax.random.normal(jax.random.key(0), (16, 16, 32, 3))
  ids = jnp.zeros((1, 2), jnp.int32)
  params = MODEL.init(jax.random.key(1), images[:1], ids,
                      jnp.ones((1, 2), bool))['params']
  return params, images


def test_logit_shapes(setup):
  params, images = setup
  ids = jnp.tile(jnp.arange(2, dtype=jnp.int32), (16, 1))
  logits = MODEL.apply({'params': params}, images, ids, jnp.ones((16, 2), bool))
  chex.assert_shape(logits, (16, 2, 8))
  assert logits.dtype == jnp.float32
  assert params['projector']['pred']['kernel'].shape == (64, 8)


def test_mask_token_replaces_pe_only_where_dropped(setup):
  params, images = setup
  ids = jnp.tile(jnp.arange(2, dtype=jnp.int32), (16, 1))
  none_dropped = jnp.zeros((16, 2), bool)
  grad = jax.grad(lambda p: MODEL.apply({'params': p}, images, ids,
                                        none_dropped).sum())(params)
  np.testing.assert_array_equal(grad['mask_pos_token'], 0.)


def test_gradients_reach_mask_token_and_not_through_attentive_pass(setup):
  params, images = setup
  grads, _ = jax.grad(pretrain.loss_fn, has_aux=True)(
      params, MODEL, images, jax.random.key(2), 1.0, CFG)
  assert float(jnp.abs(grads['mask_pos_token']).sum()) > 0
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
  # With attentive weights computed from the same params, the objective's
  # gradient equals the gradient of the loss with weights held constant.
  cfg_plain = pretrain.ObjectiveConfig(image_hw=(16, 32), patch_size=8,
                                       attentive=False)
  loss_w, _ = pretrain.loss_fn(params, MODEL, images, jax.random.key(2), 1.0, CFG)
  loss_u, _ = pretrain.loss_fn(params, MODEL, images, jax.random.key(2), 1.0,
                               cfg_plain)
  assert np.isfinite(loss_w) and np.isfinite(loss_u) and loss_w != loss_u


def test_sharded_equals_single_device(setup):
  params, images = setup
  assert jax.device_count() == 8
  fn = jax.jit(jax.value_and_grad(pretrain.loss_fn, has_aux=True),
               static_argnums=(1, 5))
  (loss1, m1), g1 = fn(jax.device_put(params, jax.devices()[0]), MODEL,
                       jax.device_put(images, jax.devices()[0]),
                       jax.random.key(3), 0.9, CFG)
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  images8 = jax.device_put(images, NamedSharding(mesh, P('data')))
  params8 = jax.device_put(params, NamedSharding(mesh, P()))
  (loss8, m8), g8 = fn(params8, MODEL, images8, jax.random.key(3), 0.9, CFG)
  assert len(images8.sharding.device_set) == 8
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  chex.assert_trees_all_close(m8, m1, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(g8, g1, rtol=1e-4, atol=1e-6)


def test_training_sized_call_compiles_once(setup):
  params, images = setup

  @chex.assert_max_traces(n=1)
  def step(params, images, key, sigma):
    return jax.value_and_grad(pretrain.loss_fn, has_aux=True)(
        params, MODEL, images, key, sigma, CFG)

  jitted = jax.jit(step)
  for i in range(3):  # new key, new sigma, new images: same trace
    jitted(params, images + i, jax.random.key(i), 1.0 - 0.1 * i)


def test_objective_config_rejects_bad_settings():
  with pytest.raises(ValueError, match='must divide the image size'):
    pretrain.ObjectiveConfig(image_hw=(30, 32), patch_size=8)
  with pytest.raises(ValueError, match='tau=0'):
    pretrain.ObjectiveConfig(image_hw=(32, 32), patch_size=8, tau=0.)
  with pytest.raises(ValueError, match='mask_ratio=1.2'):
    pretrain.ObjectiveConfig(image_hw=(32, 32), patch_size=8, mask_ratio=1.2)
  with pytest.raises(ValueError, match='Unknown projector'):
    droppos.droppos_from_config('mu/8', 'huge')
