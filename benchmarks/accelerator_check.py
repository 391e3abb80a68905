r"""Checks that the defaults chosen for accelerators hold on this host's GPU
or TPU, in one command that prints one verdict table.

  python benchmarks/accelerator_check.py            # a GPU or TPU host: < 10 min
  python benchmarks/accelerator_check.py --quick    # tiny sizes: the CPU test's run

One row per check, each PASS, FAIL or SKIP (a SKIP says why):
  attention   cuDNN's fused attention (model.attention='auto' picks it for
              bfloat16 on NVIDIA GPUs) against XLA's, on the recipe model's
              shapes in bfloat16: the logits, the attentive pass's tokens and
              the parameter gradients. Each side's relative L2 error against
              a float32 XLA reference at HIGHEST matmul precision; cuDNN
              passes if its error is at most ATTENTION_FACTOR (2) times XLA's
              own bfloat16 error (floor: bfloat16's epsilon, 2^-8). Both
              round to bfloat16, in other places; a wrong mask, scale or
              layout is off by orders more.
  training    the demo model trained --train_steps (50) steps, same
              initialisation, batches and masks, three ways: true float32
              (attentive pass float32, HIGHEST precision: the reference),
              float32 with the accelerator defaults (attentive pass
              'auto' = bfloat16, default matmul precision: TF32 on GPUs,
              bfloat16 passes on TPUs), and bfloat16. A curve passes if its
              loss stays within --loss_tolerance (5 %) of the reference's
              fall (its first loss minus its lowest) at every step: the
              curves then differ by a twentieth of what training changes.
  step        the recipe's step (B/16 at 224 px, the paper's 64 images per
              GPU) per dtype: median time over --steps steps, images/s,
              TFLOP/s and MFU, compiled FLOPs over the chip's bf16 peak as
              the trainer logs it (droppos_jax/hardware.py). Passes at MFU
              >= --min_mfu (30 %): the planner's times assume 40 %.
  batch       the largest per-device batch whose compiled float32 step fits
              the device's memory (memory_stats' bytes_limit, or
              --memory_limit_mib), by compiled memory (arguments +
              temporaries + outputs - donated) alone: nothing runs at that
              batch, so nothing runs out of memory. Passes if the recipe's
              batch fits.
  input       the host's pre-training stream (data.device.train_batches) on
              ImageNet-sized JPEGs written from the demo photos
              (benchmarks/input_throughput.py's), images/s, against the
              images/s that the fastest measured step consumes.

`--quick` runs every check at tiny sizes (ViT mu/16 at 64 px, 20 demo
steps of 16 images, a stated 4 MiB memory limit); on a CPU the attention
row is a SKIP and the MFU row too (no peak is known for a CPU). `--out`
writes the rows and their raw measurements as JSON. Exits 1 if a row FAILs.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import pathlib
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import input_throughput
import step_time
from droppos_jax import compiled as compiled_lib
from droppos_jax import formatting, hardware, plan, sharding, train
from droppos_jax.configs import demo as demo_config
from droppos_jax.configs import pretrain as pretrain_config
from droppos_jax.data import device, sources
from droppos_jax.errors import UserError
from droppos_jax.models import vit
from droppos_jax.objectives import droppos as droppos_objective

PASS, FAIL, SKIP = 'PASS', 'FAIL', 'SKIP'
CHECKS = ('attention', 'training', 'step', 'batch', 'input')
ATTENTION_FACTOR = 2.
BF16_EPS = 2.**-8
ATTENTION_EXPECTED = (f'cuDNN error vs float32 <= max({ATTENTION_FACTOR:g} x '
                      'XLA bf16 error, 2^-8)')
WARMUP_STEPS = 2
NUM_EXAMPLES = plan.IMAGENET_TRAIN_EXAMPLES  # sets the schedule, no data read
# The training check's runs: name -> (model.dtype, model.attentive_dtype,
# matmul precision; None: JAX's default).
TRAIN_RUNS = {
    'true float32': ('float32', 'float32', 'highest'),
    'float32 defaults': ('float32', 'auto', None),
    'bfloat16': ('bfloat16', 'auto', None),
}


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What the checks run at: the recipe's model and per-device batch, the
  demo training's length, the input sample and the memory limit."""
  variant: str = 'B/16'
  image_size: int = 224
  projector: str = 'default'
  batch_per_device: int = 64      # the paper's: 4096 over 64 GPUs
  steps: int = 10                 # timed steps
  train_steps: int = 50
  train_batch: int = 64           # the demo's
  search_step: int = 8            # resolution of the batch search
  max_probes: int = 6             # compiles the batch search may spend
  input_files: int = 256
  input_batches: int = 20
  memory_limit: Optional[int] = None  # bytes per device; None: the device's


