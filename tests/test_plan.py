"""The ahead-of-time planner: the tiny recipe compiled for a TPU topology on
this CPU (needs libtpu, as CI installs it: these tests fail without it), and
for GPUs, on this process's 8 CPU devices."""
import dataclasses
import importlib.util
import math
import os
import subprocess
import sys

import jax
import pytest

from droppos_jax import finetune, hardware, plan, sharding, train
from droppos_jax.configs import finetune as finetune_config
from droppos_jax.configs import linear_probe as linear_probe_config
from droppos_jax.configs import pretrain
from droppos_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
finetune_configs = {'finetune': finetune_config,
                    'linear_probe': linear_probe_config}


def tiny_config(**model):
  """The runlocal recipe at 64 px (a 4x4 grid): it compiles in seconds."""
  config = pretrain.get_config('runlocal')
  config.image_size = 64
  config.model.update(model)
  return config


@pytest.fixture(scope='module')
def tiny_plan():
  return plan.make_plan(tiny_config(), plan.tpu_target('v5e:2x2'))


def matmul_flops(jaxpr) -> int:
  """2*M*N*K over every dot_general of a jaxpr and its sub-jaxprs: the
  program's matmul FLOPs as traced, independent of the planner's formula."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      (_, contracting), (_, batch) = eqn.params['dimension_numbers']
      free = [d for i, d in enumerate(rhs) if i not in contracting + batch]
      total += 2 * math.prod(lhs) * math.prod(free)
    repeat = eqn.params.get('length', 1)  # scan
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          total += repeat * matmul_flops(sub)
  return total


def test_libtpu_is_installed():
  assert importlib.util.find_spec('libtpu') is not None, (
      'the planner tests need libtpu: pip install libtpu==0.0.42.1 '
      '(requirements-dev.txt)')


def test_analytic_flops_match_the_traced_matmuls():
  config = tiny_config()
  s = train.setup(config, 1000, sharding.make_mesh(config.mesh, 1))
  traced = matmul_flops(jax.make_jaxpr(s.train_step)(
      s.abstract_state, s.batch_spec).jaxpr)
  analytic = s.flops_per_example * config.batch_size
  # The trace also holds the patch-embedding input gradient, which XLA
  # drops (the images take no gradient): 4 % of this tiny model.
  assert analytic <= traced <= 1.06 * analytic


@pytest.mark.slow
def test_tiny_recipe_compiles_for_v5e_and_reports(tiny_plan, capsys):
  p = tiny_plan
  assert (p.num_chips, p.target.num_hosts, p.chip.name) == (4, 1, 'v5e')
  assert p.mesh == {'data': 4, 'fsdp': 1}
  assert p.fits and not p.suggestions
  # Each chip holds the whole float32 state (params, AdamW mu and nu) and
  # its quarter of the batch.
  assert p.state_bytes >= 3 * p.param_bytes
  batch = 16 // 4 * 64 * 64 * 3 * 4
  assert p.memory['arguments'] >= p.state_bytes + batch
  assert p.state_bytes + batch < p.needed_bytes < 2**30
  # Compiled FLOPs add the elementwise work (softmaxes, norms, AdamW) to the
  # matmuls; per chip, a quarter of the batch's.
  assert 1 <= p.flops_per_chip / p.model_flops_per_chip <= 2
  assert p.step_seconds == pytest.approx(
      p.flops_per_chip / (197e12 * 0.4))
  assert p.images_per_second == pytest.approx(16 / p.step_seconds)
  assert p.train_seconds == pytest.approx(5 * p.step_seconds)  # 5 steps
  # By platform, a TPU resizes the crops (window 512).
  assert p.resize_window == 512 and p.resize
  host, chips = p.input_vcpus()
  assert host == pytest.approx(p.images_per_second / 175)
  assert chips == pytest.approx(p.images_per_second / 662)

  print(plan.report(p, tiny_config()))
  out = capsys.readouterr().out
  assert 'v5e:2x2: 4 chips of v5e (197 TFLOP/s bf16, 16 GiB HBM)' in out
  assert '-> fits' in out
  assert f'{p.flops_per_chip / 1e9:,.1f} GFLOP compiled' in out
  assert 'images/s; 5 steps in' in out
  assert (f'Input: {p.images_per_second:,.0f} images/s per host (1 host) to '
          f'keep up: about {host:,.0f} vCPUs resizing on the host, '
          f'{chips:,.0f} with device_resize_window') in out
  assert 'here the chips resize (device_resize_window=512 by platform)' in out
  assert 'GPU plans are analytic' not in out


@pytest.mark.slow
def test_resizing_on_the_chips_is_planned(capsys):
  config = tiny_config()
  config.device_resize_window = 96
  # Not tiny_plan's step: the persistent compilation cache the tests use
  # cannot load a TPU program back without a TPU (it warns, recompiles).
  config.batch_size = 32
  p = plan.make_plan(config, plan.tpu_target('v5e:2x2'))
  flops, traffic, windows = p.resize
  images = 32 // 4   # per chip
  # Per image, the two passes as matmuls: 96 x 96 pixels to 64 columns, then
  # 96 rows to 64, 3 channels; the compiled count adds the weights' work.
  analytic = images * 2 * 3 * (96 * 96 * 64 + 64 * 96 * 64)
  assert 1 <= flops / analytic < 1.2
  assert windows == images * 96 * 96 * 3
  assert traffic > windows
  print(plan.report(p, config))
  out = capsys.readouterr().out
  assert (f'Resizing on the chips (device_resize_window=96), a jitted '
          f'function beside the step: {flops / 1e9:,.1f} GFLOP') in out
  # The roofline: v5e runs HIGHEST float32 as 6 bf16 passes, at 819 GB/s.
  assert p.resize_seconds == pytest.approx(
      max(flops / (197e12 / 6), traffic / 819e9))


@pytest.mark.slow
def test_two_slices_split_the_batch(tiny_plan):
  p = plan.make_plan(tiny_config(), plan.tpu_target('v5e:2x2', num_slices=2))
  assert (p.num_chips, p.target.num_slices, p.target.num_hosts) == (8, 2, 2)
  assert p.mesh == {'data': 8, 'fsdp': 1}
  assert p.fits
  # Half the images per chip: about half the FLOPs (AdamW's share is not
  # split, so a little more).
  assert 0.5 <= p.flops_per_chip / tiny_plan.flops_per_chip < 0.6
  assert p.model_flops_per_chip == pytest.approx(
      tiny_plan.model_flops_per_chip / 2)


@pytest.mark.slow
def test_too_big_does_not_fit_and_says_what_to_change(capsys):
  # A 1.8 B-parameter projector: 20 GiB of float32 AdamW state per chip.
  config = tiny_config(projector_width=12288)
  # Not tiny_plan's resize: a TPU program in the persistent compilation
  # cache cannot be loaded back without a TPU (it warns, recompiles).
  config.device_resize_window = 0
  p = plan.make_plan(config, plan.tpu_target('v5e:2x2'))
  assert not p.fits and p.flops_per_chip is None
  assert 'RESOURCE_EXHAUSTED' in p.compiler_error
  assert p.needed_bytes > p.state_bytes > 3 * 1.8e9 * 4
  assert p.suggestions[0].startswith(
      '--config.mesh.data=1 --config.mesh.fsdp=-1')
  assert any('--config.model.dtype=bfloat16' in s for s in p.suggestions)
  print(plan.report(p, config))
  out = capsys.readouterr().out
  assert 'DOES NOT FIT' in out and 'analytic model FLOPs' in out


def test_topology_names():
  assert plan.topology_name('v5p-128') == 'v5p:4x4x4'
  assert plan.topology_name('v5e-256') == 'v5e:16x16'
  assert plan.topology_name('v6e:4x8') == 'v6e:4x8'
  for bad in ('v5e:16x16x1', 'v7:2x2', 'tpu', 'v4:2x2'):
    with pytest.raises(UserError, match=f"--topology '{bad}' .*v5e:16x16"):
      plan.topology_name(bad)
  # The right rank, but a shape libtpu refuses.
  with pytest.raises(UserError,
                     match="'v5e:3x3': libtpu refused it .*v6e:16x16"):
    plan.topology_devices('v5e:3x3')
  # v4 is asked for whole chips (megacore): 2x2x2 is 8 devices, not 16.
  assert len(plan.topology_devices('v4:2x2x2')) == 8


def test_missing_libtpu_says_how_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
      importlib.util, 'find_spec',
      lambda name, *a: None if name == 'libtpu' else real(name, *a))
  with pytest.raises(UserError, match=r'pip install libtpu==0\.0\.42\.1'):
    plan.topology_devices('v5e:2x2')


def test_bad_mfu():
  with pytest.raises(UserError, match='--mfu=1.5'):
    plan.make_plan(tiny_config(), plan.tpu_target('v5e:2x2'), mfu=1.5)


@pytest.mark.slow
@pytest.mark.parametrize('flags, message', [
    (['--topology', 'v5x:9'], "--topology 'v5x:9' is not a TPU topology; "
     'valid: v4:2x2x1 (v4-8), '),
    (['--gpu', 'v100'], "--gpu 'v100' is not a known GPU; valid: a100-40gb, "
     'a100-80gb, h100, h200.'),
])
def test_command_line_unknown_target_is_one_line(flags, message):
  proc = subprocess.run(
      [sys.executable, '-m', 'droppos_jax.plan', '--config',
       'configs/pretrain.py:runlocal', *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and errors == proc.stderr.splitlines()[-1:]
  assert errors[0].startswith('error: ' + message)


@pytest.mark.parametrize('recipe', ['finetune', 'linear_probe'])
def test_fine_tuning_flops_match_the_traced_matmuls(recipe):
  """The fine-tuning trainers' analytic FLOPs against their traced step:
  3x the forward for fine-tuning; the frozen encoder's forward once for
  the linear probe."""
  config = finetune_configs[recipe].get_config('runlocal')
  s = finetune.setup(config, 1000, 10, sharding.make_mesh(config.mesh, 1))
  traced = matmul_flops(jax.make_jaxpr(s.train_step)(
      s.abstract_state, s.batch_spec).jaxpr)
  analytic = s.flops_per_example * config.batch_size
  assert 0.99 * analytic <= traced <= 1.01 * analytic, (traced, analytic)


@pytest.mark.slow
def test_a_fine_tuning_recipe_is_planned(capsys):
  config = finetune_configs['finetune'].get_config('runlocal')
  config.batch_size = 32
  p = plan.make_plan(config, plan.tpu_target('v5e:2x2'))
  assert p.fits and p.description == 'finetune mu/8'
  # RandAugment needs the resized crop: fine-tuning resizes on the host.
  assert p.resize_window == 0 and p.resize is None
  assert 1 <= p.flops_per_chip / p.model_flops_per_chip <= 2
  print(plan.report(p, config))
  out = capsys.readouterr().out
  assert out.startswith('finetune mu/8, float32, global batch 32')
  assert '-> fits' in out
  assert 'here the host resizes (device_resize_window=0)' in out


@pytest.mark.slow
def test_tiny_recipe_is_planned_for_a_gpu_node(capsys):
  """A GPU plan: the step built for a GPU, compiled for 8 CPU devices;
  with micro-batches, whose loop XLA counts once."""
  config = tiny_config(dtype='bfloat16')
  config.batch_size, config.grad_accum_steps = 64, 2  # AdamW a small share
  p = plan.make_plan(config, plan.gpu_target('h100'))
  assert p.target.platform == 'gpu' and p.chip is hardware.H100
  assert (p.num_chips, p.target.num_hosts) == (8, 1)
  assert all(d.platform == 'cpu' for d in p.target.devices)
  assert p.mesh == {'data': 8, 'fsdp': 1} and p.fits
  assert p.memory['arguments'] >= p.state_bytes
  assert 1 <= p.flops_per_chip / p.model_flops_per_chip <= 2
  assert p.step_seconds == pytest.approx(p.flops_per_chip / (989e12 * 0.4))
  # By platform, GPUs resize the crops; HIGHEST float32 runs on the CUDA
  # cores (67 TFLOP/s), the windows stream at 3.35 TB/s.
  flops, traffic, _ = p.resize
  assert p.resize_window == 512
  assert p.resize_seconds == pytest.approx(max(flops / 67e12,
                                               traffic / 3350e9))
  print(plan.report(p, config))
  out = capsys.readouterr().out
  assert ('8 x H100: 8 GPUs in 1 node (989 TFLOP/s bf16, 80 GiB each), mesh '
          'data=8 fsdp=1; compiled here for 8 CPU devices in') in out
  assert 'Memory per GPU: ' in out and 'FLOPs per GPU per step: ' in out
  assert 'Resizing on the GPUs (device_resize_window=512 by platform)' in out
  assert f'{p.images_per_second:,.0f} images/s per node (1 node)' in out
  assert plan.GPU_CAVEATS in out
  assert 'TF32' not in out  # bfloat16: the peak the times assume
  # 70 GiB fits an H100's 80 but not JAX's default share; not an A100 40GB.
  big = dataclasses.replace(p, needed_bytes=70 * 2**30)
  assert big.fits and ('over the 75% of GPU memory JAX takes by default: '
                       'run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95') in (
                           plan.report(big, config))
  assert not dataclasses.replace(big, target=dataclasses.replace(
      p.target, chip=hardware.A100_40GB)).fits


def test_gpu_targets():
  t = plan.gpu_target('a100-40gb', 4)
  assert (t.name, t.platform, t.chip.hbm_gib, t.num_hosts) == (
      '4 x A100 40GB', 'gpu', 40., 1)
  with pytest.raises(UserError, match=r"^--gpu 'v100' is not a known GPU; "
                     r'valid: a100-40gb, a100-80gb, h100, h200\.$'):
    plan.gpu_target('v100')
  with pytest.raises(UserError, match=r'^--num_gpus=12 must be 1 to 8 \(one '
                     r'node\) or a multiple of 8 up to 512'):
    plan.gpu_target('h100', 12)
  # Two nodes need 16 CPU devices; this test process has 8.
  with pytest.raises(UserError, match=r'^--num_gpus=16: a GPU plan compiles '
                     r'for one CPU device per GPU and this process has 8; '
                     r'run python -m droppos_jax.plan, which has 512\.$'):
    plan.gpu_target('h100', 16)


def test_chips_of_gpu_device_kinds():
  assert hardware.chip('NVIDIA H100 80GB HBM3') is hardware.H100
  assert hardware.chip('NVIDIA A100-SXM4-40GB') is hardware.A100_40GB
  assert hardware.chip('NVIDIA A100-SXM4-80GB') is hardware.A100_80GB
  assert hardware.chip('cpu') is None


@pytest.mark.parametrize('kwargs, message', [
    (dict(topology=None, gpu=None),
     r'^Give --topology \(a TPU pod, e\.g\. v4:2x2x1, .*\) or --gpu \(one '
     r'of a100-40gb, a100-80gb, h100, h200\), not both\.$'),
    (dict(topology='v5e:2x2', gpu='h100'), 'not both'),
    (dict(topology=None, gpu='h100', num_slices=2),
     r'^--num_slices=2 is for TPU topologies; with --gpu, --num_gpus counts '
     r'the GPUs\.$'),
])
def test_command_needs_one_target(kwargs, message):
  args = dict(num_slices=1, num_gpus=8, mfu=0.4, num_examples=1000)
  with pytest.raises(UserError, match=message):
    plan.plan(tiny_config(), **{**args, **kwargs})
