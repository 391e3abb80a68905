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