QUICK = Sizes(variant='mu/16', image_size=64, projector='tiny',
              batch_per_device=8, steps=3, train_steps=20, train_batch=16,
              search_step=4, max_probes=5, input_files=32, input_batches=5,
              memory_limit=4 * 2**20)


@dataclasses.dataclass
class Row:
  check: str
  measured: str
  expected: str
  verdict: str
  reason: str = ''                # why, for a FAIL or a SKIP
  seconds: float = 0.
  data: dict = dataclasses.field(default_factory=dict)  # raw, for --out


# ---------------------------------------------------------------- verdicts ---

def relative_error(tree, reference) -> float:
  """||tree - reference|| / ||reference|| over all leaves, in float64."""
  pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(reference))
  diff = norm = 0.
  for x, ref in pairs:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    diff += np.sum((x - ref)**2)
    norm += np.sum(ref**2)
  return math.sqrt(diff / norm)


def attention_row(xla: dict[str, float], cudnn: dict[str, float]) -> Row:
  """The verdict on cuDNN's errors against XLA's (both bfloat16, each
  against the float32 reference), per compared output."""
  allowed = {k: max(ATTENTION_FACTOR * xla[k], BF16_EPS) for k in xla}
  bad = [k for k in xla if not cudnn[k] <= allowed[k]]
  return Row(
      'attention: cuDNN vs XLA, bfloat16',
      '; '.join(f'{k} {cudnn[k]:.1e} (XLA {xla[k]:.1e})' for k in xla),
      ATTENTION_EXPECTED, FAIL if bad else PASS,
      f'over the limit: {", ".join(bad)}' if bad else '',
      data={'xla': xla, 'cudnn': cudnn})


def curve_row(name: str, reference: np.ndarray, losses: np.ndarray,
              tolerance: float) -> Row:
  """The verdict on one loss curve against the reference's, step by step."""
  fall = float(reference[0] - reference.min())
  diff = float(np.max(np.abs(losses - reference)))
  limit = tolerance * fall
  reason = ''
  if not np.all(np.isfinite(losses)):
    reason = 'a loss is not finite'
  elif not fall > 0:
    reason = 'the true float32 reference did not learn (its loss never fell)'
  elif not diff <= limit:
    reason = (f'apart by {diff:.4f} at step '
              f'{int(np.argmax(np.abs(losses - reference))) + 1}')
  return Row(
      f'training: {name} vs true float32, {len(reference)} demo steps',
      f'max abs loss diff {diff:.4f}; fall {fall:.3f}; final loss '
      f'{losses[-1]:.4f} vs {reference[-1]:.4f}',
      f'<= {tolerance:.0%} of the fall = {limit:.4f}',
      FAIL if reason else PASS, reason,
      data={'losses': losses.tolist(), 'reference': reference.tolist()})


def largest_batch(memory: Callable[[int], float], limit: float, *, start: int,
                  step: int, maximum: int, max_probes: int
                  ) -> tuple[int, int, dict[int, float]]:
  """The largest multiple of `step` in [step, maximum] with memory(b) <=
  limit, found from few probes of `memory` (each a compile). Activations
  grow about linearly with the batch, so each probe interpolates memory in
  the batch between the two probes nearest the limit (from `start`, up by
  extrapolation or doubling until one does not fit); where a probe did not
  halve the bracket (curvature, or the compiler's inf), the next bisects it.

  Returns (largest fitting batch or 0, the smallest batch known not to fit
  or maximum + step, {batch: memory probed}); the two are `step` apart
  unless `max_probes` ran out first. `start` and `maximum` are multiples
  of `step`; memory(b) may be inf (the compiler ran out of memory).
  """
  probed = {}
  lo, hi = 0, maximum + step
  batch = start
  while hi - lo > step and len(probed) < max_probes:
    probed[batch] = memory(batch)
    width = hi - lo
    if probed[batch] <= limit:
      lo = batch
    else:
      hi = batch
    bounded = hi <= maximum
    if bounded and hi - lo > width / 2:
      batch = (lo + hi) // 2 // step * step
    else:
      batch = _interpolated(probed, lo, hi, limit, step)
  return lo, hi, probed


