"""DropPos model + objective: the step against the reference computation in
torch, the shortened attentive pass against the full one, gradients,
sharded == single device, one trace."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from droppos_jax import losses, masking, settings
from droppos_jax.objectives import droppos as droppos_objective
from droppos_jax.models import convert, droppos, vit

PAPER_MASKING = masking.Masking('random', 0.75, 0.75)
# The paper's objective settings (configs/common.py).
PAPER = dict(masking=PAPER_MASKING, attentive=True, tau=0.1, sigma=1.0)
CFG = droppos_objective.ObjectiveConfig(image_hw=(16, 32), patch_size=8,
                               **PAPER)  # 2x4 grid
MODEL = droppos.droppos_from_config('mu/8', 'tiny')


def loss_fn(params, model, images, key, sigma, cfg):
  """(loss, metrics) with masks drawn from `key`."""
  ids_keep, drop_mask = cfg.masking.sample(key, images.shape[0], cfg.grid)
  return droppos_objective.masked_loss_fn(params, model, images, ids_keep, drop_mask,
                                 sigma, cfg)


@pytest.fixture(scope='module')
def setup():
  images = jax.random.normal(jax.random.key(0), (16, 16, 32, 3))
  ids = jnp.zeros((1, 2), jnp.int32)
  params = MODEL.init(jax.random.key(1), images[:1], ids,
                      jnp.ones((1, 2), bool))['params']
  return params, images


@pytest.mark.slow
def test_logit_shapes(setup):
  params, images = setup
  ids = jnp.tile(jnp.arange(2, dtype=jnp.int32), (16, 1))
  logits = MODEL.apply({'params': params}, images, ids,
                       jnp.ones((16, 2), bool))['logits']
  chex.assert_shape(logits, (16, 2, 8))
  assert logits.dtype == jnp.float32
  assert params['projector']['pred']['kernel'].shape == (64, 8)


@pytest.mark.slow
def test_mask_token_replaces_pe_only_where_dropped(setup):
  params, images = setup
  ids = jnp.tile(jnp.arange(2, dtype=jnp.int32), (16, 1))
  none_dropped = jnp.zeros((16, 2), bool)
  grad = jax.grad(lambda p: MODEL.apply({'params': p}, images, ids,
                                        none_dropped)['logits'].sum())(params)
  np.testing.assert_array_equal(grad['mask_pos_token'], 0.)


@pytest.mark.slow
def test_gradients_reach_mask_token_and_not_through_attentive_pass(setup):
  params, images = setup
  grads, _ = jax.grad(loss_fn, has_aux=True)(
      params, MODEL, images, jax.random.key(2), 1.0, CFG)
  assert float(jnp.abs(grads['mask_pos_token']).sum()) > 0
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
  # With attentive weights computed from the same params, the objective's
  # gradient equals the gradient of the loss with weights held constant.
  cfg_plain = droppos_objective.ObjectiveConfig(image_hw=(16, 32), patch_size=8,
                                       **dict(PAPER, attentive=False))
  loss_w, _ = loss_fn(params, MODEL, images, jax.random.key(2), 1.0, CFG)
  loss_u, _ = loss_fn(params, MODEL, images, jax.random.key(2), 1.0,
                               cfg_plain)
  assert np.isfinite(loss_w) and np.isfinite(loss_u) and loss_w != loss_u


@pytest.mark.slow
def test_objective_matches_torch_reference():
  """Loss, attentive weights and every gradient of our step (one patch
  embedding, attentive pass cut after the visible tokens' keys and values,
  weights as a softmax over the visible tokens) against the authors' way in
  torch: a full second forward, softmax over all N, gather, renormalise."""
  torch = pytest.importorskip('torch')
  import torch_reference
  hw, patch, sigma, tau = (32, 48), 8, 0.8, 0.1
  tm = torch_reference.DropPos(hw, patch, 32, 2, 2, decoder_dim=16,
                               decoder_depth=2, decoder_heads=2)
  state = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
  params, _ = convert.torch_to_flax(state, kind='droppos', projector_num_heads=2)
  model = droppos.DropPos(vit.VisionTransformer(32, 2, 128, 2, patch),
                          droppos.Projector(16, 2, 2))
  cfg = droppos_objective.ObjectiveConfig(image_hw=hw, patch_size=patch,
                                 **dict(PAPER, tau=tau))
  images = np.random.default_rng(0).normal(size=(4, *hw, 3)).astype(np.float32)
  ids_keep, drop_mask = cfg.masking.sample(jax.random.key(0), 4, cfg.grid)

  (loss, _), grads = jax.jit(
      jax.value_and_grad(droppos_objective.masked_loss_fn, has_aux=True),
      static_argnums=(1, 6))(params, model, images, ids_keep, drop_mask, sigma,
                             cfg)
  out = model.apply({'params': params}, images, ids_keep, drop_mask,
                    attentive=True)
  weights = losses.attentive_weights(out['attentive']['cls'],
                                     out['attentive']['patches'], tau)

  ids_t = torch.from_numpy(np.asarray(ids_keep, np.int64))
  loss_t, weights_t = torch_reference.droppos_loss(
      tm, torch.from_numpy(images).permute(0, 3, 1, 2), ids_t,
      torch.from_numpy(np.array(drop_mask)),
      torch_reference.smoothing_targets(cfg.grid, sigma), tau)
  loss_t.backward()
  np.testing.assert_allclose(weights, weights_t.numpy(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(loss, loss_t.item(), rtol=1e-5)
  ours = convert.flax_to_torch(grads, kind='droppos', grid_hw=cfg.grid)
  for name, p in tm.named_parameters():
    if p.requires_grad:
      scale = float(p.grad.abs().max()) + 1e-12
      np.testing.assert_allclose(ours[name] / scale, p.grad.numpy() / scale,
                                 atol=2e-5, err_msg=name)


@pytest.mark.slow
def test_attentive_pass_equals_the_full_pass_at_the_visible_tokens(setup):
  params, images = setup
  ids_keep, drop_mask = CFG.masking.sample(jax.random.key(5), 16, CFG.grid)
  out = MODEL.apply({'params': params}, images, ids_keep, drop_mask,
                    attentive=True)
  full = MODEL.encoder.apply({'params': params['encoder']}, images)
  np.testing.assert_allclose(out['attentive']['cls'], full['cls'], atol=1e-5)
  np.testing.assert_allclose(
      out['attentive']['patches'],
      np.take_along_axis(full['patches'], ids_keep[..., None], axis=1),
      atol=1e-5)
  # The masked pass is the encoder's one pass with the mask token.
  masked = MODEL.encoder.apply({'params': params['encoder']}, images, ids_keep,
                               drop_mask, params['mask_pos_token'])
  np.testing.assert_allclose(out['encoder']['tokens'], masked['tokens'],
                             atol=1e-5)


def test_attentive_dtype_defaults_per_backend():
  assert droppos.attentive_dtype('auto', jnp.float32, 'tpu') == jnp.bfloat16
  assert droppos.attentive_dtype('auto', jnp.float32, 'gpu') == jnp.bfloat16
  assert droppos.attentive_dtype('auto', jnp.float32, 'cpu') == jnp.float32
  assert droppos.attentive_dtype('float32', jnp.bfloat16, 'tpu') == jnp.float32
  with pytest.raises(ValueError, match="attentive_dtype='half'"):
    droppos.attentive_dtype('half', jnp.float32, 'cpu')
  model = droppos.droppos_from_model_config(dict(
      variant='mu/8', projector='tiny', dtype='float32', remat=False,
      attentive_dtype='auto', attention='auto', projector_width=None,
      projector_depth=None, projector_heads=None), platform='tpu')
  assert model.attentive_dtype == jnp.bfloat16
  assert model.encoder.dtype == jnp.float32


@pytest.mark.slow
def test_bfloat16_attentive_pass_keeps_weights_close(setup):
  params, images = setup
  ids_keep, drop_mask = CFG.masking.sample(jax.random.key(6), 16, CFG.grid)
  weights = {}
  for dtype in (None, jnp.bfloat16):
    out = MODEL.clone(attentive_dtype=dtype).apply(
        {'params': params}, images, ids_keep, drop_mask, attentive=True)
    weights[dtype] = losses.attentive_weights(out['attentive']['cls'],
                                              out['attentive']['patches'], 0.1)
  assert out['attentive']['patches'].dtype == jnp.bfloat16
  assert weights[jnp.bfloat16].dtype == jnp.float32
  np.testing.assert_allclose(weights[jnp.bfloat16], weights[None], atol=0.02)


@pytest.mark.slow
def test_sharded_equals_single_device(setup):
  params, images = setup
  assert jax.device_count() == 8
  fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
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


@pytest.mark.slow
def test_training_sized_call_compiles_once(setup):
  params, images = setup

  @chex.assert_max_traces(n=1)
  def step(params, images, key, sigma):
    return jax.value_and_grad(loss_fn, has_aux=True)(
        params, MODEL, images, key, sigma, CFG)

  jitted = jax.jit(step)
  for i in range(3):  # new key, new sigma, new images: same trace
    jitted(params, images + i, jax.random.key(i), 1.0 - 0.1 * i)


def test_objective_config_rejects_bad_settings():
  with pytest.raises(ValueError, match='must divide the image size'):
    droppos_objective.ObjectiveConfig(image_hw=(30, 32), patch_size=8,
                             **PAPER)
  with pytest.raises(ValueError, match='tau=0'):
    droppos_objective.ObjectiveConfig(image_hw=(32, 32), patch_size=8,
                             **dict(PAPER, tau=0.))
  with pytest.raises(ValueError, match='mask_ratio=1.2'):
    masking.Masking('random', 1.2, 0.75)
  with pytest.raises(ValueError, match='Unknown projector'):
    droppos.droppos_from_config('mu/8', 'huge')


def test_objective_from_config_carries_sigma_schedule_and_quirks():
  from droppos_jax.configs import pretrain as pretrain_config
  c = pretrain_config.get_config('variant=B/16,epochs=800')
  objective = lambda c: droppos_objective.objective_from_config(
      c, image_hw=(224, 224), patch_size=16, schedule=settings.Schedule(
          steps_per_epoch=10, total_steps=8000, warmup_steps=0, peak_lr=1.,
          min_lr=0.))
  obj = objective(c)
  assert obj.grid == (14, 14) and obj.official_grid_width is None
  # The paper's schedule: sigma_0 (1 - epoch / epochs), once per epoch.
  np.testing.assert_allclose([obj.sigma_at(s) for s in (0, 9, 10, 7999)],
                             [1., 1., 1 - 1 / 800, 1 / 800], rtol=1e-4)
  c.objective.official_quirks = True  # the reference's 224 // 14 = 16 grid
  assert objective(c).official_grid_width == 16
  c.objective.sigma_schedule = 'step'
  with pytest.raises(ValueError, match="Unknown sigma schedule 'step'"):
    objective(c)
