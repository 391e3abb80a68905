"""The commands' entry points: the top-level scripts (train.py, ...) and
pip's console scripts (droppos-train, ...).

Each takes SIGTERM over first, then imports its command: those imports
(TensorFlow, JAX, clu) take seconds, and a preemption notice during them
must exit 75 like one a moment later, not kill the process. Keep this
module's imports to the stdlib.
"""
from __future__ import annotations

import importlib

from droppos_jax import exit_codes


def _main(command: str) -> None:
  exit_codes.exit_at_once_on_preemption_notice()  # the launcher's comes next
  importlib.import_module(f'droppos_jax.{command}').main()


def train() -> None:
  _main('train')


def finetune() -> None:
  _main('finetune')


def probe_position() -> None:
  _main('probe_position')


def position_awareness() -> None:
  _main('position_awareness')


def visualize() -> None:
  _main('visualize')


def export() -> None:
  _main('export')


def plan() -> None:
  _main('plan')