def _interpolated(probed: dict[int, float], lo: int, hi: int, limit: float,
                  step: int) -> int:
  """The batch where memory meets `limit` on the line through the two
  finite probes nearest it, within the bracket (lo, hi)."""
  finite = sorted((b, m) for b, m in probed.items() if math.isfinite(m))
  fits = [p for p in finite if p[1] <= limit]
  over = [p for p in finite if p[1] > limit]
  near = fits[-1:] + over[:1] if fits and over else fits[-2:] or over[:2]
  if len(near) == 2 and near[0][1] != near[1][1]:
    (b0, m0), (b1, m1) = near
    guess = b0 + (limit - m0) * (b1 - b0) / (m1 - m0)
  else:  # one probe: double up from a fit, halve down from a miss
    guess = 2 * lo if lo else hi / 2
  return min(max(int(guess // step) * step, lo + step), hi - step)


# ------------------------------------------------------------- the recipe ---

class Recipe:
  """The pre-training recipe at `sizes` on `mesh`: its Setup and compiled
  step per (per-device batch, dtype), each built once."""

  def __init__(self, sizes: Sizes, mesh: jax.sharding.Mesh):
    self.sizes, self.mesh = sizes, mesh
    self._built = {}

  def config(self, per_device: int, dtype: str):
    c = pretrain_config.get_config(f'variant={self.sizes.variant}')
    c.image_size = self.sizes.image_size
    c.model.projector = self.sizes.projector
    c.model.dtype = dtype
    c.batch_size = per_device * self.mesh.size
    return c

  def setup(self, config=None) -> train.Setup:
    """The Setup of `config` (default: the float32 recipe), not compiled."""
    config = config or self.config(self.sizes.batch_per_device, 'float32')
    return train.setup(config, NUM_EXAMPLES, self.mesh)

  def compiled(self, per_device: int, dtype: str):
    """(Setup, compiled train step)."""
    if (per_device, dtype) not in self._built:
      s = self.setup(self.config(per_device, dtype))
      self._built[per_device, dtype] = s, s.compile()
    return self._built[per_device, dtype]

  def memory(self, per_device: int, dtype: str = 'float32') -> float:
    """Bytes per device the compiled step needs; inf where the compiler
    itself ran out of memory (TPUs check at compile time)."""
    try:
      _, step = self.compiled(per_device, dtype)
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      return math.inf
    return compiled_lib.memory_bytes(step.memory_analysis())


def random_images(s: train.Setup) -> jax.Array:
  """A seeded batch of the step's input shape, laid out as the step takes it."""
  return jax.device_put(
      jax.random.normal(jax.random.key(1), s.batch_spec.shape),
      s.batch_spec.sharding)


def device_summary(mesh) -> str:
  d = mesh.devices.flat[0]
  return f'{mesh.size} x {d.device_kind} ({d.platform}), jax {jax.__version__}'


# ----------------------------------------------------------------- checks ---

def cudnn_unavailable() -> Optional[str]:
  """Why cuDNN attention cannot run on this host, or None if it can."""
  d = jax.devices()[0]
  if d.platform == 'gpu' and d.device_kind.startswith('NVIDIA'):
    return None
  return (f'cuDNN attention runs on NVIDIA GPUs only; this host has '
          f'{d.platform} ({d.device_kind}), where model.attention=auto picks '
          f'{vit.attention_implementation("auto", jnp.bfloat16)}')


def attention_outputs(recipe: Recipe, params, images, *, dtype: str,
                      attention: str, precision: Optional[str]) -> dict:
  """The recipe model's logits, attentive-pass tokens and loss gradients
  on `images` with the given compute dtype (the attentive pass's too),
  attention implementation and matmul precision, on the host."""
  c = recipe.config(recipe.sizes.batch_per_device, dtype)
  c.model.attention, c.model.attentive_dtype = attention, dtype
  s = recipe.setup(c)
  cfg = s.objective

  def outputs(params, images):
    ids_keep, drop_mask = cfg.masking.sample(jax.random.key(0),
                                             images.shape[0], cfg.grid)
    out = s.model.apply({'params': params}, images, ids_keep, drop_mask,
                        attentive=True)
    loss = lambda p: droppos_objective.masked_loss_fn(
        p, s.model, images, ids_keep, drop_mask, cfg.sigma_at(0), cfg)[0]
    return {'logits': out['logits'],
            'attentive pass': out['attentive']['tokens'],
            'gradients': jax.grad(loss)(params)}

  with jax.default_matmul_precision(precision):
    return jax.device_get(jax.jit(outputs)(params, images))


def check_attention(recipe: Recipe, candidate: str = 'cudnn') -> Row:
  """cuDNN (`candidate`) against XLA in bfloat16, both against float32."""
  if candidate == 'cudnn' and (reason := cudnn_unavailable()):
    return Row('attention: cuDNN vs XLA, bfloat16', '-', ATTENTION_EXPECTED,
               SKIP, reason)
  s = recipe.setup()
  params, images = s.init_state()['params'], random_images(s)
  run = lambda **kw: attention_outputs(recipe, params, images, **kw)
  reference = run(dtype='float32', attention='xla', precision='highest')
  errors = {}
  for name in ('xla', candidate):
    out = run(dtype='bfloat16', attention=name, precision=None)
    errors[name] = {k: relative_error(out[k], reference[k]) for k in out}
  row = attention_row(errors['xla'], errors[candidate])
  row.measured += (f'; auto picks '
                   f'{vit.attention_implementation("auto", jnp.bfloat16)}')
  return row


def demo_losses(sizes: Sizes, mesh) -> dict[str, np.ndarray]:
  """Loss curves of the demo model over the same batches and masks, one per
  TRAIN_RUNS entry (no warm-up: the run is short)."""
  base = demo_config.get_config()
  base.num_train_steps, base.warmup_epochs = sizes.train_steps, 0
  base.batch_size = sizes.train_batch
  base.eval.enabled = False
  source = sources.open_source(base.data)
  batches, curves = None, {}
  for name, (dtype, attentive, precision) in TRAIN_RUNS.items():
    c = base.copy_and_resolve_references()
    c.model.dtype, c.model.attentive_dtype = dtype, attentive
    with jax.default_matmul_precision(precision):
      s = train.setup(c, source.size, mesh)
      step = s.compile()
    if batches is None:
      batches = list(itertools.islice(device.train_batches(
          source, s.augment, image_hw=s.objective.image_hw,
          batch_size=c.batch_size, seed=c.seed, start_step=0, mesh=mesh),
          sizes.train_steps))
    state, losses = s.init_state(), []
    for batch in batches:
      state, metrics = step(state, batch['image'])
      losses.append(metrics['loss'])
    curves[name] = np.asarray(jax.device_get(losses), np.float64)
  return curves


def check_training(sizes: Sizes, mesh, tolerance: float) -> list[Row]:
  curves = demo_losses(sizes, mesh)
  reference = curves.pop('true float32')
  return [curve_row(name, reference, losses, tolerance)
          for name, losses in curves.items()]


def check_step(recipe: Recipe, dtype: str, min_mfu: float
               ) -> tuple[Row, float]:
  """The recipe's step in `dtype`: (its row, median seconds per step)."""
  per = recipe.sizes.batch_per_device
  s, step = recipe.compiled(per, dtype)
  images = random_images(s)
  times = step_time.timed(lambda state: jax.block_until_ready(
      step(state, images)[0]), s.init_state(), recipe.sizes.steps,
      WARMUP_STEPS)
  seconds = statistics.median(times)
  flops = float(compiled_lib.cost(step).get('flops', 0.))
  tflops = flops / seconds / 1e12
  measured = (f'{formatting.duration(seconds)}/step, '
              f'{s.batch_spec.shape[0] / seconds:,.0f} img/s, '
              f'{tflops:.3g} TFLOP/s per device')
  kind = recipe.mesh.devices.flat[0].device_kind
  chip = hardware.chip(kind)
  verdict, reason, mfu = SKIP, (f'no peak FLOP/s known for {kind!r} '
                                '(droppos_jax/hardware.py): MFU not judged'), None
  if chip:
    mfu = tflops / chip.peak_tflops
    measured += f', MFU {mfu:.1%} of {chip.peak_tflops:g} TFLOP/s'
    verdict, reason = ((PASS, '') if mfu >= min_mfu else
                       (FAIL, f'MFU {mfu:.1%} < {min_mfu:.0%}'))
  return Row(f'step: {s.description} {dtype}, {per}/device', measured,
             f'MFU >= {min_mfu:.0%} (the planner assumes 40 %)', verdict,
             reason, data={'seconds': times, 'flops_per_device': flops,
                           'mfu': mfu}), seconds


def memory_limit(sizes: Sizes, mesh) -> tuple[Optional[int], str]:
  """(bytes per device, where the figure comes from), or (None, why not)."""
  if sizes.memory_limit is not None:
    return sizes.memory_limit, 'stated'
  stats = mesh.devices.flat[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return stats['bytes_limit'], "the device's bytes_limit"
  return None, (f'{mesh.devices.flat[0].platform} reports no memory limit; '
                'pass --memory_limit_mib')


def check_batch(recipe: Recipe) -> Row:
  sizes = recipe.sizes
  name = f'largest batch per device, {sizes.variant} float32'
  limit, source = memory_limit(sizes, recipe.mesh)
  expected = f'>= {sizes.batch_per_device} (the recipe\'s)'
  if limit is None:
    return Row(name, '-', expected, SKIP, source)
  size = formatting.size
  lo, hi, probed = largest_batch(
      recipe.memory, limit, start=sizes.batch_per_device,
      step=sizes.search_step, maximum=2**16, max_probes=sizes.max_probes)
  bracket = '' if hi - lo <= sizes.search_step else f' (< {hi}: search stopped)'
  at = f', {size(probed[lo])}' if lo else ''
  measured = (f'{lo} per device{at} of {size(limit)} ({source}){bracket}; '
              f'{len(probed)} compiles; not run at that batch')
  fits = probed[sizes.batch_per_device] <= limit
  return Row(name, measured, expected, PASS if fits else FAIL,
             '' if fits else f'the recipe\'s batch needs '
             f'{size(probed[sizes.batch_per_device])}',
             data={'largest': lo, 'smallest_over': hi, 'limit': limit,
                   'probed': {str(b): m if math.isfinite(m) else None
                              for b, m in probed.items()}})


def check_input(recipe: Recipe, step_seconds: Optional[float],
                folder: pathlib.Path) -> Row:
  """The host's stream on JPEGs in `folder` against the step's appetite."""
  sizes = recipe.sizes
  s = recipe.setup()
  batch = s.batch_spec.shape[0]
  input_throughput.write_jpegs(folder, sizes.input_files)
  source = sources.open_source(dict(source='folder', path=str(folder)))
  stream = device.train_batches(
      source, s.augment, image_hw=s.objective.image_hw, batch_size=batch,
      seed=0, start_step=0, mesh=recipe.mesh)
  times = step_time.timed(lambda _: jax.block_until_ready(next(stream)), None,
                          sizes.input_batches, WARMUP_STEPS)
  rate = batch * len(times) / sum(times)
  name = f'input: host stream, {s.objective.image_hw[0]} px JPEGs'
  measured = f'{rate:,.0f} img/s'
  if step_seconds is None:
    return Row(name, measured, '>= the step\'s img/s', SKIP,
               'no step was timed (--checks without step)')
  need = batch / step_seconds
  keeps_up = rate >= need
  return Row(name, f'{measured} vs the step\'s {need:,.0f}',
             '>= the fastest step\'s img/s', PASS if keeps_up else FAIL,
             '' if keeps_up else 'the host cannot keep up: see '
             '--config.device_resize_window in the README',
             data={'images_per_second': rate, 'step_needs': need})


# ------------------------------------------------------------------ driver ---

def run_check(rows: list[Row], name: str, fn: Callable[[], Any]) -> Any:
  """Runs one check, appending its row(s) timed; a check that raises
  becomes a FAIL row naming the error (traceback on stderr), so that one
  broken check does not hide the others."""
  start = time.perf_counter()
  try:
    result = fn()
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    result = Row(name, '-', '-', FAIL, f'raised {formatting.one_line(e)}')
  out = result[0] if isinstance(result, tuple) else result
  out = out if isinstance(out, list) else [out]
  for row in out:
    row.seconds = (time.perf_counter() - start) / len(out)
  rows.extend(out)
  return result


def table(rows: list[Row]) -> str:
  """The verdict table, Markdown; s: the check's wall seconds (a check with
  two rows splits them)."""
  lines = ['| check | measured | expected | verdict | s |', '|---|---|---|---|---|']
  for r in rows:
    verdict = f'{r.verdict}: {r.reason}' if r.reason else r.verdict
    lines.append(f'| {r.check} | {r.measured} | {r.expected} | {verdict} | '
                 f'{r.seconds:.0f} |')
  return '\n'.join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='tiny sizes (the CPU test): ' + ', '.join(
                     f'{f.name}={getattr(QUICK, f.name)}'
                     for f in dataclasses.fields(Sizes)))
  p.add_argument('--checks', default=','.join(CHECKS),
                 help=f'comma-separated subset of {",".join(CHECKS)}')
  p.add_argument('--num_devices', type=int, default=-1,
                 help='devices of this host to use (-1: all)')
  p.add_argument('--dtypes', default='float32,bfloat16',
                 help='compute dtypes of the step check')
  p.add_argument('--loss_tolerance', type=float, default=0.05,
                 help="max |loss diff| as a share of the reference's fall")
  p.add_argument('--min_mfu', type=float, default=0.3,
                 help='the MFU (0 to 1) each timed step must reach')
  p.add_argument('--memory_limit_mib', type=float,
                 help="per device (default: the device's bytes_limit)")
  p.add_argument('--out', help='also write the rows as JSON here')
  args = p.parse_args(argv)
  args.checks = args.checks.split(',')
  args.dtypes = args.dtypes.split(',')
  for value, valid, flag in ((args.checks, CHECKS, 'checks'),
                             (args.dtypes, tuple(vit.DTYPES), 'dtypes')):
    bad = [v for v in value if v not in valid]
    if bad:
      raise UserError(f'--{flag}={",".join(value)}: {", ".join(bad)} unknown; '
                      f'valid: {", ".join(valid)}.')
  for flag, value, ok in (
      ('loss_tolerance', args.loss_tolerance, args.loss_tolerance > 0),
      ('min_mfu', args.min_mfu, 0 <= args.min_mfu <= 1),
      ('memory_limit_mib', args.memory_limit_mib,
       args.memory_limit_mib is None or args.memory_limit_mib > 0)):
    if not ok:
      raise UserError(f'--{flag}={value} is out of range (loss_tolerance > 0, '
                      '0 <= min_mfu <= 1, memory_limit_mib > 0).')
  return args


def main(argv=None) -> list[Row]:
  args = parse_args(argv)
  sizes = QUICK if args.quick else Sizes()
  if args.memory_limit_mib:
    sizes = dataclasses.replace(sizes,
                                memory_limit=int(args.memory_limit_mib * 2**20))
  mesh = sharding.make_mesh(num_devices=args.num_devices)
  recipe = Recipe(sizes, mesh)
  print(f'Checking {device_summary(mesh)}; {"quick" if args.quick else "full"} '
        f'sizes: {sizes}', flush=True)
  rows: list[Row] = []
  if 'attention' in args.checks:
    run_check(rows, 'attention', lambda: check_attention(recipe))
  if 'training' in args.checks:
    run_check(rows, 'training', lambda: check_training(
        sizes, mesh, args.loss_tolerance))
  step_seconds = []
  for dtype in args.dtypes if 'step' in args.checks else ():
    result = run_check(rows, f'step {dtype}',
                       lambda: check_step(recipe, dtype, args.min_mfu))
    if isinstance(result, tuple):
      step_seconds.append(result[1])
  if 'batch' in args.checks:
    run_check(rows, 'batch', lambda: check_batch(recipe))
  if 'input' in args.checks:
    with tempfile.TemporaryDirectory() as folder:
      run_check(rows, 'input', lambda: check_input(
          recipe, min(step_seconds, default=None), pathlib.Path(folder)))
  print(table(rows))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'device': device_summary(mesh), 'sizes': dataclasses.asdict(sizes),
                 'rows': [dataclasses.asdict(r) for r in rows]}, f, indent=1)
  return rows


if __name__ == '__main__':
  try:
    sys.exit(1 if any(r.verdict == FAIL for r in main()) else 0)
  except UserError as e:
    sys.exit(f'error: {e}')
