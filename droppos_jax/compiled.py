"""What XLA says of a compiled program (FLOPs, memory per device), read one
way for the trainers, the planner and the benchmarks."""
from __future__ import annotations


def cost(compiled) -> dict:
  """XLA's cost analysis of a compiled program, per device ('flops',
  'bytes accessed', ...); some backends wrap it in a list of one."""
  analysis = compiled.cost_analysis()
  return analysis[0] if isinstance(analysis, (list, tuple)) else analysis


def memory_bytes(mem) -> int:
  """Bytes a device holds while the program runs, from its memory_analysis():
  arguments, temporaries and outputs, less the outputs that reuse donated
  arguments."""
  return (mem.argument_size_in_bytes + mem.temp_size_in_bytes +
          mem.output_size_in_bytes - mem.alias_size_in_bytes)


def describe(compiled, loop_count: int = 1) -> tuple[float, str]:
  """(FLOPs per device per step, a line on memory and FLOPs per device).
  XLA counts a loop's body once: `loop_count` (the micro-batches of a
  step) scales the count."""
  flops = float(cost(compiled).get('flops', 0.)) * loop_count
  mem = compiled.memory_analysis()
  gib = lambda b: b / 2**30
  line = f'{flops / 1e9:.1f} GFLOP per device per step'
  if mem is not None:
    line += (f'; memory per device {gib(memory_bytes(mem)):.2f} GiB '
             f'(state and batch {gib(mem.argument_size_in_bytes):.2f}, '
             f'temporaries {gib(mem.temp_size_in_bytes):.2f})')
  return flops, line
