r"""Plans pre-training on a Cloud TPU pod or GPU nodes from any machine:
compiles the exact train step ahead of time, on this machine's CPU, and
reports memory per chip (and whether it fits), FLOPs per step, how long the
recipe takes, what resizing the crop windows costs the chips, and how many
host vCPUs the input needs.

  python -m droppos_jax.plan \
      --config configs/pretrain.py:variant=L/16,epochs=800 --topology v5e:16x16
  python -m droppos_jax.plan \
      --config configs/pretrain.py:variant=B/16,epochs=800 \
      --topology v5e:16x16 --num_slices 2 --mfu 0.35 \
      --config.mesh.data=2 --config.mesh.fsdp=-1 --config.model.dtype=bfloat16
  python -m droppos_jax.plan \
      --config configs/pretrain.py:variant=B/16,epochs=800 \
      --gpu h100 --num_gpus 8 --config.model.dtype=bfloat16

TPUs, as maxtext's train_compile.py: the TPU compiler (libtpu; `pip install
libtpu==0.0.42.1`, no TPU needed) builds the program for the topology's
devices from abstract inputs, so a step that would not fit fails here as it
would on the pod. libtpu's warnings about TPU_ACCELERATOR_TYPE and
TPU_WORKER_HOSTNAMES are harmless here.
GPUs: no GPU compiler runs here, so a GPU plan is analytic: the step is
built as on a GPU and compiled for one CPU device per GPU; FLOPs and memory
per GPU are the CPU compiler's (see GPU_CAVEATS).
Times are FLOP-bound estimates: compiled FLOPs per chip / (MFU x the chip's
peak bf16 FLOP/s), MFU as the trainer logs it. The analytic count beside
the compiled one is the trainer's (`training_loop.Setup.flops_per_example`).
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
from droppos_jax.data import device, transforms
from droppos_jax.errors import UserError
from droppos_jax import formatting
from droppos_jax.formatting import duration as _duration
from droppos_jax.formatting import size as _size

IMAGENET_TRAIN_EXAMPLES = 1281167
IMAGENET_CLASSES = 1000
LIBTPU_PIN = 'libtpu==0.0.42.1'  # the version jax 0.10.2's [tpu] extra pins
# A GPU plan compiles for one CPU device per GPU: the planner's process
# holds this many (64 nodes of 8).
MAX_GPUS = 512
# Images/s per vCPU of the input at 224 px, measured by
# benchmarks/input_throughput.py on a 2-core AMD EPYC (folder stream; README,
# the input pipeline): resizing on the host, and the host's part with
# device_resize_window=512 (decode the crop window, pad, transfer).
HOST_RESIZE_IMAGES_PER_VCPU = 175
DEVICE_RESIZE_IMAGES_PER_VCPU = 662
# The share of a GPU's memory JAX's allocator takes by default
# (XLA_PYTHON_CLIENT_MEM_FRACTION).
JAX_GPU_MEMORY_FRACTION = 0.75
# What a GPU plan cannot see, from compiling for CPU devices.
GPU_CAVEATS = (
    "GPU plans are analytic: the step is built for a GPU (the 'auto' "
    'settings and the crop resize resolve as there) but compiled by the '
    'CPU compiler, one CPU device per GPU, so memory per GPU is an estimate '
    '(XLA:GPU fuses and schedules differently, and where the compute is '
    "bfloat16, cuDNN's fused attention keeps no token x token scores); the "
    'FLOPs are the same matmuls.')

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


# ---------------------------------------------------------------- targets ---

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


@dataclasses.dataclass(frozen=True)
class Target:
  """What a plan compiles for: a TPU pod's devices (from libtpu), or CPU
  devices standing in for GPUs, one each (no GPU compiler runs here)."""
  name: str             # 'v5e:16x16', '2 x v5e:16x16', '8 x H100'
  platform: str         # 'tpu' or 'gpu': how the trainer builds its step
  chip: hardware.Chip
  devices: tuple[Any, ...]
  num_hosts: int        # TPU hosts, or GPU nodes
  num_slices: int = 1

  @property
  def unit(self) -> str:
    return 'GPU' if self.platform == 'gpu' else 'chip'

  @property
  def host(self) -> str:
    return 'node' if self.platform == 'gpu' else 'host'


def tpu_target(topology: str, num_slices: int = 1) -> Target:
  """`num_slices` slices of TPU `topology` (topology_name's names)."""
  devices = topology_devices(topology, num_slices)
  name = topology_name(topology)
  return Target(f'{num_slices} x {name}' if num_slices > 1 else name, 'tpu',
                hardware.chip(devices[0].device_kind), tuple(devices),
                len({d.process_index for d in devices}), num_slices)


def gpu_target(gpu: str, num_gpus: int = hardware.GPUS_PER_NODE) -> Target:
  """`num_gpus` GPUs named `gpu` (hardware.GPUS), in nodes of 8."""
  if gpu not in hardware.GPUS:
    raise UserError(f'--gpu {gpu!r} is not a known GPU; valid: '
                    f'{", ".join(hardware.GPUS)}.')
  per_node = hardware.GPUS_PER_NODE
  if not 1 <= num_gpus <= MAX_GPUS or (num_gpus > per_node and
                                       num_gpus % per_node):
    raise UserError(f'--num_gpus={num_gpus} must be 1 to {per_node} (one '
                    f'node) or a multiple of {per_node} up to {MAX_GPUS} '
                    f'(nodes of {per_node}).')
  cpus = jax.devices('cpu')
  if len(cpus) < num_gpus:
    raise UserError(f'--num_gpus={num_gpus}: a GPU plan compiles for one CPU '
                    f'device per GPU and this process has {len(cpus)}; run '
                    f'python -m droppos_jax.plan, which has {MAX_GPUS}.')
  chip = hardware.GPUS[gpu]
  return Target(f'{num_gpus} x {chip.name}', 'gpu', chip,
                tuple(cpus[:num_gpus]), max(1, num_gpus // per_node))


# ------------------------------------------------------------------ plan ---

@dataclasses.dataclass(frozen=True)
class Plan:
  """What the planner found; sizes in bytes, FLOPs and times per chip."""
  description: str                # the trainer and model, e.g. 'DropPos B/16'
  target: Target
  mesh: dict[str, int]
  batch_size: int
  steps_per_epoch: int
  total_steps: int
  compile_seconds: float
  needed_bytes: int               # arguments + temporaries + outputs - aliased
  memory: dict[str, int]          # the parts; empty if the compiler ran out
  compiler_error: str             # its message then, else ''
  state_bytes: int                # parameters + optimizer state, per chip
  param_bytes: int                # all parameters (unsharded)
  flops_per_chip: Optional[float]  # compiled; None if it did not compile
  model_flops_per_chip: float     # analytic (Setup.flops_per_example)
  mfu: float
  suggestions: tuple[str, ...]
  resize_window: int              # device_resize_window as resolved
  # resize_window > 0: device.resize_windows per chip per step, compiled
  # (FLOPs, bytes accessed, the windows' bytes); else None.
  resize: Optional[tuple[float, float, int]] = None

  @property
  def chip(self) -> hardware.Chip:
    return self.target.chip

  @property
  def num_chips(self) -> int:
    return len(self.target.devices)

  @property
  def fits(self) -> bool:
    return (not self.compiler_error and
            self.needed_bytes <= self.chip.hbm_gib * 2**30)

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

  @property
  def resize_seconds(self) -> Optional[float]:
    """At least this long per step resizing on each chip (the roofline of
    its float32 FLOPs at HIGHEST precision and its memory traffic)."""
    if not self.resize:
      return None
    flops, traffic, _ = self.resize
    return max(flops / (self.chip.highest_f32_tflops * 1e12),
               traffic / (self.chip.hbm_gb_per_s * 1e9))

  @property
  def images_per_host(self) -> float:
    return self.images_per_second / self.target.num_hosts

  def input_vcpus(self) -> tuple[float, float]:
    """vCPUs per host the input needs to keep up: resizing on the host, and
    with device_resize_window (the measured per-vCPU rates)."""
    return (self.images_per_host / HOST_RESIZE_IMAGES_PER_VCPU,
            self.images_per_host / DEVICE_RESIZE_IMAGES_PER_VCPU)


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
                  mesh: jax.sharding.Mesh, platform: str):
  """The step of the trainer `config` is for, built for `platform`:
  fine-tuning and linear probing configs name a `protocol` (ImageNet's
  1,000 classes unless `num_classes` says otherwise); the others pre-train."""
  if 'protocol' in config:
    return finetune.setup(config, num_examples,
                          config.num_classes or IMAGENET_CLASSES, mesh,
                          platform=platform)
  return train.setup(config, num_examples, mesh, platform=platform)


def _compile(s, arguments: int) -> tuple[Optional[float], dict, str, int]:
  """(compiled FLOPs per chip, memory parts, the compiler's out-of-memory
  message, bytes needed per chip) of Setup `s`'s step; `arguments`: the
  state's and batch's bytes, for a compiler that counts temporaries only."""
  try:
    compiled = s.compile()
  except jax.errors.JaxRuntimeError as e:
    needed = _compiler_oom(e, arguments)
    if needed is None:
      raise
    return None, {}, formatting.first_line(str(e)).rstrip('.'), needed
  flops, _ = compiled_lib.describe(compiled)
  m = compiled.memory_analysis()
  memory = {'arguments': m.argument_size_in_bytes,
            'temporaries': m.temp_size_in_bytes,
            'outputs': m.output_size_in_bytes,
            'aliased': m.alias_size_in_bytes,
            'code': m.generated_code_size_in_bytes}
  return flops, memory, '', compiled_lib.memory_bytes(m)


def make_plan(config: ml_collections.ConfigDict, target: Target,
              mfu: float = 0.4,
              num_examples: int = IMAGENET_TRAIN_EXAMPLES) -> Plan:
  """Compiles `config`'s train step for `target` and measures it (see the
  module docstring)."""
  if not 0. < mfu <= 1.:
    raise UserError(f'--mfu={mfu} must be in (0, 1], e.g. 0.4.')
  if jax.default_backend() != 'cpu':
    raise UserError('The planner compiles on the CPU: run it as its own '
                    'process (python -m droppos_jax.plan) or with '
                    'JAX_PLATFORMS=cpu.')
  mesh = sharding.make_mesh(config.mesh, -1, devices=target.devices)
  s = trainer_setup(config, num_examples, mesh, target.platform)
  chips = len(target.devices)
  state_bytes = _state_bytes_per_chip(s.abstract_state)
  batch_bytes = sum(x.size * x.dtype.itemsize
                    for x in jax.tree.leaves(s.batch_spec)) // chips
  t0 = time.perf_counter()
  flops, memory, error, needed = _compile(s, state_bytes + batch_bytes)
  # XLA counts a loop's body once: the micro-batch loop runs
  # grad_accum_steps times (AdamW's update, multiplied with it, is under
  # 0.1 % of a ViT-B step's FLOPs).
  flops = flops and flops * config.get('grad_accum_steps', 1)
  window = s.augment.device_resize_window
  resize = (resize_cost(window, settings.image_hw(config.image_size)[0],
                        config.batch_size, mesh) if window else None)
  mesh_shape = dict(mesh.shape)
  p = Plan(
      description=s.description, target=target, mesh=mesh_shape,
      batch_size=config.batch_size, steps_per_epoch=s.steps_per_epoch,
      total_steps=s.total_steps, compile_seconds=time.perf_counter() - t0,
      needed_bytes=needed, memory=memory, compiler_error=error,
      state_bytes=state_bytes,
      param_bytes=sum(x.size * x.dtype.itemsize
                      for x in jax.tree.leaves(s.abstract_state['params'])),
      flops_per_chip=flops,
      model_flops_per_chip=s.flops_per_example * config.batch_size / chips,
      mfu=mfu, suggestions=(), resize_window=window, resize=resize)
  if p.fits:
    return p
  return dataclasses.replace(p, suggestions=_suggestions(
      config, mesh_shape, target.num_slices, needed, state_bytes,
      batch_bytes, int(target.chip.hbm_gib * 2**30)))


# ---------------------------------------------------------------- report ---

def _header(plan: Plan, config: ml_collections.ConfigDict) -> list[str]:
  t, c = plan.target, plan.chip
  if t.platform == 'gpu':
    where = (f'{t.name}: {plan.num_chips} GPUs in {t.num_hosts} '
             f'node{"s" if t.num_hosts > 1 else ""} ({c.peak_tflops:g} '
             f'TFLOP/s bf16, {c.hbm_gib:g} GiB each)')
    compiled_for = f'{plan.num_chips} CPU devices'
  else:
    where = (f'Topology {t.name}: {plan.num_chips} chips of {c.name} '
             f'({c.peak_tflops:g} TFLOP/s bf16, {c.hbm_gib:g} GiB HBM)')
    compiled_for = 'the pod'
  return [
      f'{plan.description}, {config.model.dtype}'
      f'{", remat" if config.model.get("remat") else ""}, global batch '
      f'{plan.batch_size} (grad_accum_steps='
      f'{config.get("grad_accum_steps", 1)}), {plan.total_steps} steps '
      f'({plan.steps_per_epoch}/epoch).',
      f'{where}, mesh data={plan.mesh["data"]} fsdp={plan.mesh["fsdp"]}; '
      f'compiled here for {compiled_for} in {plan.compile_seconds:.0f} s.']


def _memory(plan: Plan) -> list[str]:
  m, unit = plan.memory, plan.target.unit
  if m:
    parts = (f'state and batch {_size(m["arguments"])}, temporaries '
             f'{_size(m["temporaries"])}, outputs {_size(m["outputs"])} of '
             f'which {_size(m["aliased"])} reuse the donated state; code '
             f'{_size(m["code"])}')
  else:
    parts = f'the TPU compiler: {plan.compiler_error}'
  verdict = 'fits' if plan.fits else 'DOES NOT FIT'
  at_least = 'at least ' if plan.compiler_error else ''
  lines = [f'Memory per {unit}: {at_least}{_size(plan.needed_bytes)} of '
           f'{plan.chip.hbm_gib:g} GiB -> {verdict} ({parts}).']
  default = JAX_GPU_MEMORY_FRACTION * plan.chip.hbm_gib * 2**30
  if plan.target.platform == 'gpu' and plan.fits and plan.needed_bytes > default:
    lines.append(f'That is over the {JAX_GPU_MEMORY_FRACTION:.0%} of GPU '
                 'memory JAX takes by default: run with '
                 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.95.')
  if plan.suggestions:
    lines.append(f'To fit, try (rough savings per {unit}; rerun the planner '
                 'with the flags to check):')
    lines += [f'  {s}' for s in plan.suggestions]
  return lines


def _time(plan: Plan, config: ml_collections.ConfigDict) -> list[str]:
  model, unit = plan.model_flops_per_chip, plan.target.unit
  if plan.flops_per_chip is not None:
    lines = [
        f'FLOPs per {unit} per step: {plan.flops_per_chip / 1e9:,.1f} GFLOP '
        f'compiled; analytic model FLOPs {model / 1e9:,.1f} GFLOP '
        f'(compiled/analytic {plan.flops_per_chip / model:.2f}).']
  else:
    lines = [f'FLOPs per {unit} per step: analytic model FLOPs '
             f'{model / 1e9:,.1f} GFLOP (not compiled).']
  run = (f'{plan.total_steps} steps' if config.num_train_steps > 0 else
         f'{config.epochs:g} epochs ({plan.total_steps} steps)')
  basis = 'compiled' if plan.flops_per_chip is not None else 'analytic'
  lines.append(
      f'Step time: {_duration(plan.step_seconds_at_peak)} at peak ({basis} '
      f'FLOPs, FLOP-bound); at MFU {plan.mfu:.0%}: '
      f'{_duration(plan.step_seconds)} -> {plan.images_per_second:,.0f} '
      f'images/s; {run} in {_duration(plan.train_seconds)}.')
  if plan.target.platform == 'gpu' and config.model.dtype == 'float32':
    lines.append('model.dtype=float32: GPUs run float32 matmuls as TF32, at '
                 'half the bf16 peak these times assume; '
                 '--config.model.dtype=bfloat16 is the GPU recipe.')
  return lines


def _input(plan: Plan, config: ml_collections.ConfigDict) -> list[str]:
  lines, unit = [], plan.target.unit
  by_platform = (' by platform' if config.get('device_resize_window') ==
                 transforms.BY_PLATFORM else '')
  if plan.resize:
    flops, traffic, windows = plan.resize
    lines.append(
        f'Resizing on the {unit}s (device_resize_window={plan.resize_window}'
        f'{by_platform}), a jitted function beside the step: '
        f'{flops / 1e9:,.1f} GFLOP (float32 at HIGHEST precision) and '
        f'{traffic / 1e9:,.2f} GB of memory traffic per {unit} per step, at '
        f'least {_duration(plan.resize_seconds)} '
        f'({plan.resize_seconds / plan.step_seconds:.0%} of the step at MFU '
        f'{plan.mfu:.0%}); the windows arrive as {_size(windows)} per {unit} '
        'per step.')
  host, hosts = plan.target.host, plan.target.num_hosts
  on_host, on_chips = plan.input_vcpus()
  resized = (f'the {unit}s resize (device_resize_window={plan.resize_window}'
             f'{by_platform})' if plan.resize_window else
             f'the host resizes (device_resize_window=0{by_platform})')
  lines.append(
      f'Input: {plan.images_per_host:,.0f} images/s per {host} ({hosts} '
      f'{host}{"s" if hosts > 1 else ""}) to keep up: about {on_host:,.0f} '
      f'vCPUs resizing on the host, {on_chips:,.0f} with '
      f'device_resize_window (at {HOST_RESIZE_IMAGES_PER_VCPU} and '
      f'{DEVICE_RESIZE_IMAGES_PER_VCPU} images/s per vCPU at 224 px, '
      'measured by benchmarks/input_throughput.py on a 2-core AMD EPYC); '
      f'here {resized}.')
  return lines


def report(plan: Plan, config: ml_collections.ConfigDict) -> str:
  """The planner's printout."""
  lines = (_header(plan, config) + _memory(plan) + _time(plan, config) +
           _input(plan, config))
  if plan.target.platform == 'gpu':
    lines.append(GPU_CAVEATS)
  return '\n'.join(lines)


# ----------------------------------------------------------------- command ---

def plan(config: ml_collections.ConfigDict, *, topology: Optional[str],
         num_slices: int, gpu: Optional[str], num_gpus: int, mfu: float,
         num_examples: int) -> Plan:
  """The command: plans and prints."""
  if (topology is None) == (gpu is None):
    raise UserError('Give --topology (a TPU pod, e.g. '
                    f'{", ".join(list(TOPOLOGIES)[:3])}) or --gpu (one of '
                    f'{", ".join(hardware.GPUS)}), not both.')
  if gpu is not None and num_slices != 1:
    raise UserError(f'--num_slices={num_slices} is for TPU topologies; with '
                    '--gpu, --num_gpus counts the GPUs.')
  if num_examples < 1:
    raise UserError(f'--num_examples={num_examples} must be >= 1.')
  target = (tpu_target(topology, num_slices) if topology is not None else
            gpu_target(gpu, num_gpus))
  result = make_plan(config, target, mfu, num_examples)
  print(report(result, config), flush=True)
  return result


def _flags():
  return [
      lambda: flags.DEFINE_string(
          'topology', None, 'TPU topology to compile for, e.g. v5e:16x16, '
          'v5p:4x4x4, v6e:16x16, v4:2x2x2 (or v5p-128, v6e-256).'),
      lambda: flags.DEFINE_integer('num_slices', 1, 'Slices of --topology '
                                   '(multi-slice over DCN).'),
      lambda: flags.DEFINE_string(
          'gpu', None, 'Plan for GPUs instead (analytic: compiled for CPU '
          f'devices): {", ".join(hardware.GPUS)}.'),
      lambda: flags.DEFINE_integer(
          'num_gpus', hardware.GPUS_PER_NODE, 'GPUs of --gpu: up to one node '
          f'of {hardware.GPUS_PER_NODE}, or whole nodes.'),
      lambda: flags.DEFINE_float('mfu', 0.4, 'Model FLOPs utilisation assumed '
                                 'for the time estimates.'),
      lambda: flags.DEFINE_integer(
          'num_examples', IMAGENET_TRAIN_EXAMPLES, 'Training examples per '
          'epoch (default: ImageNet-1K train).'),
  ]


def main():
  # Compile on the host CPU: no TPU backend is started (a TPU VM's chips
  # stay free for training); a TPU topology's devices come from libtpu, a
  # GPU plan's are CPU devices, set before the launcher starts JAX.
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', MAX_GPUS)
  launch.run(plan, output=None, extra_flags=_flags())


if __name__ == '__main__':
  main()
