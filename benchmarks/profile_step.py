r"""Where our pre-training step spends its time on the CPU, op by op.

  python benchmarks/profile_step.py --variant Ti/16 --batch 32

Traces --steps steps of the step that benchmarks/step_time.py times (after
two warm-up steps) with jax.profiler, XLA's per-op trace events on, and sums
each compiled op's time by kind (matmuls, transposes and copies, gathers and
scatters, other elementwise and reduction fusions) and by part of the step
(the attentive pass, the masked pass's forward, the backward, the rest:
masks, loss, optimizer). `busy` is the step's wall time during which some
op ran, `idle` the rest (dispatch, host work, waiting). Independent ops may
run side by side on the cores, so the summed op times exceed `busy`; the
percentages are shares of that sum. Asserts nothing.
"""
import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time

import step_time
from droppos_jax.errors import UserError

KINDS = ('matmul', 'transpose/copy', 'gather/scatter', 'elementwise/reduce')


def instructions(hlo_text: str) -> dict:
  """{name: (kind, op_name)} for every instruction of the entry computation;
  a fusion's kind is read from the computation it calls."""
  bodies = dict(re.findall(r'\n%(\S+) \(.*?\{\n(.*?)\n\}', hlo_text, re.S))
  out = {}
  entry = hlo_text[hlo_text.index('\nENTRY'):]
  for line in entry.splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = .*? ([\w-]+)\(', line)
    if not m:
      continue
    called = re.search(r'calls=%([^,\s]+)', line)
    body = line + (bodies.get(called.group(1), '') if called else '')
    op_name = re.search(r'op_name="([^"]*)"', line)
    out[m.group(1)] = (kind_of(body), op_name.group(1) if op_name else '')
  return out


def kind_of(body: str) -> str:
  """The kind of an instruction from its text and its fusion's body."""
  if re.search(r' (dot|convolution)\(', body):
    return 'matmul'
  if re.search(r' (gather|scatter|dynamic-slice|dynamic-update-slice)\(', body):
    return 'gather/scatter'
  if re.search(r' (transpose|copy)\(', body):
    return 'transpose/copy'
  return 'elementwise/reduce'


def part_of(op_name: str) -> str:
  """The part of the step an op belongs to, from its JAX name stack."""
  if '_full_pass' in op_name:
    return 'attentive pass'
  if 'transpose(jvp(' in op_name:
    return 'backward'
  if 'jvp(' in op_name:
    return 'masked forward'
  return 'masks, loss, optimizer'


def busy_time(events) -> float:
  """Microseconds during which at least one of `events` ran."""
  total, end = 0., -1.
  for start, stop in sorted((e['ts'], e['ts'] + e['dur']) for e in events):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def trace(shapes, steps: int, trace_dir: str):
  """(wall seconds per traced step, XLA op events, compiled HLO text)."""
  import jax
  step, state, images = step_time.build_jax_step(shapes)
  for _ in range(step_time.WARMUP_STEPS):
    state = jax.block_until_ready(step(state, images)[0])
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  start = time.perf_counter()
  for _ in range(steps):
    state = jax.block_until_ready(step(state, images)[0])
  wall = (time.perf_counter() - start) / steps
  jax.profiler.stop_trace()
  path = next(pathlib.Path(trace_dir).rglob('perfetto_trace.json.gz'))
  events = json.load(gzip.open(path))['traceEvents']
  ops = [e for e in events if e.get('ph') == 'X' and 'hlo_op' in e.get('args', {})]
  return wall, ops, step.as_text()


def report(wall: float, ops, hlo_text: str, steps: int, top: int) -> None:
  info = instructions(hlo_text)
  ms = lambda us: us / 1e3 / steps
  by_kind, by_part, by_op = (collections.defaultdict(float) for _ in range(3))
  for e in ops:
    kind, op_name = info.get(e['args']['hlo_op'], ('elementwise/reduce', ''))
    by_kind[kind] += e['dur']
    by_part[part_of(op_name), kind] += e['dur']
    by_op[re.sub(r'blocks_\d+', 'blocks_*', op_name), kind] += e['dur']
  busy, summed = busy_time(ops), sum(by_kind.values())
  print(f'{1e3 * wall:.1f} ms per step: ops busy {ms(busy):.1f} ms, idle '
        f'{1e3 * wall - ms(busy):.1f} ms; op times summed {ms(summed):.1f} ms')
  for kind in KINDS:
    print(f'  {kind:22s} {ms(by_kind[kind]):8.1f} ms {100 * by_kind[kind] / summed:5.1f} %')
  print('by part of the step (ms): ' + ' | '.join(KINDS))
  for part in ('attentive pass', 'masked forward', 'backward',
               'masks, loss, optimizer'):
    print(f'  {part:24s}' + ''.join(f'{ms(by_part[part, k]):10.1f}' for k in KINDS))
  print(f'top {top} ops outside matmuls (summed over blocks):')
  rest = [(t, name, kind) for (name, kind), t in by_op.items() if kind != 'matmul']
  for t, name, kind in sorted(rest, reverse=True)[:top]:
    print(f'  {ms(t):8.1f} ms  {kind:18s} {name.removeprefix("jit(train_step)/")}')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--variant', default='Ti/16')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--batch', type=int, default=None,
                 help=f'default: {step_time.BATCH}, else 32')
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--top', type=int, default=12)
  args = p.parse_args(argv)
  if args.steps < 1:
    raise UserError(f'--steps={args.steps} must be >= 1.')
  shapes = step_time.Shapes(args.variant, args.image_size,
                            args.batch or step_time.BATCH.get(args.variant, 32))
  shapes.grid  # validates the variant and the image size
  # Per-op trace events; read when the backend starts, so before any jax op.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_cpu_enable_xprof_traceme=true').strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  with tempfile.TemporaryDirectory() as trace_dir:
    wall, ops, hlo_text = trace(shapes, args.steps, trace_dir)
  print(f'{shapes.variant}, {shapes.image_size} px, batch {shapes.batch}, '
        f'float32, {args.steps} traced steps')
  report(wall, ops, hlo_text, args.steps, args.top)


if __name__ == '__main__':
  try:
    main()
  except UserError as e:
    sys.exit(f'error: {e}')
