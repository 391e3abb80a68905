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

import dataclasses
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from droppos_jax import checkpoint, classification, launch, metric_logging
from droppos_jax import run_policy, settings, sharding, training_loop
from droppos_jax.data import device, sources, transforms
from droppos_jax.errors import UserError
from droppos_jax.models import architecture, vit

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


@dataclasses.dataclass
class Setup(training_loop.Setup):
  """Fine-tuning's (or linear probing's) step and what it is built from.
  `init_with(loaded)` initialises the state with `loaded` subtrees of
  the params (the weights of init.path)."""
  model: Any
  num_classes: int
  augment: transforms.TrainAugment
  image_hw: tuple[int, int]
  init_with: Callable[[dict], Any]
  eval_step: Any


def setup(config: ml_collections.ConfigDict, num_examples: int,
          num_classes: int, mesh: jax.sharding.Mesh,
          platform: Optional[str] = None) -> Setup:
  """Validates the config and builds the steps exactly as training runs
  them (`platform` is the planner's; nothing here depends on it yet)."""
  del platform
  hw = settings.image_hw(config.image_size)
  patch = vit.decode_variant(config.model.variant).patch_size
  vit.grid_size(hw, patch)
  if config.eval_every_epochs < 1:
    raise UserError(f'eval_every_epochs={config.eval_every_epochs} must be >= 1.')
  augment = transforms.finetune_augment(config.augment)
  check_mix_config(config.mix)
  if num_classes < 2:
    raise UserError(f'{num_classes} class(es): a classifier needs >= 2 (set '
                    'num_classes or use a folder with a subfolder per class).')
  model = classification.build_model(config, num_classes)
  sharding.check_batch_divides(config.batch_size, mesh)
  sharding.check_batch_divides(config.eval_batch_size, mesh, 'eval_batch_size')
  sched = settings.schedule(config, num_examples)
  lr_fn = sched.lr_fn()
  dummy = jnp.zeros((1, *hw, 3))
  abstract_vars = jax.eval_shape(
      lambda: model.init(jax.random.key(config.seed), dummy))
  tx = classification.make_optimizer(config, lr_fn, abstract_vars['params'])

  def init_with(loaded):
    variables = model.init(jax.random.key(config.seed), dummy)
    params = {**variables['params'], **loaded}
    state = {'step': jnp.zeros((), jnp.int32), 'params': params,
             'opt_state': tx.init(params)}
    if 'batch_stats' in variables:
      state['batch_stats'] = variables['batch_stats']
    return state

  abstract = jax.eval_shape(init_with, {})
  state_sh = sharding.state_shardings(abstract, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  init = jax.jit(init_with, out_shardings=state_sh)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                   sharding=batch_sh)
  return Setup(
      mesh=mesh, steps_per_epoch=sched.steps_per_epoch,
      total_steps=sched.total_steps, warmup_steps=sched.warmup_steps,
      lr_fn=lr_fn, init_state=lambda: init({}),
      abstract_state=checkpoint.abstract_with_shardings(abstract, state_sh),
      batch_spec={'image': spec((config.batch_size, *hw, 3), jnp.float32),
                  'label': spec((config.batch_size,), jnp.int32)},
      train_step=jax.jit(
          classification.make_train_step(
              model, tx, num_classes=num_classes, mix_cfg=config.mix,
              lr_fn=lr_fn, seed=config.seed),
          in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
          donate_argnums=(0,)),
      flops_per_example=model.flops_per_example(hw),
      description=f'{config.protocol} {config.model.variant}',
      architecture=architecture.of_encoder(model.encoder,
                                           num_classes=num_classes),
      model=model, num_classes=num_classes, augment=augment, image_hw=hw,
      init_with=init,
      eval_step=jax.jit(classification.make_eval_step(model, num_classes),
                        in_shardings=(state_sh, batch_sh)))


def _open_sources(config):
  """(train, validation) sources, both labelled, and the class count."""
  source = sources.open_source(config.data)
  val_source = sources.open_source(config.val_data)
  for what, s in (('data', source), ('val_data', val_source)):
    if s.num_classes is None:
      raise UserError(f'{what}: {s.description} has no class labels to '
                      f'{"train" if what == "data" else "evaluate"} a '
                      'classifier on.')
  num_classes = config.num_classes or source.num_classes
  if num_classes < source.num_classes:
    raise UserError(f'num_classes={num_classes} is fewer than the '
                    f'{source.num_classes} classes of {source.description}.')
  if val_source.num_classes > num_classes:
    raise UserError(f'val_data: {val_source.description} has '
                    f'{val_source.num_classes} classes, more than the '
                    f'{num_classes} the model predicts; set num_classes or '
                    'use the classes of data.')
  return source, val_source, num_classes


