"""Cheap evaluation inside pre-training: k-NN accuracy of the encoder's
features and DropPos position accuracy on held-out images.

A few tens of fixed images are read once, at construction, and kept on the
devices; held-out masks are drawn once from a fixed key, so successive
evaluations differ only by the parameters. Each batch is one jitted forward
with a static shape (the last batch is padded and masked out), so every
function compiles once.
"""
from __future__ import annotations

import functools
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from droppos_jax.objectives import droppos as droppos_objective
from droppos_jax.data import device, sources
from droppos_jax.errors import UserError
from droppos_jax.models import droppos as droppos_model

FEATURES = ('cls', 'gap')


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_predict(bank_feats, bank_labels, query_feats, *, k: int,
                temperature: float, num_classes: int, bank_valid=None):
  """Class predictions [Q] of a weighted k-NN vote (DINO): the k most
  cosine-similar bank entries vote for their label with exp(cos / T)."""
  sim = _normalize(query_feats) @ _normalize(bank_feats).T
  if bank_valid is not None:
    sim = jnp.where(bank_valid[None, :] > 0, sim, -jnp.inf)
  top_sim, top_idx = jax.lax.top_k(sim, k)
  votes = jax.nn.one_hot(bank_labels[top_idx], num_classes) * jnp.exp(
      top_sim / temperature)[..., None]
  return jnp.argmax(votes.sum(axis=1), axis=-1)


def knn_correct(bank_feats, bank_labels, bank_valid, query_feats, query_labels,
                query_valid, *, k, temperature, num_classes):
  """Number of real queries the k-NN vote gets right; every argument is a
  list of per-batch arrays (concatenated here, inside jit)."""
  cat = jnp.concatenate
  pred = knn_predict(cat(bank_feats), cat(bank_labels), cat(query_feats), k=k,
                     temperature=temperature, num_classes=num_classes,
                     bank_valid=cat(bank_valid))
  return ((pred == cat(query_labels)) * cat(query_valid)).sum()


def encoder_features(model, feature: str, params, images):
  """[B, D] float32 'cls' or 'gap' feature of the full (unmasked) pass of
  a pre-training model (any objective's: each has `full_features`)."""
  cls, patches = model.apply({'params': params}, images,
                             method='full_features')
  return cls if feature == 'cls' else patches.mean(axis=1)


def query_step(model: droppos_model.DropPos, cfg: droppos_objective.ObjectiveConfig,
               params, images, valid, ids_keep, drop_mask):
  """Count-weighted position metrics of one held-out batch. Padding rows
  (valid 0) drop no PE, so they count nowhere."""
  drop_mask = drop_mask & (valid[:, None] > 0)
  _, m = droppos_objective.masked_loss_fn(params, model, images, ids_keep, drop_mask,
                                 0., cfg)
  dropped = drop_mask.sum()
  return {'pos_acc': m['acc1_unweighted'] * dropped,
          'pos_acc_weighted': m['acc1'] * m['weight_sum'],
          'dist_err': m['dist_err'] * dropped,
          'dropped': dropped, 'weight_sum': m['weight_sum']}


def knn_metrics(ev: 'OnlineEvaluator', params) -> dict[str, float]:
  """k-NN top-1 of the held-out images' labels against the bank's."""
  column = lambda batches, name: [b[name] for b in batches]
  features = lambda batches: [ev.features_fn(params, b['image'])
                              for b in batches]
  correct = ev.knn_fn(
      features(ev.bank), column(ev.bank, 'label'), column(ev.bank, 'mask'),
      features(ev.queries), column(ev.queries, 'label'),
      column(ev.queries, 'mask'))
  return {'knn_top1': float(correct) / ev.num_queries}


def heldout_position_metrics(ev: 'OnlineEvaluator', params) -> dict[str, float]:
  """Position accuracy (hard labels; and attentive-weighted, as training
  logs acc1) and grid distance error on the held-out images' PE-dropped
  tokens, under fixed masks."""
  outs = jax.device_get([ev.query_fn(params, b['image'], b['mask'], *masks)
                         for b, masks in zip(ev.queries, ev.query_masks)])
  sums = {k: sum(float(o[k]) for o in outs) for k in outs[0]}
  return {'heldout_pos_acc': sums['pos_acc'] / sums['dropped'],
          'heldout_pos_acc_weighted': sums['pos_acc_weighted'] / sums['weight_sum'],
          'heldout_dist_err': sums['dist_err'] / sums['dropped']}


# name -> (metrics(evaluator, params), the model class it needs or None):
# the online evaluations a pre-training config chooses in `eval.evaluators`;
# each reads the evaluator's fixed data.
ONLINE_EVALUATORS = {
    'knn': (knn_metrics, None),
    'heldout_positions': (heldout_position_metrics, droppos_model.DropPos),
}


