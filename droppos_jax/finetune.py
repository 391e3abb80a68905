r"""Fine-tuning and linear probing of a (DropPos pre-trained) ViT, with MAE's
recipes as the DropPos paper (arXiv 2309.03576) reports them.

  python finetune.py --config configs/finetune.py:demo --workdir runs/ft_demo \
      --config.init.path=runs/demo
  python finetune.py --config configs/finetune.py:variant=B/16 \
      --workdir gs://bucket/ft_b16 --config.init.path=gs://bucket/droppos_b16
  python finetune.py --config configs/linear_probe.py:variant=B/16 \
      --workdir gs://bucket/lin_b16 --config.init.path=droppos_b16.pth

`init.path` is a pre-training or fine-tuning workdir or step folder, or a
.safetensors/.pth/.npz file (DropPos, MAE or a fine-tuned one; see
models/weights.py); empty means random init.
Rerunning with the same --workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from droppos_jax import checkpoint, classification
from droppos_jax import launch, metric_logging, optim, run_policy, sharding
from droppos_jax.data import device, sources, transforms
from droppos_jax.errors import UserError
from droppos_jax.models import vit

FIELDS = metric_logging.CLASSIFICATION_FIELDS


def check_mix_config(mix) -> None:
  for name in ('mixup_alpha', 'cutmix_alpha'):
    if mix[name] < 0:
      raise UserError(f'mix.{name}={mix[name]} must be >= 0 (0 = off).')
  for name in ('switch_prob', 'prob'):
    if not 0 <= mix[name] <= 1:
      raise UserError(f'mix.{name}={mix[name]} is a probability in [0, 1].')
  if not 0 <= mix.label_smoothing < 1:
    raise UserError(f'mix.label_smoothing={mix.label_smoothing} must be in '
                    '[0, 1).')


def train(config: ml_collections.ConfigDict, workdir: str,
          allow_config_change: bool = False) -> dict[str, Any]:
  """Runs (or resumes) fine-tuning or linear probing; returns
  {'losses': {step: loss}, 'evals': {step: {'acc1', 'acc5', 'loss'}},
  'last_step', 'total_steps', 'num_classes', 'stopped', 'complete'}."""
  # ------------------------------------------------------------------ checks
  # Everything a user can get wrong is checked here, before anything is
  # written or compiled.
  hw = launch.image_hw(config)
  patch = vit.decode_variant(config.model.variant).patch_size
  vit.grid_size(hw, patch)
  if config.eval_every_epochs < 1:
    raise UserError(f'eval_every_epochs={config.eval_every_epochs} must be >= 1.')
  source = sources.open_source(config.data)
  val_source = sources.open_source(config.val_data)
  for what, s in (('data', source), ('val_data', val_source)):
    if s.num_classes is None:
      raise UserError(f'{what}: {s.description} has no class labels to '
                      f'{"train" if what == "data" else "evaluate"} a '
                      'classifier on.')
  augment = transforms.finetune_augment(config.augment)
  check_mix_config(config.mix)
  num_classes = config.num_classes or source.num_classes
  if num_classes < source.num_classes:
    raise UserError(f'num_classes={num_classes} is fewer than the '
                    f'{source.num_classes} classes of {source.description}.')
  if val_source.num_classes > num_classes:
    raise UserError(f'val_data: {val_source.description} has '
                    f'{val_source.num_classes} classes, more than the '
                    f'{num_classes} the model predicts; set num_classes or '
                    'use the classes of data.')
  if num_classes < 2:
    raise UserError(f'{num_classes} class(es): a classifier needs >= 2 (set '
                    'num_classes or use a folder with a subfolder per class).')
  model = classification.build_model(config, num_classes)
  mesh = sharding.make_mesh(config.mesh, config.num_devices)
  sharding.check_batch_divides(config.batch_size, mesh)
  sharding.check_batch_divides(config.eval_batch_size, mesh, 'eval_batch_size')
  steps_per_epoch, total_steps, warmup_steps = launch.schedule_lengths(
      config, source.size)
  if not config.optim.blr > 0:
    raise UserError(f'optim.blr={config.optim.blr} must be > 0.')
  peak_lr = config.optim.blr * config.batch_size / 256
  lr_fn = optim.lr_schedule(peak_lr, total_steps=total_steps,
                            warmup_steps=warmup_steps, min_lr=config.optim.min_lr)
  dummy = jnp.zeros((1, *hw, 3))
  abstract_vars = jax.eval_shape(
      lambda: model.init(jax.random.key(config.seed), dummy))
  tx = classification.make_optimizer(config, lr_fn, abstract_vars['params'])
  model_id = {'protocol': config.protocol, 'model': config.model.to_dict(),
              'num_classes': num_classes, 'image_hw': list(hw)}
  run = run_policy.Run(workdir, config, model_id=model_id,
                       total_steps=total_steps,
                       allow_config_change=allow_config_change)
  # A fresh run reads its init weights before the workdir is claimed, so that
  # a bad init.path leaves it untouched; a resumed run reads them only if no
  # checkpoint turns out to be readable.
  read_init = lambda: classification.load_init(
      config.init, config.protocol, abstract_vars['params'], hw, patch)
  early_init = (read_init() if config.init.path and not run.has_checkpoint()
                else None)
  logging.info('%s: %d classes, %d steps (%d/epoch, %d warm-up), peak lr %.3g, '
               'image %s, mesh %s.', config.protocol, num_classes, total_steps,
               steps_per_epoch, warmup_steps, peak_lr, hw, dict(mesh.shape))

  # ------------------------------------------------------- model and state
  def init_state(loaded):
    variables = model.init(jax.random.key(config.seed), dummy)
    params = {**variables['params'], **loaded}
    state = {'step': jnp.zeros((), jnp.int32), 'params': params,
             'opt_state': tx.init(params)}
    if 'batch_stats' in variables:
      state['batch_stats'] = variables['batch_stats']
    return state

  abstract = jax.eval_shape(init_state, {})
  state_sh = sharding.state_shardings(abstract, mesh)
  logging.info('Parameters: %.2fM.', sum(
      x.size for x in jax.tree.leaves(abstract['params'])) / 1e6)

  def initial_state():
    loaded = {}
    if early_init is not None:
      loaded = early_init
    elif config.init.path:
      loaded = read_init()
    else:
      logging.info('No init.path: training from random initialisation.')
    return jax.jit(init_state, out_shardings=state_sh)(loaded)

  with run:
    # --------------------------------------------------------------- restore
    state, start = run.restore_or_init(
        initial_state, checkpoint.abstract_with_shardings(abstract, state_sh))
    if start >= total_steps:
      evals = {start: run.final_meta.get('eval') or {}}
      run.report_complete(metric_logging.brief(evals[start], FIELDS))
      return {'losses': {}, 'evals': evals, 'last_step': start,
              'total_steps': total_steps, 'num_classes': num_classes,
              'stopped': None, 'complete': True}

    # ------------------------------------------------------------------ data
    batch_sh = sharding.batch_sharding(mesh)
    batches = device.train_batches(
        source, augment, image_hw=hw, batch_size=config.batch_size,
        seed=config.seed, start_step=start, mesh=mesh)

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
      for batch in device.eval_batches(
          val_source, image_hw=hw, batch_size=config.eval_batch_size,
          num_examples=-1, mesh=mesh):
        out = eval_step(state, batch)
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
      sums = jax.device_get(sums)
      n = max(float(sums['count']), 1.)
      return {'acc1': float(sums['correct1'] / n),
              'acc5': float(sums['correct5'] / n),
              'loss': float(sums['loss_sum'] / n), 'count': float(sums['count'])}

    # ------------------------------------------------------------------ loop
    make_logger = lambda prefix: run.enter_context(metric_logging.MetricLogger(
        workdir, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        global_batch=config.batch_size, is_main=run.is_main, prefix=prefix,
        fields=FIELDS))
    logger, val_logger = make_logger('train'), make_logger('val')
    recorder = metric_logging.LaggedRecorder(
        logger, start=start, log_every=config.log_every,
        last_good=run.last_good)
    evals: dict[int, dict[str, float]] = {}
    eval_every = config.eval_every_epochs * steps_per_epoch

    started = time.perf_counter()
    logger.resume()
    step = start
    for step in range(start + 1, total_steps + 1):
      t = time.perf_counter()
      batch = next(batches)
      logger.add_data_wait(time.perf_counter() - t)
      state, metrics = train_step(state, batch)
      recorder.push(step, metrics)
      save = run.should_save(step)  # also learns of preemption
      if not run.stopped and (step % eval_every == 0 or step == total_steps):
        recorder.flush()
        logger.pause()
        evals[step] = evaluate(state)
        val_logger.add({k: v for k, v in evals[step].items() if k != 'count'})
        val_logger.flush(step)
        logger.resume()
      if save:
        recorder.flush()
        run.save(step, state, {'seed': config.seed, 'metrics': logger.last,
                               'eval': evals[max(evals)] if evals else {}})
      if run.stopped:
        break
    recorder.flush()

  if evals:
    best = max(evals, key=lambda s: evals[s]['acc1'])
    logging.info('Best val top-1 %.2f%% (top-5 %.2f%%) at step %d; last '
                 '%.2f%%.', 100 * evals[best]['acc1'], 100 * evals[best]['acc5'],
                 best, 100 * evals[max(evals)]['acc1'])
  run.report_end(step, time.perf_counter() - started, metric_logging.brief(
      evals[max(evals)] if evals else logger.last, FIELDS))
  return {'losses': recorder.losses, 'evals': evals, 'last_step': step,
          'total_steps': total_steps, 'num_classes': num_classes,
          'stopped': run.stopped, 'complete': step == total_steps}


def main():
  launch.run(train, config_kind='finetune',
             extra_flags=[launch.allow_config_change_flag])


if __name__ == '__main__':
  main()