def _evaluate(s: Setup, val_source, batch_size: int, state) -> dict:
  """Top-1/top-5 and loss over the whole validation split."""
  sums = None
  for batch in device.eval_batches(val_source, image_hw=s.image_hw,
                                   batch_size=batch_size, num_examples=-1,
                                   mesh=s.mesh):
    out = s.eval_step(state, batch)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  n = max(float(sums['count']), 1.)
  return {'acc1': float(sums['correct1'] / n),
          'acc5': float(sums['correct5'] / n),
          'loss': float(sums['loss_sum'] / n), 'count': float(sums['count'])}


def train(config: ml_collections.ConfigDict, workdir: str,
          allow_config_change: bool = False) -> dict[str, Any]:
  """Runs (or resumes) fine-tuning or linear probing; returns
  training_loop.run's result with 'num_classes'."""
  # Everything a user can get wrong is checked here, before anything is
  # written or compiled.
  source, val_source, num_classes = _open_sources(config)
  mesh = sharding.make_mesh(config.mesh, config.num_devices)
  s = setup(config, source.size, num_classes, mesh)
  hw = s.image_hw
  model_id = {'protocol': config.protocol, 'model': config.model.to_dict(),
              'num_classes': num_classes, 'image_hw': list(hw)}
  run = run_policy.Run(workdir, config, model_id=model_id,
                       total_steps=s.total_steps,
                       allow_config_change=allow_config_change)
  abstract_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
      s.abstract_state['params'])
  # A fresh run reads its init weights before the workdir is claimed, so that
  # a bad init.path leaves it untouched; a resumed run reads them only if no
  # checkpoint turns out to be readable.
  read_init = lambda: classification.load_init(
      config.init, config.protocol, abstract_params, hw,
      s.model.encoder.patch_size)
  early_init = (read_init() if config.init.path and not run.has_checkpoint()
                else None)
  logging.info('%s: %d classes, %d steps (%d/epoch, %d warm-up), image %s, '
               'mesh %s; parameters %.2fM.', config.protocol, num_classes,
               s.total_steps, s.steps_per_epoch, s.warmup_steps, hw,
               dict(mesh.shape), sum(x.size for x in jax.tree.leaves(
                   abstract_params)) / 1e6)

  def initial_state():
    if early_init is not None:
      return s.init_with(early_init)
    if config.init.path:
      return s.init_with(read_init())
    logging.info('No init.path: training from random initialisation.')
    return s.init_state()

  eval_every = config.eval_every_epochs * s.steps_per_epoch
  hooks = training_loop.Hooks(
      step_input=lambda b: {'image': b['image'], 'label': b['label']},
      fields=FIELDS,
      meta=lambda logged, last_eval, metrics: {
          'seed': config.seed, 'metrics': logged, 'eval': last_eval},
      summary=lambda meta: meta.get('eval') or meta.get('metrics') or {},
      evaluation=training_loop.Evaluation(
          due=lambda step: step % eval_every == 0,
          run=lambda state, step: _evaluate(s, val_source,
                                            config.eval_batch_size, state),
          prefix='val', fields=FIELDS, unlogged=('count',)))
  batches = lambda start: device.train_batches(
      source, s.augment, image_hw=hw, batch_size=config.batch_size,
      seed=config.seed, start_step=start, mesh=mesh)
  out = training_loop.run(config, workdir, run,
                          dataclasses.replace(s, init_state=initial_state),
                          batches, hooks)
  evals = out['evals']
  if evals:
    best = max(evals, key=lambda step: evals[step]['acc1'])
    logging.info('Best val top-1 %.2f%% (top-5 %.2f%%) at step %d; last '
                 '%.2f%%.', 100 * evals[best]['acc1'],
                 100 * evals[best]['acc5'], best, 100 * evals[max(evals)]['acc1'])
  return dict(out, num_classes=num_classes)


def main():
  launch.run(train, config_kind='finetune',
             extra_flags=[launch.allow_config_change_flag])


if __name__ == '__main__':
  main()