class OnlineEvaluator:
  """The online evaluations `eval.evaluators` names (ONLINE_EVALUATORS),
  every `every_steps` steps, on fixed data read once.

    evaluator = OnlineEvaluator(config.eval, model=model, obj_cfg=obj_cfg,
                                mesh=mesh)
    if evaluator.due(step):
      metrics = evaluator.run(state['params'], step)

  With the defaults, `run` returns {'knn_top1', 'heldout_pos_acc' (hard
  labels, PE-dropped tokens, unweighted), 'heldout_pos_acc_weighted'
  (attentive weights, as training logs acc1), 'heldout_dist_err' (grid
  units)} as floats. The evaluations read `bank` and `queries` (lists of
  device batches), the queries' fixed `query_masks` (drawn when first
  read, by the evaluations of PE-dropped positions) and the jitted
  `features_fn`, `query_fn` and `knn_fn`.
  """

  def __init__(self, config_eval: ml_collections.ConfigDict, *,
               model: Any, obj_cfg: Any,
               mesh: jax.sharding.Mesh):
    c = config_eval
    self.enabled = bool(c.enabled)
    self.every_steps = int(c.every_steps)
    self.evaluators = tuple(c.evaluators)
    unknown = [n for n in self.evaluators if n not in ONLINE_EVALUATORS]
    if unknown or not self.evaluators:
      raise UserError(f'eval.evaluators={self.evaluators!r}; registered: '
                      f'{", ".join(ONLINE_EVALUATORS)}.')
    if self.every_steps < 1:
      raise UserError(f'eval.every_steps={c.every_steps} must be >= 1.')
    for name in self.evaluators:
      needs = ONLINE_EVALUATORS[name][1]
      if needs is not None and not isinstance(model, needs):
        raise UserError(f'eval.evaluators names {name!r}, which needs a '
                        f'{needs.__name__} model, not {type(model).__name__}; '
                        'drop it from eval.evaluators.')
    if c.knn_feature not in FEATURES:
      raise UserError(f'eval.knn_feature={c.knn_feature!r}; valid: {FEATURES}.')
    if not c.knn_temperature > 0:
      raise UserError(f'eval.knn_temperature={c.knn_temperature} must be > 0.')
    if c.knn_k < 1:
      raise UserError(f'eval.knn_k={c.knn_k} must be >= 1.')
    if not self.enabled:
      return
    start = time.perf_counter()
    self._load(c, obj_cfg, mesh)
    self.features_fn = jax.jit(functools.partial(encoder_features, model,
                                                 c.knn_feature))
    self.query_fn = jax.jit(functools.partial(query_step, model, obj_cfg))
    logging.info('Online eval (%s): %d bank / %d query images, every %d '
                 'steps (data ready in %.1f s).', ', '.join(self.evaluators),
                 self.num_bank, self.num_queries, self.every_steps,
                 time.perf_counter() - start)

  def _load(self, c, obj_cfg: Any, mesh: jax.sharding.Mesh) -> None:
    """The bank and the queries on the devices and the k-NN vote."""
    load = lambda data, num: list(device.eval_batches(
        sources.open_source(data), image_hw=obj_cfg.image_hw,
        batch_size=c.batch_size, num_examples=num, mesh=mesh))
    self.bank = load(c.bank_data, c.num_bank_examples)
    self.queries = load(c.query_data, c.num_query_examples)
    self._obj_cfg, self._seed = obj_cfg, c.seed
    host = lambda batches, name: np.concatenate([
        multihost_utils.process_allgather(b[name], tiled=True)
        for b in batches])
    self.num_bank = int(host(self.bank, 'mask').sum())
    self.num_queries = int(host(self.queries, 'mask').sum())
    if c.knn_k > self.num_bank:
      raise UserError(f'eval.knn_k={c.knn_k} exceeds the {self.num_bank} bank '
                      'examples.')
    num_classes = int(max(host(self.bank, 'label').max(),
                          host(self.queries, 'label').max())) + 1
    self.knn_fn = jax.jit(functools.partial(
        knn_correct, k=int(c.knn_k), temperature=float(c.knn_temperature),
        num_classes=num_classes))

  @functools.cached_property
  def query_masks(self) -> list[tuple[jax.Array, jax.Array]]:
    """(ids_keep, drop_mask) of each query batch, fixed: batch i's from
    fold_in(key(eval.seed), i)."""
    sample = jax.jit(functools.partial(
        self._obj_cfg.masking.sample, batch_size=self.queries[0]['image'].shape[0],
        grid_hw=self._obj_cfg.grid),
                     out_shardings=self.queries[0]['image'].sharding)
    return [sample(jax.random.fold_in(jax.random.key(self._seed), i))
            for i in range(len(self.queries))]

  def due(self, step: int, last_step: int | None = None) -> bool:
    """Every `every_steps` steps, and at `last_step` (the run's end)."""
    return self.enabled and (step % self.every_steps == 0 or step == last_step)

  def run(self, params: Any, step: int) -> dict[str, float]:
    """Evaluates `params` (the DropPos tree); `step` is for the log only."""
    if not self.enabled:
      raise ValueError('The online evaluator is disabled (eval.enabled=False).')
    start = time.perf_counter()
    metrics = {}
    for name in self.evaluators:
      metrics.update(ONLINE_EVALUATORS[name][0](self, params))
    logging.info('[%d] online eval: %s, %.1f s.', step, ', '.join(
        f'{k} {v:.4g}' for k, v in metrics.items()),
                 time.perf_counter() - start)
    return metrics
