import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from droppos_jax.models import vit


def test_posemb_matches_hand_computed_2x3():
  h, w, dim = 2, 3, 8
  table = vit.posemb_sincos_2d(h, w, dim)
  chex.assert_shape(table, (6, 8))
  assert table.dtype == np.float32
  omega = [1.0, 1.0 / 100.0]  # 1/10000^(k/2), k = 0, 1
  for i in range(h * w):
    row, col = divmod(i, w)
    expected = ([np.sin(col * o) for o in omega] + [np.cos(col * o) for o in omega]
                + [np.sin(row * o) for o in omega] + [np.cos(row * o) for o in omega])
    np.testing.assert_allclose(table[i], expected, rtol=1e-6, atol=1e-7)


def test_posemb_rejects_width_not_divisible_by_4():
  with pytest.raises(ValueError, match='divisible by 4'):
    vit.posemb_sincos_2d(2, 2, 6)


@pytest.mark.parametrize('name,expected', [
    ('B/16', (768, 12, 3072, 12, 16)), ('L/16', (1024, 24, 4096, 16, 16)),
    ('H/14', (1280, 32, 5120, 16, 14)), ('Ti/16', (192, 12, 768, 3, 16)),
    ('S/8', (384, 12, 1536, 6, 8)), ('mu/4', (32, 2, 128, 2, 4))])
def test_decode_variant(name, expected):
  size = vit.decode_variant(name)
  assert (size.width, size.depth, size.mlp_dim, size.num_heads,
          size.patch_size) == expected


@pytest.mark.parametrize('bad', ['X/16', 'B', 'B/0', 'B16', ''])
def test_decode_variant_rejects_bad_names(bad):
  with pytest.raises(ValueError, match='variant'):
    vit.decode_variant(bad)


def test_patch_must_divide_image():
  with pytest.raises(ValueError, match='must divide the image size 30x32'):
    vit.grid_size((30, 32), 8)


@pytest.mark.slow
def test_forward_shapes_non_square_and_dtypes():
  model = vit.vit_from_variant('mu/8', dtype=jnp.bfloat16)
  images = jnp.ones((2, 16, 32, 3))
  params = model.init(jax.random.key(0), images)['params']
  chex.assert_trees_all_equal_dtypes(
      params, jax.tree.map(lambda x: x.astype(jnp.float32), params))
  out = model.apply({'params': params}, images)
  chex.assert_shape(out['tokens'], (2, 1 + 2 * 4, 32))
  chex.assert_shape([out['cls'], out['gap']], (2, 32))
  chex.assert_shape(out['patches'], (2, 8, 32))
  assert out['tokens'].dtype == jnp.bfloat16


def test_drop_path_only_acts_in_training():
  model = vit.vit_from_variant('mu/8', drop_path_rate=0.5)
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  params = model.init(jax.random.key(0), images)['params']
  a = model.apply({'params': params}, images)['tokens']
  b = model.apply({'params': params}, images)['tokens']
  c = model.apply({'params': params}, images, train=True,
                  rngs={'dropout': jax.random.key(2)})['tokens']
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_patch_embed_is_the_patch_conv():
  model = vit.vit_from_variant('mu/8')
  images = jax.random.normal(jax.random.key(0), (2, 16, 32, 3))
  params = model.init(jax.random.key(1), images)['params']
  kernel, bias = params['patch_embed']['kernel'], params['patch_embed']['bias']
  conv = jax.lax.conv_general_dilated(
      images, kernel, (8, 8), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias
  tokens, grid = model.apply({'params': params}, images,
                             method=vit.VisionTransformer.embed_patches)
  assert grid == (2, 4)
  np.testing.assert_allclose(tokens, conv.reshape(2, 8, 32), atol=1e-5)


@pytest.mark.parametrize('all_differentiated', [False, True])
def test_shared_embedding_gradients(all_differentiated):
  """(every patch, visible patches) embedded once: gradients equal plain
  autodiff of embed-then-gather, whether or not the every-patch output is
  differentiated (the attentive pass stops its gradient)."""
  embed = vit.PatchEmbed(32, 8)
  images = jax.random.normal(jax.random.key(0), (2, 16, 32, 3))
  params = embed.init(jax.random.key(1), images)['params']
  ids = jnp.array([[5, 0, 7], [2, 3, 1]])
  rng = np.random.default_rng(0)
  ct_all, ct_vis = rng.normal(size=(2, 8, 32)), rng.normal(size=(2, 3, 32))

  def objective(params, images, shared):
    if shared:
      every, visible = embed.apply({'params': params}, images, ids,
                                   with_all=True)
    else:
      every = embed.apply({'params': params}, images)
      visible = jnp.take_along_axis(every, ids[..., None], axis=1)
    if not all_differentiated:
      every = jax.lax.stop_gradient(every)
    return (every * ct_all).sum() + (visible * ct_vis).sum()

  want = jax.grad(objective, argnums=(0, 1))(params, images, False)
  got = jax.jit(jax.grad(objective, argnums=(0, 1)), static_argnums=2)(
      params, images, True)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-5)


