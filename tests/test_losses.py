import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from droppos_jax import losses

GRID = (2, 3)


def np_targets(h, w, sigma):
  """Reference by explicit loops: exp(-d^2/sigma^2), rows summing to 1."""
  n = h * w
  t = np.zeros((n, n))
  for a in range(n):
    for b in range(n):
      d2 = (a // w - b // w)**2 + (a % w - b % w)**2
      t[a, b] = np.exp(-d2 / sigma**2)
  return t / t.sum(1, keepdims=True)


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.slow
def test_targets_by_hand_on_2x3_grid():
  t = np.asarray(losses.smoothing_targets(GRID, 1.0))
  # Row 0 = (0,0): neighbours at d^2 = 0,1,4,1,2,5.
  raw = np.exp(-np.array([0., 1., 4., 1., 2., 5.]))
  np.testing.assert_allclose(t[0], raw / raw.sum(), rtol=1e-6)
  np.testing.assert_allclose(t, np_targets(2, 3, 1.0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(losses.smoothing_targets((3, 5), 0.7),
                             np_targets(3, 5, 0.7), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)


def test_sigma_zero_is_identity_also_under_jit():
  np.testing.assert_array_equal(losses.smoothing_targets(GRID, 0.0), np.eye(6))
  jitted = jax.jit(lambda s: losses.smoothing_targets(GRID, s))
  np.testing.assert_array_equal(jitted(0.0), np.eye(6))
  np.testing.assert_allclose(jitted(1.0), np_targets(2, 3, 1.0), rtol=1e-5)
  assert np.isfinite(np.asarray(jitted(1e-4))).all()


def test_official_grid_reproduces_reference_quirk():
  s, sigma = 4, 1.0
  t = np.asarray(losses.smoothing_targets(GRID, sigma, official_grid_width=s))
  w = np.zeros((s * s, s * s))
  for a in range(s * s):
    for b in range(s * s):
      w[a, b] = np.exp(-((a // s - b // s)**2 + (a % s - b % s)**2) / sigma**2)
  w /= w.sum(0, keepdims=True)
  np.testing.assert_allclose(t, w[:6, :6], rtol=1e-5, atol=1e-7)
  # The true vertical neighbour of (0,0) on the 2x3 grid (index 3) is at
  # distance 3 on the 4-wide grid: nearly no weight, as in the reference.
  assert t[0, 3] < t[0, 1] * 1e-3
  with pytest.raises(ValueError, match='official_grid_width=2'):
    losses.smoothing_targets(GRID, sigma, official_grid_width=2)


def test_negative_sigma_rejected():
  with pytest.raises(ValueError, match='sigma=-0.5'):
    losses.smoothing_targets(GRID, -0.5)


@pytest.mark.slow
def test_attentive_weights_of_visible_patches_are_the_renormalised_full_map():
  """The reference takes softmax(cos/tau) over all N patches, gathers the K
  visible ones and renormalises; given the K visible features we must get
  exactly that, and given all N the plain map."""
  rng = np.random.default_rng(0)
  cls, patches = rng.normal(size=(2, 8)), rng.normal(size=(2, 6, 8))
  ids = np.array([[4, 0, 2], [1, 5, 3]], np.int32)
  tau = 0.1
  full, renormalised = [], []
  for b in range(2):
    cos = patches[b] @ cls[b] / np.linalg.norm(patches[b], axis=1) / np.linalg.norm(cls[b])
    a = np.exp(cos / tau) / np.exp(cos / tau).sum()
    full.append(a)
    renormalised.append(a[ids[b]] / a[ids[b]].sum())
  visible = jnp.asarray(np.take_along_axis(patches, ids[..., None], axis=1))
  got = losses.attentive_weights(jnp.asarray(cls), visible, tau)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np.array(renormalised), rtol=1e-5)
  np.testing.assert_allclose(
      losses.attentive_weights(jnp.asarray(cls), jnp.asarray(patches), tau),
      np.array(full), rtol=1e-5)
  g = jax.grad(lambda c: losses.attentive_weights(c, visible, tau)[:, 0].sum())(
      jnp.asarray(cls))
  np.testing.assert_array_equal(g, 0.)
  with pytest.raises(ValueError, match='tau=0'):
    losses.attentive_weights(jnp.asarray(cls), visible, 0)


def _example():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 6)).astype(np.float32)
  ids = np.array([[4, 0, 2], [1, 5, 3]], np.int32)
  drop = np.array([[True, False, True], [True, True, False]])
  weights = np.array([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3]], np.float32)
  return logits, ids, drop, weights


def test_loss_matches_numpy_and_metrics():
  logits, ids, drop, weights = _example()
  sigma = 0.8
  loss, m = losses.droppos_loss(logits, ids, drop, grid_hw=GRID, sigma=sigma,
                                token_weights=weights)
  t = np_targets(2, 3, sigma)
  ce = -(t[ids] * np_log_softmax(logits.astype(np.float64))).sum(-1)
  w = drop * weights
  np.testing.assert_allclose(loss, (w * ce).sum() / w.sum(), rtol=1e-5)
  pred = logits.argmax(-1)
  correct = pred == ids
  np.testing.assert_allclose(m['acc1'], (w * correct).sum() / w.sum(), rtol=1e-6)
  np.testing.assert_allclose(m['acc1_unweighted'],
                             (drop * correct).sum() / drop.sum(), rtol=1e-6)
  np.testing.assert_allclose(m['acc1_kept'],
                             (~drop * correct).sum() / (~drop).sum(), rtol=1e-6)
  dist = np.hypot(pred // 3 - ids // 3, pred % 3 - ids % 3)
  np.testing.assert_allclose(m['dist_err'], (drop * dist).sum() / drop.sum(),
                             rtol=1e-6)
  # Without token weights every dropped token counts equally.
  loss_u, _ = losses.droppos_loss(logits, ids, drop, grid_hw=GRID, sigma=sigma)
  np.testing.assert_allclose(loss_u, (drop * ce).sum() / drop.sum(), rtol=1e-5)


def test_loss_ignores_kept_pe_tokens():
  logits, ids, drop, weights = _example()
  changed = logits.copy()
  changed[~drop] = np.random.default_rng(5).normal(size=changed[~drop].shape) * 50
  a, _ = losses.droppos_loss(logits, ids, drop, grid_hw=GRID, sigma=1.,
                             token_weights=weights)
  b, _ = losses.droppos_loss(changed, ids, drop, grid_hw=GRID, sigma=1.,
                             token_weights=weights)
  np.testing.assert_array_equal(a, b)
  grad = jax.grad(lambda l: losses.droppos_loss(
      l, ids, drop, grid_hw=GRID, sigma=1.)[0])(jnp.asarray(logits))
  np.testing.assert_array_equal(np.asarray(grad)[~drop], 0.)


def test_loss_rejects_wrong_class_count():
  logits, ids, drop, _ = _example()
  with pytest.raises(ValueError, match='6 positions'):
    losses.droppos_loss(logits[..., :5], ids, drop, grid_hw=GRID, sigma=1.)


def test_sigma_schedules():
  lin_ep = losses.make_sigma_schedule('linear_epoch', 1.0, total_steps=100,
                                      steps_per_epoch=10)
  np.testing.assert_allclose([lin_ep(s) for s in (0, 9, 10, 55, 99)],
                             [1.0, 1.0, 0.9, 0.5, 0.1], rtol=1e-6)
  lin = losses.make_sigma_schedule('linear', 2.0, total_steps=100, steps_per_epoch=10)
  np.testing.assert_allclose([lin(0), lin(25), lin(100)], [2.0, 1.5, 0.0], atol=1e-6)
  cos = losses.make_sigma_schedule('cosine', 1.0, total_steps=100, steps_per_epoch=10)
  np.testing.assert_allclose([cos(0), cos(50), cos(100)], [1.0, 0.5, 0.0], atol=1e-6)
  const = losses.make_sigma_schedule('constant', 0.5, total_steps=100,
                                     steps_per_epoch=10)
  np.testing.assert_allclose(const(77), 0.5)
  chex.assert_shape(jax.jit(lin_ep)(jnp.int32(3)), ())
  with pytest.raises(ValueError, match="Unknown sigma schedule 'step'"):
    losses.make_sigma_schedule('step', 1.0, total_steps=10, steps_per_epoch=1)
  with pytest.raises(ValueError, match='sigma=-1'):
    losses.make_sigma_schedule('linear', -1, total_steps=10, steps_per_epoch=1)
