"""Accelerator facts for MFU and memory planning: per-chip peak dense bf16
matmul throughput, memory and its bandwidth, from the vendors' published
specifications (GPUs: the SXM parts).

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
  hbm_gb_per_s: float
  # float32 matmuls at HIGHEST precision (the crop resize on the chips):
  # GPUs' CUDA cores; None on TPUs, which run them as 6 bf16 passes.
  f32_tflops: Optional[float] = None

  @property
  def highest_f32_tflops(self) -> float:
    return self.f32_tflops or self.peak_tflops / 6


V4 = Chip('v4', 275., 32., 1200.)
V5E = Chip('v5e', 197., 16., 819.)
V5P = Chip('v5p', 459., 95., 2765.)
V6E = Chip('v6e', 918., 32., 1640.)
A100_40GB = Chip('A100 40GB', 312., 40., 1555., f32_tflops=19.5)
A100_80GB = Chip('A100 80GB', 312., 80., 2039., f32_tflops=19.5)
H100 = Chip('H100', 989., 80., 3350., f32_tflops=67.)
H200 = Chip('H200', 989., 141., 4800., f32_tflops=67.)

# jax `device_kind` -> chip. Cloud TPU: v5e reports 'TPU v5 lite', v5p
# 'TPU v5', v6e 'TPU v6 lite'. GPUs: the longest prefix that matches
# ('NVIDIA H100 80GB HBM3', 'NVIDIA A100-SXM4-40GB').
CHIPS = {
    'TPU v4': V4, 'TPU v5 lite': V5E, 'TPU v5e': V5E, 'TPU v5': V5P,
    'TPU v5p': V5P, 'TPU v6 lite': V6E, 'TPU v6e': V6E,
    'NVIDIA H100': H100, 'NVIDIA H200': H200, 'NVIDIA A100': A100_80GB,
    'NVIDIA A100-SXM4-40GB': A100_40GB, 'NVIDIA A100-PCIE-40GB': A100_40GB,
}
# The planner's --gpu names.
GPUS = {'a100-40gb': A100_40GB, 'a100-80gb': A100_80GB, 'h100': H100,
        'h200': H200}
GPUS_PER_NODE = 8


def chip(device_kind: str) -> Optional[Chip]:
  """The chip of a jax device_kind, or None where unknown (e.g. a CPU)."""
  if device_kind in CHIPS:
    return CHIPS[device_kind]
  gpus = [kind for kind in CHIPS
          if kind.startswith('NVIDIA') and device_kind.startswith(kind)]
  return CHIPS[max(gpus, key=len)] if gpus else None
