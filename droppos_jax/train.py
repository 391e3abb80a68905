r"""DropPos pre-training.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/pretrain.py:variant=B/16,epochs=800 \
      --workdir gs://bucket/run --config.data.data_dir=gs://bucket/tfds

Rerunning with the same --workdir resumes from its latest checkpoint; a
complete run reports its final metrics. `python -m droppos_jax.plan` compiles
this same step for a TPU pod before you launch (memory, FLOPs, time).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

from absl import logging
from clu import periodic_actions
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections

from droppos_jax import checkpoint, hardware, launch
from droppos_jax import metric_logging, optim, pretrain, run_policy, sharding
from droppos_jax.data import device, sources, transforms
from droppos_jax.errors import UserError
from droppos_jax.evaluators import online
from droppos_jax.models import droppos as droppos_model


FIELDS = metric_logging.PRETRAIN_FIELDS


@dataclasses.dataclass
class Setup:
  """Everything the step needs, built from the config alone (no data read,
  nothing compiled): the trainer runs it, the planner compiles it for a pod."""
  model: droppos_model.DropPos
  objective: pretrain.ObjectiveConfig
  augment: transforms.TrainAugment
  mesh: jax.sharding.Mesh
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  lr_fn: Callable
  init_state: Callable[[], Any]
  abstract_state: Any             # ShapeDtypeStructs carrying the shardings
  batch_spec: jax.ShapeDtypeStruct
  train_step: Any                 # jitted, donating the state

  def compile(self):
    return self.train_step.lower(self.abstract_state, self.batch_spec).compile()


def setup(config: ml_collections.ConfigDict, num_examples: int,
          mesh: jax.sharding.Mesh, platform: Optional[str] = None) -> Setup:
  """Validates the config and builds the step exactly as training runs it
  on `platform` (default: this machine's; the planner passes 'tpu')."""
  hw = launch.image_hw(config)
  augment = transforms.TrainAugment(
      device_resize_window=config.device_resize_window)
  augment.check_size(hw)
  model = droppos_model.droppos_from_model_config(config.model, platform)
  if config.grad_accum_steps < 1:
    raise UserError(f'grad_accum_steps={config.grad_accum_steps} must be >= 1.')
  sharding.check_batch_divides(config.batch_size, mesh)
  if config.batch_size % config.grad_accum_steps:
    raise UserError(f'batch_size={config.batch_size} is not divisible by '
                    f'grad_accum_steps={config.grad_accum_steps}.')
  sharding.check_batch_divides(config.batch_size // config.grad_accum_steps,
                               mesh, 'batch_size / grad_accum_steps')
  steps_per_epoch, total_steps, warmup_steps = launch.schedule_lengths(
      config, num_examples)
  if not config.optim.blr > 0:
    raise UserError(f'optim.blr={config.optim.blr} must be > 0 (the paper '
                    'uses 1.5e-4).')
  peak_lr = config.optim.blr * config.batch_size / 256
  lr_fn = optim.lr_schedule(peak_lr, total_steps=total_steps,
                            warmup_steps=warmup_steps, min_lr=config.optim.min_lr)
  tx = optim.make_optimizer(config.optim, lr_fn)
  objective = pretrain.objective_from_config(
      config, total_steps=total_steps, steps_per_epoch=steps_per_epoch)

  def init_state():
    params = model.init(jax.random.key(config.seed), jnp.zeros((1, *hw, 3)),
                        jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool))
    params = params['params']
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': tx.init(params)}

  abstract = jax.eval_shape(init_state)
  state_sh = sharding.state_shardings(abstract, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  step_fn = pretrain.make_train_step(
      model, tx, objective, lr_fn=lr_fn, seed=config.seed,
      accum_steps=config.grad_accum_steps)

  return Setup(
      model=model, objective=objective, augment=augment, mesh=mesh,
      steps_per_epoch=steps_per_epoch, total_steps=total_steps,
      warmup_steps=warmup_steps, lr_fn=lr_fn,
      init_state=jax.jit(init_state, out_shardings=state_sh),
      abstract_state=checkpoint.abstract_with_shardings(abstract, state_sh),
      batch_spec=jax.ShapeDtypeStruct((config.batch_size, *hw, 3), jnp.float32,
                                      sharding=batch_sh),
      train_step=jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                         out_shardings=(state_sh, None), donate_argnums=(0,)))


def compiled_cost(compiled) -> dict:
  """XLA's cost analysis of a compiled program, per device ('flops',
  'bytes accessed', ...); some backends wrap it in a list of one."""
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def describe_compiled(compiled) -> tuple[float, str]:
  """(FLOPs per device per step, a line on memory and FLOPs per device)."""
  flops = float(compiled_cost(compiled).get('flops', 0.))
  mem = compiled.memory_analysis()
  gib = lambda b: b / 2**30
  line = f'{flops / 1e9:.1f} GFLOP per device per step'
  if mem is not None:
    line += (f'; memory per device {gib(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes):.2f} GiB '
             f'(state and batch {gib(mem.argument_size_in_bytes):.2f}, '
             f'temporaries {gib(mem.temp_size_in_bytes):.2f})')
  return flops, line


