"""Pre-training objectives, chosen by name (`config.objective.name`).

An objective is a module here (droppos.py) plus its entry in OBJECTIVES: how
its model is built and identified, its static settings, its parameters, its
train step and its analytic FLOPs. The pre-training trainer (train.py), the
planner and the console use nothing else of it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from droppos_jax.errors import UserError
from droppos_jax.models import droppos as droppos_model
from droppos_jax.objectives import droppos


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


# name -> Objective.
OBJECTIVES = {
    'droppos': Objective(
        title='DropPos', build_model=droppos_model.droppos_from_model_config,
        architecture=droppos_model.architecture_from_config,
        settings=droppos.objective_from_config,
        init_params=droppos.init_params,
        make_train_step=droppos.make_train_step,
        flops_per_example=droppos.flops_per_example),
}


def objective(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise UserError(f'objective.name={name!r}; registered: '
                    f'{", ".join(OBJECTIVES)}.')
  return OBJECTIVES[name]
