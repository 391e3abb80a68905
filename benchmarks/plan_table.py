r"""The planner's tables for the paper's recipes on Cloud TPU pods and on
nodes of 8 GPUs.

  nice -n 10 python benchmarks/plan_table.py   # ~2.5 h on 2 CPU cores

Compiles each row's train step ahead of time (droppos_jax.plan, one fresh
process per row) and writes benchmarks/plan_table.md: the tables and, per
row, the planner command that gives it. A GPU row is compiled once (for
8 CPU devices, as the planner's --gpu does) and read for each GPU of
GPU_TABLE: only the chip differs. Rows already in the cache
(benchmarks/plan_table.jsonl) are not compiled again; delete it to redo.
"""
import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os

import jax

from droppos_jax import hardware, plan
from droppos_jax.configs import pretrain

TOPOLOGIES = ('v5e:16x16', 'v5p:4x4x4', 'v6e:16x16')
MESHES = {'dp': {'mesh.data': -1, 'mesh.fsdp': 1},
          'fsdp': {'mesh.data': 1, 'mesh.fsdp': -1}}
DTYPES = ('float32', 'bfloat16')
MFU = 0.4
# The GPUs of the GPU table, each a node of 8 (a GPU row compiles for the
# first and is read for all).
GPU_TABLE = ('h100', 'a100-80gb', 'a100-40gb')
GPUS = hardware.GPUS_PER_NODE
HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class Row:
  variant: str
  topology: str
  mesh: str
  overrides: tuple[tuple[str, object], ...]
  num_slices: int = 1
  note: str = ''

  @property
  def gpu(self) -> bool:
    return self.topology in hardware.GPUS

  @property
  def key(self) -> str:
    return json.dumps([self.variant, self.topology, self.num_slices,
                       list(self.overrides)])

  def command(self, gpu: str = '') -> str:
    """The planner's command for this row (`gpu`: for that GPU instead)."""
    parts = ['python -m droppos_jax.plan',
             f'--config configs/pretrain.py:variant={self.variant},epochs=800']
    if self.gpu:
      parts.append(f'--gpu {gpu or self.topology} --num_gpus {GPUS}')
    else:
      parts.append(f'--topology {self.topology}')
    if self.num_slices > 1:
      parts.append(f'--num_slices {self.num_slices}')
    parts += [f'--config.{k}={v}' for k, v in self.overrides]
    return ' '.join(parts)


def rows() -> list[Row]:
  def row(variant, topology, mesh, dtype, slices=1, note='', **extra):
    overrides = {**MESHES[mesh], 'model.dtype': dtype, **extra}
    if slices > 1 and mesh == 'fsdp':
      overrides['mesh.data'] = slices  # fsdp stays within a slice
    return Row(variant, topology, mesh, tuple(overrides.items()), slices, note)

  table = [row(v, t, m, d) for v in ('B/16',) for t in TOPOLOGIES
           for m in MESHES for d in DTYPES]
  table.append(row('B/16', 'v5e:16x16', 'dp', 'float32',
                   note='attentive pass in float32',
                   **{'model.attentive_dtype': 'float32'}))
  table.append(row('B/16', 'v5e:16x16', 'dp', 'float32', slices=2,
                   note='2 slices'))
  table += [row(v, t, m, d) for v in ('L/16',) for t in TOPOLOGIES
            for m in MESHES for d in DTYPES]
  table += [row(v, GPU_TABLE[0], 'dp', 'bfloat16') for v in ('B/16', 'L/16')]
  # L/16 at 512 per GPU needs more than an A100 40GB: micro-batches.
  table += [row('L/16', GPU_TABLE[0], 'dp', 'bfloat16',
                note=f'{a} micro-batches', grad_accum_steps=a)
            for a in (2, 4)]
  return table


def priority(row: Row) -> tuple:
  """Compile order, so that a partial run still covers every topology: the
  GPU rows (minutes each, not hours), then the B/16 v5e-256 rows with the
  attentive-dtype and 2-slice ones, then float32 data-parallel for every
  model and topology, then FSDP, then bfloat16 (which changes memory, not
  FLOPs)."""
  if row.gpu:
    return (0,)
  overrides = dict(row.overrides)
  return (1, row.topology != 'v5e:16x16' or row.variant != 'B/16' or
          (row.mesh == 'fsdp' and not row.note),
          overrides['model.dtype'] != 'float32', row.mesh != 'dp',
          TOPOLOGIES.index(row.topology), row.variant)


