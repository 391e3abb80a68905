"""benchmarks/: step_time.py's FLOP counts against independent counters and
its quick mode end to end; profile_step.py's op kinds and busy time."""
import pathlib
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
def test_step_time_quick():
  """The documented quick command times both sides and prints consistent
  rows: img/s = batch / (s/step), the hand FLOP count of each side."""
  pytest.importorskip('torch')
  shapes = step_time.Shapes('mu/16', 64, 32)
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), '--variants', 'mu/16', '--image_size', '64',
       '--steps', '3', '--alternations', '1'],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for side, ours in (("authors' (torch)", False), ('ours (jax)', True)):
    row = next(l for l in proc.stdout.splitlines() if l.startswith(side))
    sec, img_s, gflop = (float(x) for x in row[len(side):].split()[:3])
    assert img_s == pytest.approx(32 / sec, rel=0.02)
    assert gflop == round(step_time.step_flops(shapes, ours) / 1e9, 1)
  assert 'ours/authors img/s' in proc.stdout


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
