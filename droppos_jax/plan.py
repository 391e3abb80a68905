r"""Plans pre-training on a Cloud TPU pod from any machine: compiles the exact
train step for the pod's topology ahead of time, on this machine's CPU, and
reports memory per chip (and whether it fits), FLOPs per step and how long
the recipe takes; with `device_resize_window`, also what resizing the crop
windows costs the chips.

  python -m droppos_jax.plan \
      --config configs/pretrain.py:variant=L/16,epochs=800 --topology v5e:16x16
  python -m droppos_jax.plan \
      --config configs/pretrain.py:variant=B/16,epochs=800 \
      --topology v5e:16x16 --num_slices 2 --mfu 0.35 \
      --config.mesh.data=2 --config.mesh.fsdp=-1 --config.model.dtype=bfloat16

As maxtext's train_compile.py: the TPU compiler (libtpu; `pip install
libtpu==0.0.42.1`, no TPU needed) builds the program for the topology's
devices from abstract inputs, so a step that would not fit fails here as it
would on the pod. Times are FLOP-bound estimates: compiled FLOPs per chip /
(MFU x the chip's peak bf16 FLOP/s), MFU as the trainer logs it. The
analytic count beside the compiled one is the trainer's
(`training_loop.Setup.flops_per_example`).
libtpu's warnings about TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES are
harmless here.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any, Optional

from absl import flags
import jax
from jax.experimental import topologies
import ml_collections

from droppos_jax import compiled as compiled_lib
from droppos_jax import finetune, hardware, launch, settings, sharding, train
from droppos_jax.data import device
from droppos_jax.errors import UserError
from droppos_jax import formatting
from droppos_jax.formatting import duration as _duration
from droppos_jax.formatting import size as _size

IMAGENET_TRAIN_EXAMPLES = 1281167
IMAGENET_CLASSES = 1000
LIBTPU_PIN = 'libtpu==0.0.42.1'  # the version jax 0.10.2's [tpu] extra pins

# generation -> (rank of its chip grid, get_topology_desc options). v4 is
# asked for 'megacore' devices so that one device is one chip, as v5p's are
# by default: memory and FLOPs are then per chip.
GENERATIONS = {
    'v4': (3, {'chip_config_name': 'megacore'}),
    'v5e': (2, {}),
    'v5p': (3, {}),
    'v6e': (2, {}),
}
# Common slices, topology -> Cloud TPU accelerator type (also accepted).
# Any other shape that libtpu accepts for a generation works too.
TOPOLOGIES = {
    'v4:2x2x1': 'v4-8', 'v4:2x2x2': 'v4-16', 'v4:4x4x4': 'v4-128',
    'v4:8x8x8': 'v4-1024',
    'v5e:2x2': 'v5litepod-4', 'v5e:4x4': 'v5litepod-16',
    'v5e:8x8': 'v5litepod-64', 'v5e:16x16': 'v5litepod-256',
    'v5p:2x2x1': 'v5p-8', 'v5p:4x4x4': 'v5p-128', 'v5p:8x8x8': 'v5p-1024',
    'v6e:2x2': 'v6e-4', 'v6e:4x4': 'v6e-16', 'v6e:8x8': 'v6e-64',
    'v6e:16x16': 'v6e-256',
}
_ALIASES = {accelerator: topo for topo, accelerator in TOPOLOGIES.items()}
_ALIASES.update({a.replace('v5litepod', 'v5e'): t for a, t in _ALIASES.items()})


# --------------------------------------------------------------- topology ---

def _valid_topologies() -> str:
  return ', '.join(f'{t} ({a})' for t, a in TOPOLOGIES.items())


def topology_name(name: str) -> str:
  """'v5e:16x16', or a Cloud TPU accelerator type such as 'v5p-128', ->
  the topology name; raises a UserError for names of no known generation."""
  name = _ALIASES.get(name, name)
  match = re.fullmatch(r'(v\w+):(\d+(?:x\d+)*)', name)
  if (not match or match.group(1) not in GENERATIONS or
      match.group(2).count('x') + 1 != GENERATIONS[match.group(1)][0]):
    raise UserError(f'--topology {name!r} is not a TPU topology; valid: '
                    f'{_valid_topologies()}, or another <generation>:<chips '
                    'per axis> of v4, v5p (3 axes), v5e, v6e (2 axes).')
  return name


def topology_devices(name: str, num_slices: int = 1) -> list[Any]:
  """The devices (one per chip) of `num_slices` slices of topology `name`."""
  name = topology_name(name)
  if num_slices < 1:
    raise UserError(f'--num_slices={num_slices} must be >= 1.')
  if importlib.util.find_spec('libtpu') is None:
    raise UserError(f'Compiling for a TPU topology needs libtpu (the TPU '
                    f'compiler; no TPU is used): pip install {LIBTPU_PIN}')
  # No TPU is opened: skip libtpu's one-process-per-host lock, which another
  # JAX process on this machine may hold.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    return list(topologies.get_topology_desc(
        platform='tpu', topology_name=name, num_slices=num_slices,
        **GENERATIONS[name.split(':')[0]][1]).devices)
  except jax.errors.JaxRuntimeError as e:
    reason = formatting.first_line(str(e))
    raise UserError(f'--topology {name!r}: libtpu refused it ({reason}); '
                    f'valid: {_valid_topologies()}.') from None


# ------------------------------------------------------------------ plan ---

@dataclasses.dataclass(frozen=True)
class Plan:
  """What the planner found; sizes in bytes, FLOPs and times per chip."""
  description: str                # the trainer and model, e.g. 'DropPos B/16'
  topology: str
  num_slices: int
  num_chips: int
  num_hosts: int
  chip: hardware.Chip
  mesh: dict[str, int]
  batch_size: int
  steps_per_epoch: int
  total_steps: int
  compile_seconds: float
  fits: bool
  needed_bytes: int               # arguments + temporaries + outputs - aliased
  memory: dict[str, int]          # the parts; empty if the compiler ran out
  compiler_error: str             # its message then, else ''
  state_bytes: int                # parameters + optimizer state, per chip
  param_bytes: int                # all parameters (unsharded)
  flops_per_chip: Optional[float]  # compiled; None if it did not compile
  model_flops_per_chip: float     # analytic (Setup.flops_per_example)
  mfu: float
  suggestions: tuple[str, ...]
  # device_resize_window > 0: device.resize_windows per chip per step,
  # compiled (FLOPs, bytes accessed, the windows' bytes); else None.
  resize: Optional[tuple[float, float, int]] = None

  @property
  def step_seconds_at_peak(self) -> float:
    flops = self.flops_per_chip or self.model_flops_per_chip
    return flops / (self.chip.peak_tflops * 1e12)

  @property
  def step_seconds(self) -> float:
    return self.step_seconds_at_peak / self.mfu

  @property
  def images_per_second(self) -> float:
    return self.batch_size / self.step_seconds

  @property
  def train_seconds(self) -> float:
    return self.total_steps * self.step_seconds


def resize_cost(window: int, size: int, batch_size: int,
                mesh: jax.sharding.Mesh) -> tuple[float, float, int]:
  """(FLOPs, bytes accessed, bytes of windows) per chip per step of
  resizing a batch of crop windows on the chips (device.resize_windows)."""
  batch_sh = sharding.batch_sharding(mesh)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                   sharding=batch_sh)
  windows = spec((batch_size, window, window, 3), jax.numpy.uint8)
  compiled = jax.jit(device.resize_windows, static_argnums=3,
                     out_shardings=batch_sh).lower(
                         windows, spec((batch_size, 2), jax.numpy.int32),
                         spec((batch_size,), jax.numpy.bool_), size).compile()
  cost = compiled_lib.cost(compiled)
  return (float(cost['flops']), float(cost.get('bytes accessed', 0.)),
          windows.size // mesh.size)


def _state_bytes_per_chip(abstract_state: Any) -> int:
  """Bytes each chip holds of the state, from the leaves' shardings."""
  total = 0
  for x in jax.tree.leaves(abstract_state):
    shard = x.sharding.shard_shape(x.shape)
    total += x.dtype.itemsize * math.prod(shard)
  return total


