r"""DropPos pre-training.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/pretrain.py:variant=B/16,epochs=800 \
      --workdir gs://bucket/run --config.batch_size=4096

Rerunning with the same --workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from droppos_jax import checkpoint, input_pipeline, launch, metric_logging
from droppos_jax import optim, pretrain, sharding
from droppos_jax.evaluators import online
from droppos_jax.losses import make_sigma_schedule
from droppos_jax.models import droppos as droppos_model

def objective_config(config) -> pretrain.ObjectiveConfig:
  obj = config.objective
  hw = launch.image_hw(config)
  patch = droppos_model.vit.decode_variant(config.model.variant).patch_size
  return pretrain.ObjectiveConfig(
      image_hw=hw, patch_size=patch, mask_ratio=obj.mask_ratio,
      pos_drop_ratio=obj.pos_drop_ratio, attentive=obj.attentive, tau=obj.tau,
      # The reference builds its smoothing map on a (size // 14)-wide grid.
      official_grid_width=hw[1] // 14 if obj.official_quirks else None)


def build_model(config) -> droppos_model.DropPos:
  return droppos_model.droppos_from_model_config(config.model)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) pre-training; returns {'losses': {step: loss}, ...}."""
  # ------------------------------------------------------------------ checks
  # Everything a user can get wrong is checked here, before any compile.
  obj_cfg = objective_config(config)
  model = build_model(config)
  if config.grad_accum_steps < 1:
    raise ValueError(f'grad_accum_steps={config.grad_accum_steps} must be >= 1.')
  for name in ('log_every', 'ckpt_every'):
    if config[name] < 1:
      raise ValueError(f'{name}={config[name]} must be >= 1.')
  input_pipeline.validate_data_config(config.data)
  mesh = sharding.make_mesh(config.num_devices)
  sharding.check_batch_divides(config.batch_size, mesh)
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(f'batch_size={config.batch_size} is not divisible by '
                     f'grad_accum_steps={config.grad_accum_steps}.')
  sharding.check_batch_divides(config.batch_size // config.grad_accum_steps,
                               mesh, 'batch_size / grad_accum_steps')
  steps_per_epoch, total_steps, warmup_steps = launch.schedule_lengths(
      config, input_pipeline.num_train_examples(config.data))
  peak_lr = config.optim.blr * config.batch_size / 256
  lr_fn = optim.lr_schedule(peak_lr, total_steps=total_steps,
                            warmup_steps=warmup_steps, min_lr=config.optim.min_lr)
  tx = optim.make_optimizer(config.optim, lr_fn)
  sigma_fn = make_sigma_schedule(
      config.objective.sigma_schedule, config.objective.sigma,
      total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  evaluator = online.OnlineEvaluator(config.eval, model=model, obj_cfg=obj_cfg,
                                     mesh=mesh)

  is_main = jax.process_index() == 0
  launch.save_config(config, workdir)
  logging.info('%d steps (%d/epoch, %d warm-up), peak lr %.3g, grid %s, '
               'mesh %s, sharding %s.', total_steps, steps_per_epoch,
               warmup_steps, peak_lr, obj_cfg.grid, dict(mesh.shape),
               config.sharding)

  # ------------------------------------------------------- model and state
  hw = obj_cfg.image_hw

  def init_state():
    params = model.init(jax.random.key(config.seed), jnp.zeros((1, *hw, 3)),
                        jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool))
    params = params['params']
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': tx.init(params)}

  abstract = jax.eval_shape(init_state)
  state_sh = sharding.state_shardings(abstract, mesh, config.sharding)
  logging.info('Parameters: %.2fM (projector %.2fM).',
               sum(x.size for x in jax.tree.leaves(abstract['params'])) / 1e6,
               sum(x.size for x in jax.tree.leaves(
                   abstract['params']['projector'])) / 1e6)

  # ---------------------------------------------------------------- restore
  with checkpoint.Checkpoints(os.path.join(workdir, 'checkpoints'),
                              max_to_keep=config.keep_ckpts) as ckpts:
    model_id = {'model': config.model.to_dict(), 'image_hw': list(hw)}
    start = ckpts.latest_step()
    if start is not None:
      state, meta = ckpts.restore_run(
          start, checkpoint.abstract_with_shardings(abstract, state_sh),
          model_id)
      data_step = meta['data_step']
      logging.info('Resumed from step %d (sigma %.4f).', start, meta['sigma'])
    else:
      state = jax.jit(init_state, out_shardings=state_sh)()
      start = data_step = 0

    # ------------------------------------------------------------------- data
    local_batch = config.batch_size // jax.process_count()
    batches = input_pipeline.global_batches(
        input_pipeline.make_pretrain_iterator(
            config.data, image_size=hw, local_batch_size=local_batch,
            seed=config.seed, start_step=data_step,
            process_index=jax.process_index(),
            process_count=jax.process_count()),
        sharding.batch_sharding(mesh))

    # --------------------------------------------------------------- step fn
    step_fn = pretrain.make_train_step(
        model, tx, obj_cfg, sigma_fn=sigma_fn, lr_fn=lr_fn, seed=config.seed,
        accum_steps=config.grad_accum_steps)
    train_step = jax.jit(
        step_fn, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, None), donate_argnums=(0,))

    # ------------------------------------------------------------------ loop
    preemption = launch.PreemptionWatch()
    logger = metric_logging.MetricLogger(
        workdir, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        global_batch=config.batch_size, is_main=is_main)
    eval_logger = metric_logging.MetricLogger(
        workdir, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        global_batch=config.batch_size, is_main=is_main, prefix='eval',
        fields=metric_logging.ONLINE_EVAL_FIELDS)
    recorder = metric_logging.LaggedRecorder(
        logger, start=start, log_every=config.log_every,
        last_good_step=ckpts.latest_step, drop_keys=('weight_sum',))

    step = start
    stop = False
    try:
      for step in range(start + 1, total_steps + 1):
        state, metrics = train_step(state, next(batches)['image'])
        recorder.push(step, metrics)
        stop = preemption.should_stop(step)
        if step % config.ckpt_every == 0 or step == total_steps or stop:
          recorder.flush()
          ckpts.save(step, state, {
              'step': step, 'data_step': step, 'sigma': float(metrics['sigma']),
              'seed': config.seed, **model_id})
        if stop:
          logging.warning('Preemption signal: saved step %d, exiting.', step)
          break
        if evaluator.due(step):  # before the next step donates the params
          eval_logger.add(evaluator.run(state['params'], step))
          eval_logger.flush(step)
    finally:
      logger.close()
      eval_logger.close()
  return {'losses': recorder.losses, 'last_step': step,
          'total_steps': total_steps, 'preempted': stop}


def main():
  launch.run(train)


if __name__ == '__main__':
  main()
