"""benchmarks/step_time.py: its FLOP counts against independent counters and
its quick mode end to end."""
import importlib.util
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks' / 'step_time.py'
_spec = importlib.util.spec_from_file_location('step_time', SCRIPT)
step_time = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_time)

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