# The TPU compiler's out-of-memory messages: temporaries alone, or the total.
_OOM_TEMPORARIES = re.compile(r'HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds')
_OOM_TOTAL = re.compile(r'Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm')
_UNITS = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def _compiler_oom(e: Exception, arguments: int) -> Optional[int]:
  """The bytes per chip that a program which ran out of HBM needs (from the
  TPU compiler's message, plus `arguments` where it counts temporaries
  only), or None if `e` is no out-of-memory error."""
  match = _OOM_TEMPORARIES.search(str(e))
  if match:
    return int(float(match.group(1)) * _UNITS[match.group(2)]) + arguments
  match = _OOM_TOTAL.search(str(e))
  if match:
    return int(float(match.group(1)) * _UNITS[match.group(2)])
  return None


def _suggestions(config, mesh_shape: dict[str, int], num_slices: int,
                 needed: int, state: int, batch: int,
                 hbm: int) -> tuple[str, ...]:
  """Concrete changes for a step that does not fit, most effective first,
  with rough savings per chip (rerun the planner with one to check).
  `state`: parameters and optimizer state per chip; `batch`: input bytes."""
  out = []
  chips = mesh_shape['data'] * mesh_shape['fsdp']
  per_slice = chips // num_slices
  with_grads = state * 4 // 3  # AdamW: params, mu, nu; gradients as params
  if mesh_shape['fsdp'] < per_slice:
    saved = with_grads * (1 - mesh_shape['fsdp'] / per_slice)
    out.append(f'--config.mesh.data={num_slices} --config.mesh.fsdp=-1: '
               f'splits parameters, gradients and optimizer state '
               f'({_size(with_grads)} per chip) over the {per_slice} chips of '
               f'a slice, about {_size(saved)} less.')
  activations = needed - with_grads - batch  # what scales with the batch
  if activations <= 0:
    return tuple(out)
  grad_accum = config.get('grad_accum_steps')  # pre-training's only
  per_step = config.batch_size // (grad_accum or 1)
  splits = lambda a: per_step % a == 0 and (per_step // a) % chips == 0
  accum = 1
  while (grad_accum and (accum == 1 or needed - activations * (1 - 1 / accum)
                         > hbm) and splits(2 * accum)):
    accum *= 2
  if accum > 1:
    total = config.grad_accum_steps * accum
    out.append(f'--config.grad_accum_steps={total}: the same gradient from '
               f'{total} micro-batches of {config.batch_size // total}, '
               f'activations about 1/{accum}: about '
               f'{_size(activations * (1 - 1 / accum))} less.')
  if config.model.dtype != 'bfloat16':
    out.append(f'--config.model.dtype=bfloat16: activations in bfloat16 '
               f'(parameters stay float32), about {_size(activations / 2)} '
               'less.')
  if config.model.get('remat') is False:
    out.append('--config.model.remat=True: the backward pass recomputes each '
               'encoder block from its input instead of keeping its '
               'activations (about 1/3 more FLOPs for the masked pass).')
  return tuple(out)


def trainer_setup(config: ml_collections.ConfigDict, num_examples: int,
                  mesh: jax.sharding.Mesh):
  """The step of the trainer `config` is for, built for a TPU: fine-tuning
  and linear probing configs name a `protocol` (ImageNet's 1,000 classes
  unless `num_classes` says otherwise); the others pre-train."""
  if 'protocol' in config:
    return finetune.setup(config, num_examples,
                          config.num_classes or IMAGENET_CLASSES, mesh,
                          platform='tpu')
  return train.setup(config, num_examples, mesh, platform='tpu')


def make_plan(config: ml_collections.ConfigDict, topology: str,
              num_slices: int = 1, mfu: float = 0.4,
              num_examples: int = IMAGENET_TRAIN_EXAMPLES) -> Plan:
  """Compiles `config`'s train step for `num_slices` x `topology` and
  measures it (see the module docstring)."""
  if not 0. < mfu <= 1.:
    raise UserError(f'--mfu={mfu} must be in (0, 1], e.g. 0.4.')
  if jax.default_backend() != 'cpu':
    raise UserError('The planner compiles on the CPU: run it as its own '
                    'process (python -m droppos_jax.plan) or with '
                    'JAX_PLATFORMS=cpu.')
  topology = topology_name(topology)
  devices = topology_devices(topology, num_slices)
  chip = hardware.chip(devices[0].device_kind)
  mesh = sharding.make_mesh(config.mesh, -1, devices=devices)
  s = trainer_setup(config, num_examples, mesh)
  state_bytes = _state_bytes_per_chip(s.abstract_state)
  param_bytes = sum(x.size * x.dtype.itemsize
                    for x in jax.tree.leaves(s.abstract_state['params']))
  chips = len(devices)
  model_flops = s.flops_per_example * config.batch_size / chips
  batch_bytes = sum(x.size * x.dtype.itemsize
                    for x in jax.tree.leaves(s.batch_spec)) // chips

  t0 = time.perf_counter()
  flops, memory, error = None, {}, ''
  try:
    compiled = s.compile()
  except jax.errors.JaxRuntimeError as e:
    needed = _compiler_oom(e, state_bytes + batch_bytes)
    if needed is None:
      raise
    error = formatting.first_line(str(e)).rstrip('.')
  else:
    flops, _ = compiled_lib.describe(compiled)
    m = compiled.memory_analysis()
    memory = {'arguments': m.argument_size_in_bytes,
              'temporaries': m.temp_size_in_bytes,
              'outputs': m.output_size_in_bytes,
              'aliased': m.alias_size_in_bytes,
              'code': m.generated_code_size_in_bytes}
    needed = (memory['arguments'] + memory['temporaries'] + memory['outputs']
              - memory['aliased'])
  window = config.get('device_resize_window', 0)
  resize = (resize_cost(window, settings.image_hw(config.image_size)[0], config.batch_size,
                        mesh) if window else None)
  compile_seconds = time.perf_counter() - t0
  hbm = int(chip.hbm_gib * 2**30)
  fits = not error and needed <= hbm
  mesh_shape = dict(mesh.shape)
  return Plan(
      description=s.description, topology=topology, num_slices=num_slices, num_chips=chips,
      num_hosts=len({d.process_index for d in devices}), chip=chip,
      mesh=mesh_shape, batch_size=config.batch_size,
      steps_per_epoch=s.steps_per_epoch, total_steps=s.total_steps,
      compile_seconds=compile_seconds, fits=fits, needed_bytes=needed,
      memory=memory, compiler_error=error, state_bytes=state_bytes,
      param_bytes=param_bytes, flops_per_chip=flops,
      model_flops_per_chip=model_flops, mfu=mfu,
      suggestions=() if fits else _suggestions(
          config, mesh_shape, num_slices, needed, state_bytes, batch_bytes,
          hbm), resize=resize)


# ---------------------------------------------------------------- report ---

def report(plan: Plan, config: ml_collections.ConfigDict) -> str:
  """The planner's printout."""
  c = plan.chip
  slices = f'{plan.num_slices} x ' if plan.num_slices > 1 else ''
  lines = [
      f'{plan.description}, {config.model.dtype}'
      f'{", remat" if config.model.get("remat") else ""}, global batch '
      f'{plan.batch_size} (grad_accum_steps='
      f'{config.get("grad_accum_steps", 1)}), {plan.total_steps} steps '
      f'({plan.steps_per_epoch}/epoch).',
      f'Topology {slices}{plan.topology}: {plan.num_chips} chips of {c.name} '
      f'({c.peak_tflops:g} TFLOP/s bf16, {c.hbm_gib:g} GiB HBM), mesh '
      f'data={plan.mesh["data"]} fsdp={plan.mesh["fsdp"]}; compiled here in '
      f'{plan.compile_seconds:.0f} s.',
  ]
  m = plan.memory
  if m:
    parts = (f'state and batch {_size(m["arguments"])}, temporaries '
             f'{_size(m["temporaries"])}, outputs {_size(m["outputs"])} of '
             f'which {_size(m["aliased"])} reuse the donated state; code '
             f'{_size(m["code"])}')
  else:
    parts = f'the TPU compiler: {plan.compiler_error}'
  verdict = 'fits' if plan.fits else 'DOES NOT FIT'
  at_least = 'at least ' if plan.compiler_error else ''
  lines.append(f'Memory per chip: {at_least}{_size(plan.needed_bytes)} of '
               f'{c.hbm_gib:g} GiB -> {verdict} ({parts}).')
  if plan.suggestions:
    lines.append('To fit, try (rough savings per chip; rerun the planner with '
                 'the flags to check):')
    lines += [f'  {s}' for s in plan.suggestions]
  model = plan.model_flops_per_chip
  if plan.flops_per_chip is not None:
    lines.append(
        f'FLOPs per chip per step: {plan.flops_per_chip / 1e9:,.1f} GFLOP '
        f'compiled; analytic model FLOPs {model / 1e9:,.1f} GFLOP '
        f'(compiled/analytic {plan.flops_per_chip / model:.2f}).')
  else:
    lines.append(f'FLOPs per chip per step: analytic model FLOPs '
                 f'{model / 1e9:,.1f} GFLOP (not compiled).')
  run = (f'{plan.total_steps} steps' if config.num_train_steps > 0 else
         f'{config.epochs:g} epochs ({plan.total_steps} steps)')
  basis = 'compiled' if plan.flops_per_chip is not None else 'analytic'
  lines.append(
      f'Step time: {_duration(plan.step_seconds_at_peak)} at peak ({basis} '
      f'FLOPs, FLOP-bound); at MFU {plan.mfu:.0%}: '
      f'{_duration(plan.step_seconds)} -> {plan.images_per_second:,.0f} '
      f'images/s; {run} in {_duration(plan.train_seconds)}.')
  if plan.resize:
    flops, traffic, windows = plan.resize
    lines.append(
        f'Resizing on the chips (device_resize_window='
        f'{config.device_resize_window}), a jitted function beside the '
        f'step: {flops / 1e9:,.1f} GFLOP (float32 at HIGHEST precision) and '
        f'{traffic / 1e9:,.2f} GB of memory traffic per chip per step; the '
        f'windows arrive as {_size(windows)} per chip per step.')
  hosts = f'{plan.num_hosts} host' + ('s' if plan.num_hosts > 1 else '')
  lines.append(f'Input: {plan.images_per_second / plan.num_hosts:,.0f} '
               f'images/s per host ({hosts}) to keep up.')
  return '\n'.join(lines)


# ----------------------------------------------------------------- command ---

def plan(config: ml_collections.ConfigDict, *, topology: str, num_slices: int,
         mfu: float, num_examples: int) -> Plan:
  """The command: plans and prints."""
  if topology is None:
    raise UserError(f'--topology is required; e.g. {_valid_topologies()}.')
  if num_examples < 1:
    raise UserError(f'--num_examples={num_examples} must be >= 1.')
  result = make_plan(config, topology, num_slices, mfu, num_examples)
  print(report(result, config), flush=True)
  return result


def _flags():
  return [
      lambda: flags.DEFINE_string(
          'topology', None, 'TPU topology to compile for, e.g. v5e:16x16, '
          'v5p:4x4x4, v6e:16x16, v4:2x2x2 (or v5p-128, v6e-256).'),
      lambda: flags.DEFINE_integer('num_slices', 1, 'Slices of --topology '
                                   '(multi-slice over DCN).'),
      lambda: flags.DEFINE_float('mfu', 0.4, 'Model FLOPs utilisation assumed '
                                 'for the time estimates.'),
      lambda: flags.DEFINE_integer(
          'num_examples', IMAGENET_TRAIN_EXAMPLES, 'Training examples per '
          'epoch (default: ImageNet-1K train).'),
  ]


def main():
  # Compile on the host CPU: no TPU backend is started (a TPU VM's chips
  # stay free for training); the topology's devices come from libtpu.
  jax.config.update('jax_platforms', 'cpu')
  launch.run(plan, output=None, extra_flags=_flags())


if __name__ == '__main__':
  main()
