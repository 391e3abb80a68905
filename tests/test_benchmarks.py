"""benchmarks/: step_time.py's FLOP counts against independent counters and
its quick mode end to end, for DropPos and MAE; profile_step.py's op kinds
and busy time."""
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks'
sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other so
import profile_step  # noqa: E402
import step_time  # noqa: E402

SCRIPT = BENCHMARKS / 'step_time.py'

SHAPES = step_time.Shapes('mu/8', 48, 3)  # N = 36 patches, K = 9 visible
MAE_SHAPES = step_time.Shapes('mu/16', 32, 2, 'mae')  # N = 4, K = 1 visible


def test_hlo_dot_flops_counts_plain_and_batched_dots():
  f = jax.jit(lambda x, w, a: (x @ w, jnp.einsum('bhqd,bhkd->bhqk', a, a)))
  compiled = f.lower(jnp.ones((6, 5)), jnp.ones((5, 7)),
                     jnp.ones((2, 3, 4, 8))).compile()
  assert step_time.hlo_dot_flops(compiled.as_text()) == (
      2 * 6 * 5 * 7 + 2 * (2 * 3) * 4 * 4 * 8)


@pytest.mark.slow
def test_our_flop_count_is_the_compiled_programs():
  """Every dot XLA keeps in our step is counted, and no more: the dropped
  work (the attentive pass's backward, the scatter of the visible patches'
  input gradient) is really gone. Beyond the hand count, the only dot is the
  cosine of [cls] with each visible token (elementwise in torch)."""
  compiled, _, _ = step_time.build_jax_step(SHAPES)
  cosine = 2 * SHAPES.batch * SHAPES.mask_counts[0] * SHAPES.size.width
  assert step_time.hlo_dot_flops(compiled.as_text()) == (
      step_time.step_flops(SHAPES, ours=True) + cosine)


@pytest.mark.slow
def test_authors_flop_count_is_torchs():
  """The hand count of the authors' step equals torch's own FLOP counter
  over one step (forward, backward, clipping, AdamW)."""
  pytest.importorskip('torch')
  from torch.utils.flop_counter import FlopCounterMode
  step = step_time.build_torch_step(SHAPES)
  with FlopCounterMode(display=False) as counter:
    step(0)
  assert counter.get_total_flops() == step_time.step_flops(SHAPES, ours=False)


@pytest.mark.slow
def test_mae_flop_counts_are_the_compiled_programs_and_torchs():
  """MAE: our hand count (mae.flops_per_example) is every dot XLA keeps in
  our step, and the authors' count is torch's FLOP counter over one step of
  tests/torch_reference.py's MAE: the two differ by the decoder's [cls] row
  and the masked patches' embedding only."""
  pytest.importorskip('torch')
  from torch.utils.flop_counter import FlopCounterMode
  compiled, _, _ = step_time.build_jax_step(MAE_SHAPES)
  assert step_time.hlo_dot_flops(compiled.as_text()) == (
      step_time.step_flops(MAE_SHAPES, ours=True))
  step = step_time.build_torch_step(MAE_SHAPES)
  with FlopCounterMode(display=False) as counter:
    step(0)
  assert counter.get_total_flops() == step_time.step_flops(MAE_SHAPES,
                                                           ours=False)
  assert step_time.step_flops(MAE_SHAPES, ours=True) < counter.get_total_flops()


def check_quick_run(shapes, *flags):
  """Runs step_time.py at `shapes` with `flags`; checks both sides' rows
  (img/s = batch / (s/step) up to the printed rounding, the hand FLOP
  count) and returns stdout."""
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), '--variants', shapes.variant,
       '--image_size', str(shapes.image_size), '--alternations', '1', *flags],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for side, ours in (("authors' (torch)", False), ('ours (jax)', True)):
    row = next(l for l in proc.stdout.splitlines() if l.startswith(side))
    sec, img_s, gflop = (float(x) for x in row[len(side):].split()[:3])
    # s/step printed to 1e-3, img/s to 0.1
    assert shapes.batch / (sec + 5e-4) - 0.05 - 1e-9 <= img_s
    assert img_s <= shapes.batch / max(sec - 5e-4, 1e-9) + 0.05 + 1e-9
    assert gflop == round(step_time.step_flops(shapes, ours) / 1e9, 1)
  assert 'ours/authors img/s' in proc.stdout
  return proc.stdout


@pytest.mark.slow
def test_step_time_quick():
  """The documented quick command times both sides and prints consistent
  rows: img/s = batch / (s/step), the hand FLOP count of each side."""
  pytest.importorskip('torch')
  out = check_quick_run(step_time.Shapes('mu/16', 64, 32), '--steps', '3')
  assert 'projector 512/2/16' in out


@pytest.mark.slow
def test_step_time_mae_quick():
  """--objective mae times MAE's step on both sides: the header names MAE's
  decoder, the rows count MAE's FLOPs (ours the compiled dots)."""
  pytest.importorskip('torch')
  shapes = step_time.Shapes('mu/16', 32, 2, 'mae')
  out = check_quick_run(shapes, '--objective', 'mae', '--batch', '2',
                        '--steps', '1')
  assert 'MAE decoder 512/8/16' in out
  compiled = re.search(r'ours compiled: ([\d.]+) GFLOP in dots', out)
  assert float(compiled[1]) == round(step_time.step_flops(shapes, True) / 1e9, 1)


def test_bad_settings_are_one_line_errors():
  proc = subprocess.run([sys.executable, str(SCRIPT), '--variants', 'X/16'],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.startswith("error: Unknown ViT variant 'X/16'")


def test_profile_kinds_from_the_compiled_program():
  f = jax.jit(lambda x, i: ((x @ x.T).sum(), x.T * 2., x[i], jnp.exp(x)))
  x = jnp.arange(12.).reshape(3, 4)
  info = profile_step.instructions(f.lower(x, jnp.array([2, 0])).compile().as_text())
  kinds = {op_name.split('/')[-1]: kind for kind, op_name in info.values()
           if op_name.startswith('jit(')}
  assert kinds == {'dot_general': 'matmul', 'reduce_sum': 'elementwise/reduce',
                   'mul': 'transpose/copy',  # x.T fused into the product
                   'gather': 'gather/scatter', 'exp': 'elementwise/reduce'}
  assert profile_step.part_of('jit(f)/transpose(jvp(M))/a/dot') == 'backward'
  assert profile_step.part_of('jit(f)/jvp(M)/M._full_pass/b') == 'attentive pass'


def test_profile_busy_time_merges_overlaps():
  events = [{'ts': 0., 'dur': 10.}, {'ts': 5., 'dur': 10.},
            {'ts': 30., 'dur': 1.}, {'ts': 2., 'dur': 3.}]
  assert profile_step.busy_time(events) == 16.
