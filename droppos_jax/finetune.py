r"""Fine-tuning and linear probing of a (DropPos pre-trained) ViT, spec §7.

  python finetune.py --config configs/finetune.py:demo --workdir runs/ft_demo \
      --config.init.path=runs/demo
  python finetune.py --config configs/finetune.py:variant=B/16 \
      --workdir gs://bucket/ft_b16 --config.init.path=gs://bucket/droppos_b16
  python finetune.py --config configs/linear_probe.py:variant=B/16 \
      --workdir gs://bucket/lin_b16 --config.init.path=droppos_b16.pth

`init.path` is a pre-training workdir, a PyTorch/safetensors/npz file (DropPos,
MAE or a fine-tuned one) or a converted .msgpack; empty means random init.
Rerunning with the same --workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from droppos_jax import checkpoint, classification, finetune_data, input_pipeline
from droppos_jax import launch, metric_logging, optim, sharding
from droppos_jax.models import vit


def check_mix_config(mix) -> None:
  for name in ('mixup_alpha', 'cutmix_alpha'):
    if mix[name] < 0:
      raise ValueError(f'mix.{name}={mix[name]} must be >= 0 (0 = off).')
  for name in ('switch_prob', 'prob'):
    if not 0 <= mix[name] <= 1:
      raise ValueError(f'mix.{name}={mix[name]} is a probability in [0, 1].')
  if not 0 <= mix.label_smoothing < 1:
    raise ValueError(f'mix.label_smoothing={mix.label_smoothing} must be in '
                     '[0, 1).')


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) fine-tuning or linear probing; returns
  {'losses': {step: loss}, 'evals': {step: {'acc1', 'acc5', 'loss'}}, ...}."""
  # ------------------------------------------------------------------ checks
  # Everything a user can get wrong is checked here, before any compile.
  hw = launch.image_hw(config)
  patch = vit.decode_variant(config.model.variant).patch_size
  vit.grid_size(hw, patch)
  for name in ('log_every', 'ckpt_every', 'eval_every_epochs'):
    if config[name] < 1:
      raise ValueError(f'{name}={config[name]} must be >= 1.')
  input_pipeline.validate_data_config(config.data)
  input_pipeline.validate_data_config(config.val_data)
  finetune_data.validate_augment_config(config.augment)
  check_mix_config(config.mix)
  num_classes = config.num_classes or finetune_data.num_classes(config.data)
  if num_classes < 2:
    raise ValueError(f'{num_classes} class(es): a classifier needs >= 2 (set '
                     'num_classes or use a folder with a subfolder per class).')
  model = classification.build_model(config, num_classes)
  mesh = sharding.make_mesh(config.num_devices)
  sharding.check_batch_divides(config.batch_size, mesh)
  sharding.check_batch_divides(config.eval_batch_size, mesh, 'eval_batch_size')
  steps_per_epoch, total_steps, warmup_steps = launch.schedule_lengths(
      config, input_pipeline.num_train_examples(config.data))
  peak_lr = config.optim.blr * config.batch_size / 256
  lr_fn = optim.lr_schedule(peak_lr, total_steps=total_steps,
                            warmup_steps=warmup_steps, min_lr=config.optim.min_lr)
  dummy = jnp.zeros((1, *hw, 3))
  abstract_vars = jax.eval_shape(
      lambda: model.init(jax.random.key(config.seed), dummy))
  tx = classification.make_optimizer(config, lr_fn, abstract_vars['params'])
  with checkpoint.Checkpoints(os.path.join(workdir, 'checkpoints'),
                              max_to_keep=config.keep_ckpts) as ckpts:
    start = ckpts.latest_step()
    loaded = {}
    if start is None and config.init.path:
      loaded = classification.load_init(config.init, config.protocol,
                                  abstract_vars['params'], hw, patch)
    elif start is None:
      logging.info('No init.path: training from random initialisation.')

    is_main = jax.process_index() == 0
    launch.save_config(config, workdir)
    logging.info('%s: %d classes, %d steps (%d/epoch, %d warm-up), peak lr %.3g, '
                 'image %s, mesh %s, sharding %s.', config.protocol, num_classes,
                 total_steps, steps_per_epoch, warmup_steps, peak_lr, hw,
                 dict(mesh.shape), config.sharding)

    # ------------------------------------------------------- model and state
    def init_state(loaded):
      variables = model.init(jax.random.key(config.seed), dummy)
      params = {**variables['params'], **loaded}
      state = {'step': jnp.zeros((), jnp.int32), 'params': params,
               'opt_state': tx.init(params)}
      if 'batch_stats' in variables:
        state['batch_stats'] = variables['batch_stats']
      return state

    abstract = jax.eval_shape(init_state, loaded)
    state_sh = sharding.state_shardings(abstract, mesh, config.sharding)
    logging.info('Parameters: %.2fM.', sum(
        x.size for x in jax.tree.leaves(abstract['params'])) / 1e6)

    # ---------------------------------------------------------------- restore
    model_id = {'protocol': config.protocol, 'model': config.model.to_dict(),
                'num_classes': num_classes, 'image_hw': list(hw)}
    if start is not None:
      state, meta = ckpts.restore_run(
          start, checkpoint.abstract_with_shardings(abstract, state_sh),
          model_id)
      data_step = meta['data_step']
      logging.info('Resumed from step %d.', start)
    else:
      state = jax.jit(init_state, out_shardings=state_sh)(loaded)
      start = data_step = 0
    del loaded

    # ------------------------------------------------------------------- data
    local_batch = config.batch_size // jax.process_count()
    batch_sh = sharding.batch_sharding(mesh)
    batches = input_pipeline.global_batches(
        finetune_data.make_train_iterator(
            config.data, config.augment, image_size=hw,
            local_batch_size=local_batch, seed=config.seed, start_step=data_step,
            process_index=jax.process_index(),
            process_count=jax.process_count()), batch_sh)

    # -------------------------------------------------------------- step fns
    train_step = jax.jit(
        classification.make_train_step(model, tx, num_classes=num_classes,
                                 mix_cfg=config.mix, lr_fn=lr_fn,
                                 seed=config.seed),
        in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
        donate_argnums=(0,))
    eval_step = jax.jit(classification.make_eval_step(model, num_classes),
                        in_shardings=(state_sh, batch_sh))

    def evaluate(state):
      """Top-1/top-5 and loss over the whole validation split."""
      sums = None
      for batch in input_pipeline.global_batches(
          input_pipeline.make_eval_iterator(
              config.val_data, image_size=hw,
              local_batch_size=config.eval_batch_size // jax.process_count(),
              process_index=jax.process_index(),
              process_count=jax.process_count()), batch_sh):
        out = eval_step(state, batch)
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
      sums = jax.device_get(sums)
      n = max(float(sums['count']), 1.)
      return {'acc1': sums['correct1'] / n, 'acc5': sums['correct5'] / n,
              'loss': sums['loss_sum'] / n, 'count': float(sums['count'])}

    # ------------------------------------------------------------------ loop
    preemption = launch.PreemptionWatch()
    make_logger = lambda prefix: metric_logging.MetricLogger(
        workdir, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        global_batch=config.batch_size, is_main=is_main, prefix=prefix,
        fields=metric_logging.CLASSIFICATION_FIELDS)
    logger, val_logger = make_logger('train'), make_logger('val')
    evals: dict[int, dict[str, float]] = {}
    eval_every = config.eval_every_epochs * steps_per_epoch

    recorder = metric_logging.LaggedRecorder(
        logger, start=start, log_every=config.log_every,
        last_good_step=ckpts.latest_step)

    step = start
    stop = False
    try:
      for step in range(start + 1, total_steps + 1):
        state, metrics = train_step(state, next(batches))
        recorder.push(step, metrics)
        stop = preemption.should_stop(step)
        if step % config.ckpt_every == 0 or step == total_steps or stop:
          recorder.flush()
          ckpts.save(step, state, {'step': step, 'data_step': step,
                                   'seed': config.seed, **model_id})
        if stop:
          logging.warning('Preemption signal: saved step %d, exiting.', step)
          break
        if step % eval_every == 0 or step == total_steps:
          recorder.flush()
          evals[step] = evaluate(state)
          val_logger.add({k: v for k, v in evals[step].items() if k != 'count'})
          val_logger.flush(step)
          logger.start(step)  # throughput excludes the evaluation
    finally:
      logger.close()
      val_logger.close()
  if evals:
    best = max(evals, key=lambda s: evals[s]['acc1'])
    logging.info('Best val top-1 %.2f%% (top-5 %.2f%%) at step %d; last '
                 '%.2f%%.', 100 * evals[best]['acc1'], 100 * evals[best]['acc5'],
                 best, 100 * evals[max(evals)]['acc1'])
  return {'losses': recorder.losses, 'evals': evals, 'last_step': step,
          'total_steps': total_steps, 'num_classes': num_classes,
          'preempted': stop}


def main():
  launch.run(train)


if __name__ == '__main__':
  main()
