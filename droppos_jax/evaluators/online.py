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

from droppos_jax import pretrain
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


def encoder_features(model: droppos_model.DropPos, feature: str, params,
                     images):
  """[B, D] float32 'cls' or 'gap' feature of the full (unmasked) pass."""
  cls, patches = model.apply({'params': params}, images,
                             method=droppos_model.DropPos.full_features)
  return cls if feature == 'cls' else patches.mean(axis=1)


def query_step(model: droppos_model.DropPos, cfg: pretrain.ObjectiveConfig,
               feature: str, params, images, valid, ids_keep, drop_mask):
  """k-NN features and count-weighted position metrics of one held-out batch.

  Padding rows (valid 0) drop no PE, so they count nowhere; the full pass
  is shared between the features and the attentive weights.
  """
  feats = encoder_features(model, feature, params, images)
  drop_mask = drop_mask & (valid[:, None] > 0)
  _, m = pretrain.masked_loss_fn(params, model, images, ids_keep, drop_mask,
                                 0., cfg)
  dropped = drop_mask.sum()
  sums = {'pos_acc': m['acc1_unweighted'] * dropped,
          'pos_acc_weighted': m['acc1'] * m['weight_sum'],
          'dist_err': m['dist_err'] * dropped,
          'dropped': dropped, 'weight_sum': m['weight_sum']}
  return feats, sums


class OnlineEvaluator:
  """k-NN top-1 and held-out position accuracy, every `every_steps` steps.

    evaluator = OnlineEvaluator(config.eval, model=model, obj_cfg=obj_cfg,
                                mesh=mesh)
    if evaluator.due(step):
      metrics = evaluator.run(state['params'], step)

  `run` returns {'knn_top1', 'heldout_pos_acc' (hard labels, PE-dropped
  tokens, unweighted), 'heldout_pos_acc_weighted' (attentive weights, as
  training logs acc1), 'heldout_dist_err' (grid units)} as floats.
  """

  def __init__(self, config_eval: ml_collections.ConfigDict, *,
               model: droppos_model.DropPos, obj_cfg: pretrain.ObjectiveConfig,
               mesh: jax.sharding.Mesh):
    c = config_eval
    self.enabled = bool(c.enabled)
    self.every_steps = int(c.every_steps)
    if self.every_steps < 1:
      raise UserError(f'eval.every_steps={c.every_steps} must be >= 1.')
    if c.knn_feature not in FEATURES:
      raise UserError(f'eval.knn_feature={c.knn_feature!r}; valid: {FEATURES}.')
    if not c.knn_temperature > 0:
      raise UserError(f'eval.knn_temperature={c.knn_temperature} must be > 0.')
    if c.knn_k < 1:
      raise UserError(f'eval.knn_k={c.knn_k} must be >= 1.')
    if not self.enabled:
      return
    start = time.perf_counter()
    load = lambda data, num: list(device.eval_batches(
        sources.open_source(data), image_hw=obj_cfg.image_hw, batch_size=c.batch_size,
        num_examples=num, mesh=mesh))
    self._bank = load(c.bank_data, c.num_bank_examples)
    self._queries = load(c.query_data, c.num_query_examples)
    # Fixed held-out masks: batch i uses fold_in(key(seed), i).
    sample = jax.jit(functools.partial(obj_cfg.masking.sample,
                                       batch_size=c.batch_size,
                                       grid_hw=obj_cfg.grid),
                     out_shardings=self._queries[0]['image'].sharding)
    for i, batch in enumerate(self._queries):
      batch['ids_keep'], batch['drop_mask'] = sample(
          jax.random.fold_in(jax.random.key(c.seed), i))
    host = lambda batches, name: np.concatenate([
        multihost_utils.process_allgather(b[name], tiled=True)
        for b in batches])
    num_bank = int(host(self._bank, 'mask').sum())
    self._num_queries = int(host(self._queries, 'mask').sum())
    if c.knn_k > num_bank:
      raise UserError(f'eval.knn_k={c.knn_k} exceeds the {num_bank} bank '
                       'examples.')
    num_classes = int(max(host(self._bank, 'label').max(),
                          host(self._queries, 'label').max())) + 1
    self._bank_fn = jax.jit(functools.partial(encoder_features, model,
                                              c.knn_feature))
    self._query_fn = jax.jit(functools.partial(query_step, model, obj_cfg,
                                               c.knn_feature))
    self._knn_fn = jax.jit(functools.partial(
        knn_correct, k=int(c.knn_k), temperature=float(c.knn_temperature),
        num_classes=num_classes))
    logging.info('Online eval: %d bank / %d query images, every %d steps '
                 '(data ready in %.1f s).', num_bank, self._num_queries,
                 self.every_steps, time.perf_counter() - start)

  def due(self, step: int, last_step: int | None = None) -> bool:
    """Every `every_steps` steps, and at `last_step` (the run's end)."""
    return self.enabled and (step % self.every_steps == 0 or step == last_step)

  def run(self, params: Any, step: int) -> dict[str, float]:
    """Evaluates `params` (the DropPos tree); `step` is for the log only."""
    if not self.enabled:
      raise ValueError('The online evaluator is disabled (eval.enabled=False).')
    start = time.perf_counter()
    bank = [self._bank_fn(params, b['image']) for b in self._bank]
    outs = [self._query_fn(params, b['image'], b['mask'], b['ids_keep'],
                           b['drop_mask']) for b in self._queries]
    column = lambda batches, name: [b[name] for b in batches]
    correct = self._knn_fn(
        bank, column(self._bank, 'label'), column(self._bank, 'mask'),
        [feats for feats, _ in outs], column(self._queries, 'label'),
        column(self._queries, 'mask'))
    sums = {k: sum(float(s[k]) for s in jax.device_get([s for _, s in outs]))
            for k in outs[0][1]}
    metrics = {
        'knn_top1': float(correct) / self._num_queries,
        'heldout_pos_acc': sums['pos_acc'] / sums['dropped'],
        'heldout_pos_acc_weighted': sums['pos_acc_weighted'] / sums['weight_sum'],
        'heldout_dist_err': sums['dist_err'] / sums['dropped']}
    logging.info('[%d] online eval: k-NN top-1 %.1f%%, held-out position '
                 'top-1 %.1f%% (weighted %.1f%%), %.1f s.', step,
                 100 * metrics['knn_top1'], 100 * metrics['heldout_pos_acc'],
                 100 * metrics['heldout_pos_acc_weighted'],
                 time.perf_counter() - start)
    return metrics
