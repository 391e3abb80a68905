"""Accelerator facts for MFU and memory planning: per-chip peak dense bf16
matmul throughput and memory, from the vendors' published specifications.

MFU (model FLOPs utilisation) is always taken against the bf16 peak, the
usual convention (float32 matmuls run as bf16 passes on TPUs).
"""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_tflops: float  # dense bf16, per chip
  hbm_gib: float      # per chip


# jax `device_kind` -> chip. Cloud TPU: v5e reports 'TPU v5 lite', v5p
# 'TPU v5', v6e 'TPU v6 lite'.
CHIPS = {
    'TPU v4': Chip('v4', 275., 32.),
    'TPU v5 lite': Chip('v5e', 197., 16.),
    'TPU v5e': Chip('v5e', 197., 16.),
    'TPU v5': Chip('v5p', 459., 95.),
    'TPU v5p': Chip('v5p', 459., 95.),
    'TPU v6 lite': Chip('v6e', 918., 32.),
    'TPU v6e': Chip('v6e', 918., 32.),
    'NVIDIA H100': Chip('H100', 989., 80.),
    'NVIDIA H200': Chip('H200', 989., 141.),
    'NVIDIA A100': Chip('A100', 312., 80.),
}


def chip(device_kind: str) -> Optional[Chip]:
  """The chip of a jax device_kind, or None where unknown (e.g. a CPU)."""
  if device_kind in CHIPS:
    return CHIPS[device_kind]
  # GPUs add the memory and form factor: 'NVIDIA H100 80GB HBM3'.
  return next((c for kind, c in CHIPS.items()
               if kind.startswith('NVIDIA') and device_kind.startswith(kind)),
              None)
