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
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from droppos_jax import checkpoint, launch, metric_logging, objectives, optim
from droppos_jax import run_policy, settings, sharding, training_loop
from droppos_jax.data import device, sources, transforms
from droppos_jax.errors import UserError
from droppos_jax.evaluators import online


@dataclasses.dataclass
class Setup(training_loop.Setup):
  """Pre-training's step (training_loop.Setup) and the parts it is built
  from."""
  model: Any                      # the objective's model
  objective: Any                  # its settings (droppos's ObjectiveConfig)
  augment: transforms.TrainAugment


def setup(config: ml_collections.ConfigDict, num_examples: int,
          mesh: jax.sharding.Mesh, platform: Optional[str] = None) -> Setup:
  """Validates the config and builds the step exactly as training runs it
  on `platform` (default: this machine's; the planner passes its target's)."""
  hw = settings.image_hw(config.image_size)
  augment = transforms.pretrain_augment(
      config.device_resize_window, hw, platform or jax.default_backend())
  objective_lib = objectives.objective(config)
  model = objective_lib.build_model(config.model, platform, hw)
  if config.grad_accum_steps < 1:
    raise UserError(f'grad_accum_steps={config.grad_accum_steps} must be >= 1.')
  sharding.check_batch_divides(config.batch_size, mesh)
  if config.batch_size % config.grad_accum_steps:
    raise UserError(f'batch_size={config.batch_size} is not divisible by '
                    f'grad_accum_steps={config.grad_accum_steps}.')
  sharding.check_batch_divides(config.batch_size // config.grad_accum_steps,
                               mesh, 'batch_size / grad_accum_steps')
  sched = settings.schedule(config, num_examples)
  lr_fn = sched.lr_fn()
  tx = optim.make_optimizer(config.optim, lr_fn)
  objective = objective_lib.settings(
      config, image_hw=hw, patch_size=model.encoder.patch_size,
      schedule=sched)

  def init_state():
    params = objective_lib.init_params(model, jax.random.key(config.seed), hw)
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': tx.init(params)}

  abstract = jax.eval_shape(init_state)
  state_sh = sharding.state_shardings(abstract, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  step_fn = objective_lib.make_train_step(
      model, tx, objective, lr_fn=lr_fn, seed=config.seed,
      accum_steps=config.grad_accum_steps)
  return Setup(
      mesh=mesh, steps_per_epoch=sched.steps_per_epoch,
      total_steps=sched.total_steps, warmup_steps=sched.warmup_steps,
      lr_fn=lr_fn, init_state=jax.jit(init_state, out_shardings=state_sh),
      abstract_state=checkpoint.abstract_with_shardings(abstract, state_sh),
      batch_spec=jax.ShapeDtypeStruct((config.batch_size, *hw, 3), jnp.float32,
                                      sharding=batch_sh),
      train_step=jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                         out_shardings=(state_sh, None), donate_argnums=(0,)),
      flops_per_example=objective_lib.flops_per_example(model, objective),
      description=f'{objective_lib.title} {config.model.variant}',
      architecture=objective_lib.architecture(config.model, hw),
      model=model, objective=objective, augment=augment)


def train(config: ml_collections.ConfigDict, workdir: str,
          allow_config_change: bool = False) -> dict[str, Any]:
  """Runs (or resumes) pre-training; returns training_loop.run's result."""
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
  logging.info('%d steps (%d/epoch, %d warm-up), grid %s, mesh %s; crops '
               'resized on the %s (device_resize_window=%d).',
               s.total_steps, s.steps_per_epoch, s.warmup_steps,
               s.objective.grid, dict(mesh.shape),
               'chips' if s.augment.device_resize_window else 'host',
               s.augment.device_resize_window)
  params = s.abstract_state['params']
  logging.info('Parameters: %.2fM (encoder %.2fM).',
               sum(x.size for x in jax.tree.leaves(params)) / 1e6,
               sum(x.size for x in jax.tree.leaves(params['encoder'])) / 1e6)
  evaluation = training_loop.Evaluation(
      due=evaluator.due, run=lambda state, step: evaluator.run(
          state['params'], step),
      prefix='eval', fields=metric_logging.ONLINE_EVAL_FIELDS
  ) if evaluator.enabled else None
  hooks = training_loop.Hooks(
      step_input=lambda batch: batch['image'],
      fields=objectives.objective(config).console,
      meta=lambda logged, last_eval, metrics: {
          'objective': config.objective.name, 'seed': config.seed,
          'metrics': logged, 'eval': last_eval},
      summary=lambda meta: meta.get('metrics') or {},
      evaluation=evaluation, drop_keys=('weight_sum',))
  batches = lambda start: device.train_batches(
      source, s.augment, image_hw=s.objective.image_hw,
      batch_size=config.batch_size, seed=config.seed, start_step=start,
      mesh=mesh)
  return training_loop.run(config, workdir, run, s, batches, hooks)


def main():
  launch.run(train, config_kind='pretrain',
             extra_flags=[launch.allow_config_change_flag])


if __name__ == '__main__':
  main()