def plan_row(row: Row) -> dict:
  """Runs in a fresh process: the planner's figures for `row`."""
  jax.config.update('jax_platforms', 'cpu')  # as plan.main
  jax.config.update('jax_num_cpu_devices', GPUS)
  jax.config.update('jax_threefry_partitionable', True)  # as the launcher
  config = pretrain.get_config(f'variant={row.variant},epochs=800')
  for key, value in row.overrides:
    parent, _, name = key.rpartition('.')
    _get(config, parent)[name] = value
  target = (plan.gpu_target(row.topology, GPUS) if row.gpu else
            plan.tpu_target(row.topology, row.num_slices))
  p = plan.make_plan(config, target, MFU)
  result = {'needed_gib': p.needed_bytes / 2**30,
            'gflops': p.flops_per_chip and p.flops_per_chip / 1e9,
            'model_gflops': p.model_flops_per_chip / 1e9,
            'compile_s': p.compile_seconds,
            'state_gib': p.state_bytes / 2**30, 'memory': p.memory,
            'suggestions': list(p.suggestions), 'resize': p.resize}
  if not row.gpu:
    return dict(result, **_per_chip(p))
  return dict(result, gpus={gpu: _per_chip(dataclasses.replace(
      p, target=dataclasses.replace(target, chip=hardware.GPUS[gpu])))
                            for gpu in GPU_TABLE})


def _per_chip(p: plan.Plan) -> dict:
  """What depends on the chip: fit, times, the input's vCPUs per host."""
  return {'hbm_gib': p.chip.hbm_gib, 'fits': p.fits,
          'chips': p.num_chips, 'chip': p.chip.name,
          'step_ms_peak': p.step_seconds_at_peak * 1e3,
          'step_ms': p.step_seconds * 1e3,
          'images_per_s': p.images_per_second,
          'train_hours': p.train_seconds / 3600,
          'resize_ms': p.resize_seconds and p.resize_seconds * 1e3,
          'vcpus': p.input_vcpus()}


def _get(config, dotted: str):
  for part in filter(None, dotted.split('.')):
    config = config[part]
  return config


def _fmt(x, spec):
  return '–' if x is None else format(x, spec)


def _tpu_markdown(table: list[Row], results: dict[str, dict]) -> list[str]:
  lines = [
      '# Planner table: DropPos pre-training on Cloud TPU pods', '',
      'Generated by `nice -n 10 python benchmarks/plan_table.py` (jax 0.10.2, '
      'libtpu 0.0.42.1): each row is the train step compiled ahead of time '
      'for the pod by `python -m droppos_jax.plan` (commands below). Global '
      f'batch 4096, ImageNet-1K (1,281,167 images, 312 steps/epoch), 800 '
      f'epochs; times at MFU {MFU:.0%} of the chip\'s peak bf16 FLOP/s, '
      'from the compiled FLOPs (FLOP-bound; float32 matmuls are counted at '
      'the bf16 peak, as TPUs run them at default precision; so float32 '
      'and bfloat16 rows differ in memory, not in time, here). Memory per '
      'chip is arguments + temporaries + outputs - aliased (donated state); '
      '"state" is the parameters and AdamW moments each chip holds. '
      'Analytic FLOPs: `droppos_jax.objectives.droppos.flops_per_example` (matmuls '
      'only; 3x forward for the trained passes, 1x for the attentive pass).',
      '',
      '| model | topology (chips) | mesh | dtype | memory/chip GiB (state) '
      '| fits '
      '| GFLOP/chip/step compiled (analytic) | step ms at peak '
      f'| images/s at {MFU:.0%} | 800 epochs at {MFU:.0%} | compile s |',
      '|---|---|---|---|---|---|---|---|---|---|---|']
  for row in table:
    r = results.get(row.key)
    if row.gpu:
      continue
    dtype = dict(row.overrides)['model.dtype'] + (
        f' ({row.note})' if row.note else '')
    topo = (f'{row.num_slices} x ' if row.num_slices > 1 else '') + row.topology
    if r is None:
      lines.append(f'| {row.variant} | {topo} | {row.mesh} | {dtype} | not '
                   'compiled yet | | | | | | |')
      continue
    if 'error' in r:
      lines.append(f'| {row.variant} | {topo} | {row.mesh} | {dtype} | error: '
                   f'{r["error"]} | | | | | | |')
      continue
    lines.append(
        f'| {row.variant} | {topo} ({r["chips"]} {r["chip"]}) | {row.mesh} '
        f'| {dtype} | {r["needed_gib"]:.2f} of {r["hbm_gib"]:g} '
        f'({r["state_gib"]:.2f}) '
        f'| {"yes" if r["fits"] else "**no**"} '
        f'| {_fmt(r["gflops"], ",.0f")} ({r["model_gflops"]:,.0f}) '
        f'| {r["step_ms_peak"]:.1f} | {r["images_per_s"]:,.0f} '
        f'| {r["train_hours"]:.1f} h | {r["compile_s"]:.0f} |')
  lines += ['', 'Commands (one per row, in order):', '', '```']
  lines += [row.command() for row in table if not row.gpu]
  return lines + ['```', '']