def test_one_pass_with_dropped_pes_and_named_outputs():
  model = vit.vit_from_variant('mu/8', pool='gap')
  images = jax.random.normal(jax.random.key(0), (2, 16, 32, 3))
  params = model.init(jax.random.key(1), images)['params']
  ids = jnp.array([[5, 0, 7], [2, 3, 1]])
  drop = jnp.array([[True, False, True], [False, False, True]])
  run = jax.jit(lambda *a: model.apply({'params': params}, images, *a))
  no_pe = run(ids, drop, None)
  np.testing.assert_array_equal(no_pe['tokens'],
                                run(ids, drop, jnp.zeros((1, 1, 32)))['tokens'])
  assert not np.allclose(no_pe['tokens'], run(ids, drop, jnp.ones((1, 1, 32)))['tokens'])
  # Nothing dropped and every patch in order: the plain full pass.
  every = jnp.tile(jnp.arange(8), (2, 1))
  full = run(None, None, None)
  np.testing.assert_allclose(run(every, jnp.zeros((2, 8), bool), None)['tokens'],
                             full['tokens'], atol=1e-5)
  chex.assert_shape(no_pe['stem'], (2, 3, 32))
  np.testing.assert_array_equal(full['pooled'], full['gap'])
  np.testing.assert_allclose(full['gap'], full['patches'].mean(axis=1), atol=1e-6)
  trunk = model.clone(final_norm=False)
  trunk_params = {k: v for k, v in params.items() if k != 'norm'}
  assert set(jax.eval_shape(trunk.init, jax.random.key(1), images)['params']) == set(
      trunk_params)
  out = trunk.apply({'params': trunk_params}, images)
  np.testing.assert_array_equal(out['tokens'], out['blocks'])
  np.testing.assert_allclose(out['blocks'], full['blocks'], atol=1e-5)
  with pytest.raises(ValueError, match="pool='max'"):
    vit.vit_from_variant('mu/8', pool='max').init(jax.random.key(1), images)


def test_attention_implementation_per_backend():
  impl = vit.attention_implementation
  assert impl('auto', jnp.bfloat16, 'gpu') == 'cudnn'
  assert impl('auto', jnp.float32, 'gpu') == 'xla'   # cuDNN has no f32 path
  assert impl('auto', jnp.bfloat16, 'tpu') == 'xla'
  assert impl('auto', jnp.float32, 'cpu') == 'xla'
  assert impl('xla', jnp.bfloat16, 'gpu') == 'xla'
  with pytest.raises(ValueError, match="attention='flash'"):
    impl('flash', jnp.float32, 'cpu')


@pytest.mark.slow
def test_float32_attention_is_jax_dot_product_attention():
  """The heads-first float32 attention computes jax.nn.dot_product_attention:
  outputs and gradients, with fewer queries than keys (as `rows` gives)."""
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (2, 3, 4, 8))
  k, v = (jax.random.normal(key, (2, 5, 4, 8)) for key in (kk, kv))
  ours = lambda *qkv: vit.dot_product_attention(*qkv, 'xla')
  theirs = lambda *qkv: jax.nn.dot_product_attention(*qkv, implementation='xla')
  np.testing.assert_allclose(ours(q, k, v), theirs(q, k, v), atol=1e-6)
  weighted = lambda f: lambda *qkv: (f(*qkv) * jnp.arange(8.)).sum()
  for g_ours, g_theirs in zip(jax.grad(weighted(ours), (0, 1, 2))(q, k, v),
                              jax.grad(weighted(theirs), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g_ours, g_theirs, atol=1e-5)


def test_gelu_is_exact():
  """x * Phi(x) and its derivative Phi(x) + x * phi(x), from math.erf in
  float64."""
  x = np.linspace(-6., 6., 1201)
  phi_cdf = np.array([0.5 * (1 + math.erf(t / math.sqrt(2))) for t in x])
  density = np.exp(-x**2 / 2) / math.sqrt(2 * math.pi)
  x32 = jnp.asarray(x, jnp.float32)
  np.testing.assert_allclose(vit.gelu(x32), x * phi_cdf, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(vit.gelu))(x32),
                             phi_cdf + x * density, rtol=1e-5, atol=1e-6)
