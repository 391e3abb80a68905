"""Tests of the online evaluator (evaluators/online.py)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from droppos_jax import masking, sharding
from droppos_jax.objectives import droppos as droppos_objective
from droppos_jax.data import demo
from droppos_jax.configs import common
from droppos_jax.evaluators import online
from droppos_jax.models import droppos as droppos_model

OBJ = droppos_objective.ObjectiveConfig(
    image_hw=(32, 32), patch_size=8,
    masking=masking.Masking('random', 0.75, 0.75), attentive=True, tau=0.1,
    sigma=1.0)


def numpy_knn(bank, bank_labels, queries, k, temperature, num_classes):
  """DINO's weighted k-NN vote, written plainly."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  sim = unit(queries) @ unit(bank).T
  preds = []
  for row in sim:
    top = np.argsort(-row)[:k]
    votes = np.zeros(num_classes)
    for j in top:
      votes[bank_labels[j]] += np.exp(row[j] / temperature)
    preds.append(votes.argmax())
  return np.array(preds)


@pytest.mark.slow
def test_knn_matches_numpy():
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(50, 8)).astype(np.float32)
  labels = rng.integers(0, 5, 50).astype(np.int32)
  queries = rng.normal(size=(30, 8)).astype(np.float32)
  for k, t in ((1, 0.07), (7, 0.07), (20, 0.5)):
    got = online.knn_predict(bank, labels, queries, k=k, temperature=t,
                             num_classes=5)
    np.testing.assert_array_equal(got, numpy_knn(bank, labels, queries, k, t, 5))
  # Padding rows of the bank never vote, however similar they are.
  padded = np.concatenate([bank, queries[:4] * 10])
  got = online.knn_predict(
      padded, np.concatenate([labels, np.full(4, 4, np.int32)]), queries, k=7,
      temperature=0.07, num_classes=5,
      bank_valid=np.concatenate([np.ones(50), np.zeros(4)]))
  np.testing.assert_array_equal(got, numpy_knn(bank, labels, queries, 7, .07, 5))


def small_config(**overrides):
  c = common.eval_config()
  c.enabled = True
  c.every_steps = 10
  c.num_bank_examples = 40      # 3 batches of 16, the last one padded
  c.num_query_examples = 20     # 2 batches, the last one padded
  c.batch_size = 16
  c.knn_k = 5
  c.bank_data.num_images = 48   # demo source: generate only what is read
  c.query_data.num_images = 24
  for key, value in overrides.items():
    c[key] = value
  return c


def init_params(model, seed):
  init = jax.jit(model.init)  # op-by-op init would compile every op
  return init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)),
              jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool))['params']


@pytest.mark.slow
def test_metrics_in_range_compiled_once_and_exact(monkeypatch):
  # encoder_features is traced once (bank and queries, one batch shape).
  monkeypatch.setattr(online, 'encoder_features',
                      chex.assert_max_traces(online.encoder_features, n=2))
  monkeypatch.setattr(online, 'query_step',
                      chex.assert_max_traces(online.query_step, n=1))
  monkeypatch.setattr(online, 'knn_correct',
                      chex.assert_max_traces(online.knn_correct, n=1))
  model = droppos_model.droppos_from_config('mu/8', 'tiny')
  mesh = sharding.make_mesh()
  evaluator = online.OnlineEvaluator(small_config(), model=model, obj_cfg=OBJ,
                                     mesh=mesh)
  assert evaluator.due(20) and not evaluator.due(15)
  assert evaluator.due(15, last_step=15) and not evaluator.due(15, last_step=16)
  for seed in (0, 1):
    params = jax.device_put(init_params(model, seed),
                            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    metrics = evaluator.run(params, step=10 * (seed + 1))
    assert set(metrics) == {'knn_top1', 'heldout_pos_acc',
                            'heldout_pos_acc_weighted', 'heldout_dist_err'}
    assert all(np.isfinite(v) for v in metrics.values())
    for key in ('knn_top1', 'heldout_pos_acc', 'heldout_pos_acc_weighted'):
      assert 0. <= metrics[key] <= 1.
  chex.clear_trace_counter()
  # Held-out accuracy equals the objective's own metric on the 20 real
  # images with the same fixed masks (padding excluded exactly).
  queries = [dict(b, ids_keep=ids, drop_mask=drop) for b, (ids, drop)
             in zip(evaluator.queries, evaluator.query_masks)]
  real = lambda name: np.concatenate([b[name] for b in queries])[:20]
  _, want = jax.jit(droppos_objective.masked_loss_fn, static_argnums=(1, 6))(
      jax.device_get(params), model, real('image'), real('ids_keep'),
      real('drop_mask'), 0., OBJ)
  np.testing.assert_allclose(metrics['heldout_pos_acc'], want['acc1_unweighted'],
                             atol=1e-6)
  np.testing.assert_allclose(metrics['heldout_pos_acc_weighted'], want['acc1'],
                             rtol=1e-5)
  np.testing.assert_array_equal(real('label'),
                                np.arange(20) % len(demo.CLASS_NAMES))


@pytest.mark.slow
def test_disabled_and_bad_configs():
  model = droppos_model.droppos_from_config('mu/8', 'tiny')
  mesh = sharding.make_mesh()
  default = common.eval_config()
  assert not default.enabled and default.knn_k == 20
  off = online.OnlineEvaluator(default, model=model, obj_cfg=OBJ, mesh=mesh)
  assert not off.due(default.every_steps)
  with pytest.raises(ValueError, match='disabled'):
    off.run({}, 0)
  for bad, match in ((dict(knn_feature='mean'), 'knn_feature'),
                     (dict(every_steps=0), 'every_steps'),
                     (dict(knn_k=0), 'knn_k'),
                     (dict(knn_temperature=0.), 'knn_temperature'),
                     (dict(evaluators=('knn', 'svm')),
                      r"eval.evaluators=\('knn', 'svm'\); registered: knn, "
                      'heldout_positions')):
    with pytest.raises(ValueError, match=match):
      online.OnlineEvaluator(small_config(**bad), model=model, obj_cfg=OBJ,
                             mesh=mesh)
  with pytest.raises(ValueError, match='exceeds the 8 bank'):
    online.OnlineEvaluator(small_config(num_bank_examples=8, knn_k=9),
                           model=model, obj_cfg=OBJ, mesh=mesh)


@pytest.mark.slow
def test_the_config_chooses_the_evaluations():
  model = droppos_model.droppos_from_config('mu/8', 'tiny')
  mesh = sharding.make_mesh()
  params = jax.device_put(init_params(model, 0), jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  both = online.OnlineEvaluator(small_config(), model=model, obj_cfg=OBJ,
                                mesh=mesh).run(params, 0)
  only = online.OnlineEvaluator(
      small_config(evaluators=('heldout_positions',)), model=model,
      obj_cfg=OBJ, mesh=mesh).run(params, 0)
  assert set(only) == {'heldout_pos_acc', 'heldout_pos_acc_weighted',
                       'heldout_dist_err'}
  assert only == {k: both[k] for k in only}