def _gpu_markdown(table: list[Row], results: dict[str, dict]) -> list[str]:
  names = ', '.join(hardware.GPUS[g].name for g in GPU_TABLE)
  lines = [
      f'# Planner table: DropPos pre-training on a node of {GPUS} GPUs', '',
      'Generated by the same script. No GPU compiler runs here: each row is '
      'the train step built as on a GPU (`python -m droppos_jax.plan --gpu '
      '...`: the attentive pass in bfloat16, the crops resized on the GPUs '
      f'by platform) and compiled by XLA:CPU for {GPUS} CPU devices, once, '
      f'then read for each GPU ({names}; only the chip differs). '
      'FLOPs are the compiled matmuls; memory per GPU is the CPU '
      "compiler's buffer assignment, an estimate (XLA:GPU fuses and "
      "schedules differently; cuDNN's fused attention, which the bfloat16 "
      'passes use on GPUs, keeps no token x token scores). Global batch '
      f'4096 ({4096 // GPUS} per GPU), 800 epochs of ImageNet-1K; times at '
      f'MFU {MFU:.0%} of the GPU\'s dense bf16 peak (A100 312, H100 989 '
      'TFLOP/s). Resize: the crop resize on each GPU per step, at least '
      '(roofline of its float32 FLOPs at HIGHEST precision on the CUDA '
      'cores, 19.5 and 67 TFLOP/s, and its memory traffic). vCPUs: what '
      "the node's input needs at the step's images/s, at "
      f'{plan.HOST_RESIZE_IMAGES_PER_VCPU} images/s per vCPU resizing on the '
      f'host and {plan.DEVICE_RESIZE_IMAGES_PER_VCPU} with '
      '`device_resize_window=512` (measured by '
      '`benchmarks/input_throughput.py` on a 2-core AMD EPYC).', '',
      '| model | node | dtype | memory/GPU GiB (state) | fits '
      '| GFLOP/GPU/step compiled (analytic) | step ms at 40% '
      '| images/s per node at 40% | 800 epochs at 40% '
      '| resize on the GPUs, ms/step (share) '
      '| input vCPUs: host resize / device resize | compile s |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for row in filter(lambda row: row.gpu, table):
    r = results.get(row.key)
    dtype = dict(row.overrides)['model.dtype'] + (
        f' ({row.note})' if row.note else '')
    if r is None or 'error' in r:
      lines.append(f'| {row.variant} | | {dtype} | '
                   f'{r["error"] if r else "not compiled yet"} '
                   '| | | | | | | | |')
      continue
    for g in GPU_TABLE:
      c = r['gpus'][g]
      lines.append(
          f'| {row.variant} | {GPUS} x {c["chip"]} | {dtype} '
          f'| {r["needed_gib"]:.1f} of {c["hbm_gib"]:g} ({r["state_gib"]:.2f}) '
          f'| {_gpu_fits(r["needed_gib"], c)} '
          f'| {_fmt(r["gflops"], ",.0f")} ({r["model_gflops"]:,.0f}) '
          f'| {c["step_ms"]:.0f} | {c["images_per_s"]:,.0f} '
          f'| {c["train_hours"]:.1f} h '
          f'| {c["resize_ms"]:.1f} ({c["resize_ms"] / c["step_ms"]:.0%}) '
          f'| {c["vcpus"][0]:.0f} / {c["vcpus"][1]:.0f} '
          f'| {r["compile_s"]:.0f} |')
  lines += ['', 'Commands (one per row, in order):', '', '```']
  lines += [row.command(g) for row in table if row.gpu for g in GPU_TABLE]
  return lines + ['```', '']


def _gpu_fits(needed_gib: float, c: dict) -> str:
  if not c['fits']:
    return '**no**'
  default = plan.JAX_GPU_MEMORY_FRACTION * c['hbm_gib']
  return 'yes' if needed_gib <= default else (
      f'yes, over the {plan.JAX_GPU_MEMORY_FRACTION:.0%} JAX takes by '
      'default: set XLA_PYTHON_CLIENT_MEM_FRACTION')


def markdown(table: list[Row], results: dict[str, dict]) -> str:
  return '\n'.join(_tpu_markdown(table, results) + [''] +
                    _gpu_markdown(table, results))


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--out', default=os.path.join(HERE, 'plan_table.md'))
  p.add_argument('--cache', default=os.path.join(HERE, 'plan_table.jsonl'))
  p.add_argument('--from_cache', action='store_true',
                 help='only write the table of the rows already compiled')
  args = p.parse_args()
  results = {}
  if os.path.exists(args.cache):
    with open(args.cache) as f:
      results = {r['key']: r for r in map(json.loads, f)}
  table = rows()
  spawn = multiprocessing.get_context('spawn')
  for row in sorted(table, key=priority):
    if row.key in results or args.from_cache:
      continue
    print(row.command(), flush=True)
    # A fresh process per row: a pod-sized compile holds gigabytes.
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
      try:
        result = pool.submit(plan_row, row).result()
      except Exception as e:  # pylint: disable=broad-except
        result = {'error': str(e).strip().splitlines()[0][:200]}
    results[row.key] = dict(result, key=row.key)
    print(json.dumps(result), flush=True)
    with open(args.cache, 'a') as f:
      f.write(json.dumps(results[row.key]) + '\n')
    with open(args.out, 'w') as f:
      f.write(markdown(table, results))
  with open(args.out, 'w') as f:
    f.write(markdown(table, results))


if __name__ == '__main__':
  main()