def train(config: ml_collections.ConfigDict, workdir: str,
          allow_config_change: bool = False) -> dict[str, Any]:
  """Runs (or resumes) pre-training; returns {'losses': {step: loss},
  'last_step', 'total_steps', 'stopped' (None, 'preempted' or
  'interrupted'), 'complete', 'metrics' (last logged means)}."""
  # ------------------------------------------------------------------ checks
  # Everything a user can get wrong is checked here, before anything is
  # written or compiled.
  source = sources.open_source(config.data)
  mesh = sharding.make_mesh(config.mesh, config.num_devices)
  s = setup(config, source.size, mesh)
  evaluator = online.OnlineEvaluator(config.eval, model=s.model,
                                     obj_cfg=s.objective, mesh=mesh)
  model_id = {'model': config.model.to_dict(), 'image_hw': list(s.objective.image_hw)}
  run = run_policy.Run(workdir, config, model_id=model_id,
                       total_steps=s.total_steps,
                       allow_config_change=allow_config_change)
  profile = periodic_actions.Profile(
      logdir=str(epath.Path(workdir) / 'profile'),
      num_profile_steps=config.profile_steps[1] - config.profile_steps[0],
      profile_duration_ms=None, first_profile=config.profile_steps[0],
      every_steps=None, every_secs=None) if config.profile_steps[1] else None
  logging.info('%d steps (%d/epoch, %d warm-up), grid %s, mesh %s.',
               s.total_steps, s.steps_per_epoch, s.warmup_steps,
               s.objective.grid, dict(mesh.shape))
  logging.info('Parameters: %.2fM (projector %.2fM).',
               sum(x.size for x in jax.tree.leaves(s.abstract_state['params'])) / 1e6,
               sum(x.size for x in jax.tree.leaves(
                   s.abstract_state['params']['projector'])) / 1e6)

  with run:
    # --------------------------------------------------------------- restore
    state, start = run.restore_or_init(s.init_state, s.abstract_state)
    if start >= s.total_steps:
      metrics = run.final_meta.get('metrics') or {}
      run.report_complete(metric_logging.brief(metrics, FIELDS))
      return {'losses': {}, 'last_step': start, 'total_steps': s.total_steps,
              'stopped': None, 'complete': True, 'metrics': metrics}

    # ------------------------------------------------------------------ data
    batches = device.train_batches(
        source, s.augment, image_hw=s.objective.image_hw,
        batch_size=config.batch_size, seed=config.seed, start_step=start,
        mesh=mesh)

    # --------------------------------------------------------------- step fn
    t0 = time.perf_counter()
    train_step = s.compile()
    flops, described = describe_compiled(train_step)
    chip = hardware.chip(jax.devices()[0].device_kind)
    logging.info('Compiled the train step in %.0f s: %s.',
                 time.perf_counter() - t0, described)

    # ------------------------------------------------------------------ loop
    logger = run.enter_context(metric_logging.MetricLogger(
        workdir, total_steps=s.total_steps, steps_per_epoch=s.steps_per_epoch,
        global_batch=config.batch_size, is_main=run.is_main,
        flops_per_device=flops, peak_tflops=chip and chip.peak_tflops))
    eval_logger = run.enter_context(metric_logging.MetricLogger(
        workdir, total_steps=s.total_steps, steps_per_epoch=s.steps_per_epoch,
        global_batch=config.batch_size, is_main=run.is_main, prefix='eval',
        fields=metric_logging.ONLINE_EVAL_FIELDS))
    recorder = metric_logging.LaggedRecorder(
        logger, start=start, log_every=config.log_every,
        last_good=run.last_good, drop_keys=('weight_sum',))

    started = time.perf_counter()
    logger.resume()
    step = start
    for step in range(start + 1, s.total_steps + 1):
      t = time.perf_counter()
      images = next(batches)['image']
      logger.add_data_wait(time.perf_counter() - t)
      state, metrics = train_step(state, images)
      recorder.push(step, metrics)
      if profile:
        profile(step)
      if run.should_save(step):
        recorder.flush()
        run.save(step, state, {'sigma': float(metrics['sigma']),
                               'seed': config.seed, 'metrics': logger.last})
      if run.stopped:
        break
      # Before the next step donates the params.
      if evaluator.due(step, last_step=s.total_steps):
        logger.pause()
        eval_logger.add(evaluator.run(state['params'], step))
        eval_logger.flush(step)
        logger.resume()
    recorder.flush()

  run.report_end(step, time.perf_counter() - started,
                 metric_logging.brief(logger.last, FIELDS))
  return {'losses': recorder.losses, 'last_step': step,
          'total_steps': s.total_steps, 'stopped': run.stopped,
          'complete': step == s.total_steps, 'metrics': logger.last}


def main():
  launch.run(train, config_kind='pretrain',
             extra_flags=[launch.allow_config_change_flag])


if __name__ == '__main__':
  main()
