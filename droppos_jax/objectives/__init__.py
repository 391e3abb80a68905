"""Pre-training objectives, chosen by name (`config.objective.name`).

An objective is a module here (droppos.py, mae.py) plus its entry in
OBJECTIVES: how its model is built and identified, its static settings, its
parameters, its train step, its analytic FLOPs and the metrics its console
shows. The pre-training trainer (train.py), the planner and the console use
nothing else of it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from droppos_jax import metric_logging, settings
from droppos_jax.errors import UserError
from droppos_jax.models import droppos as droppos_model
from droppos_jax.models import mae as mae_model
from droppos_jax.objectives import droppos, mae


@dataclasses.dataclass(frozen=True)
class Objective:
  """A pre-training objective, chosen by `config.objective.name`: how its
  model is built from the `model` block (and the platform the step runs on),
  its static settings from the config, its parameters, its train step
  (state, images) -> (state, metrics) and its analytic FLOPs per example."""
  title: str                      # for people: 'DropPos'
  build_model: Callable[..., Any]
  architecture: Callable[..., Any]  # (model block, image_hw) -> Architecture
  settings: Callable[..., Any]
  init_params: Callable[..., Any]
  make_train_step: Callable[..., Any]
  flops_per_example: Callable[..., int]
  console: tuple[tuple[str, str, str], ...]  # (metric, label, format)
  fields: tuple[tuple[str, str], ...]   # (block, name) its config must have
  config_file: str                      # the config to start from


# name -> Objective.
OBJECTIVES = {
    'droppos': Objective(
        title='DropPos', build_model=droppos_model.droppos_from_model_config,
        architecture=droppos_model.architecture_from_config,
        settings=droppos.objective_from_config,
        init_params=droppos.init_params,
        make_train_step=droppos.make_train_step,
        flops_per_example=droppos.flops_per_example,
        console=metric_logging.PRETRAIN_FIELDS,
        fields=(('model', 'head'), ('model', 'projector'),
                ('model', 'attentive_dtype'), ('objective', 'tau'),
                ('objective', 'sigma')),
        config_file='configs/pretrain.py'),
    'mae': Objective(
        title='MAE', build_model=mae_model.mae_from_model_config,
        architecture=mae_model.architecture_from_config,
        settings=mae.objective_from_config, init_params=mae.init_params,
        make_train_step=mae.make_train_step,
        flops_per_example=mae.flops_per_example,
        console=(('loss', 'loss', '.4f'), ('lr', 'lr', '.2e')),
        fields=(('model', 'decoder_width'), ('model', 'decoder_depth'),
                ('model', 'decoder_heads'), ('objective', 'norm_pix_loss')),
        config_file='configs/mae_pretrain.py'),
}


def objective(config) -> Objective:
  """`config.objective.name`'s Objective, once the config has the fields it
  reads (a DropPos config switched to 'mae' lacks the decoder's sizes)."""
  name = config.objective.name
  if name not in OBJECTIVES:
    raise UserError(f'objective.name={name!r}; registered: '
                    f'{", ".join(OBJECTIVES)}.')
  chosen = OBJECTIVES[name]
  settings.require_fields(config, chosen.fields,
                          chosen=f'objective.name={name!r}', what='objective',
                          config_file=chosen.config_file)
  return chosen
