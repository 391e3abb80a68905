"""benchmarks/accelerator_check.py: its verdicts, table and batch search on
made-up numbers; its --quick run on the CPU (every row, the SKIPs' reasons,
the batch it finds against independent compiles); and negative controls:
a broken attention posing as cuDNN and a too-tight loss tolerance FAIL."""
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks'
sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other so
import accelerator_check as ac  # noqa: E402

from droppos_jax import sharding, train  # noqa: E402
from droppos_jax.configs import pretrain  # noqa: E402
from droppos_jax.errors import UserError  # noqa: E402
from droppos_jax.models import vit  # noqa: E402


# ------------------------------------------------------- the pure logic ---

@pytest.mark.parametrize('memory, limit, largest', [
    (lambda b: 1000 + 37 * b, 5000, 108),           # affine: 1000 + 37 b <= 5000
    (lambda b: b * b if b <= 64 else math.inf, 3000, 52),  # convex; compiler OOM past 64
    (lambda b: 10 * b, 5, 0),                      # nothing fits
    (lambda b: b, 10**9, 1024),                    # everything fits up to maximum
])
def test_largest_batch_is_the_largest_that_fits(memory, limit, largest):
  lo, hi, probed = ac.largest_batch(memory, limit, start=8, step=4,
                                    maximum=1024, max_probes=20)
  assert lo == largest
  assert hi == lo + 4
  assert all((m <= limit) == (b <= lo) for b, m in probed.items())


def test_largest_batch_interpolates_an_affine_memory_in_few_probes():
  _, _, probed = ac.largest_batch(lambda b: 1000 + 37 * b, 5000, start=8,
                                  step=4, maximum=2**16, max_probes=20)
  assert len(probed) <= 4  # 8, 16, the interpolated 108, then 112


def test_largest_batch_reports_the_bracket_when_out_of_probes():
  lo, hi, probed = ac.largest_batch(lambda b: b * b, 10**6, start=1, step=1,
                                    maximum=2**16, max_probes=2)
  assert len(probed) == 2 and lo == 2 and hi == 2**16 + 1


def test_attention_verdict():
  xla = {'logits': 4e-3, 'gradients': 1e-2}
  assert ac.attention_row(xla, {'logits': 7e-3, 'gradients': 1.5e-2}).verdict == ac.PASS
  row = ac.attention_row(xla, {'logits': 9e-3, 'gradients': 1e-2})
  assert row.verdict == ac.FAIL and row.reason == 'over the limit: logits'
  # Below bfloat16's epsilon (2^-8) a tiny XLA error does not tighten it.
  assert ac.attention_row({'logits': 1e-6}, {'logits': 3e-3}).verdict == ac.PASS


def test_curve_verdict():
  ref = np.array([3., 2.8, 2.7, 2.6])  # falls by 0.4: 5 % is 0.02
  assert ac.curve_row('x', ref, ref + 0.019, 0.05).verdict == ac.PASS
  row = ac.curve_row('x', ref, ref + np.array([0, 0, 0.03, 0]), 0.05)
  assert row.verdict == ac.FAIL and 'step 3' in row.reason
  assert 'not finite' in ac.curve_row('x', ref, ref * np.nan, 0.05).reason
  assert 'did not learn' in ac.curve_row('x', ref * 0 + 3, ref * 0 + 3,
                                         0.05).reason


def test_table_gives_every_skip_and_fail_its_reason():
  rows = [ac.Row('a', '1', '>= 1', ac.PASS),
          ac.Row('b', '-', '>= 1', ac.SKIP, 'no GPU here'),
          ac.Row('c', '0', '>= 1', ac.FAIL, 'too slow', seconds=12.3)]
  assert ac.table(rows).splitlines()[2:] == [
      '| a | 1 | >= 1 | PASS | 0 |', '| b | - | >= 1 | SKIP: no GPU here | 0 |',
      '| c | 0 | >= 1 | FAIL: too slow | 12 |']


@pytest.mark.parametrize('argv, message', [
    (['--checks', 'attention,speed'], 'speed unknown; valid: attention,'),
    (['--dtypes', 'float16'], 'float16 unknown; valid: float32, bfloat16'),
    (['--loss_tolerance', '0'], '--loss_tolerance=0.0 is out of range'),
    (['--memory_limit_mib', '-1'], '--memory_limit_mib=-1.0 is out of range'),
])
def test_bad_flags_are_one_line_errors(argv, message):
  with pytest.raises(UserError, match=message):
    ac.parse_args(argv)


# ------------------------------------------------- the CPU's quick run ---

@pytest.fixture(scope='module')
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp('check') / 'rows.json'
  rows = ac.main(['--quick', '--num_devices', '1', '--out', str(out)])
  return rows, json.loads(out.read_text())


@pytest.mark.slow
def test_quick_run_rows(quick):
  rows, written = quick
  assert [r.check.split(':')[0] for r in rows] == [
      'attention', 'training', 'training', 'step', 'step',
      'largest batch per device, mu/16 float32', 'input']
  assert [r['verdict'] for r in written['rows']] == [r.verdict for r in rows]
  for row in rows:
    assert row.verdict in (ac.PASS, ac.FAIL, ac.SKIP)
    assert '|' not in row.check + row.measured + row.expected + row.reason
    assert bool(row.reason) == (row.verdict != ac.PASS), row
  attention, f32, bf16, step32, step16, batch, feed = rows
  assert attention.verdict == ac.SKIP and 'NVIDIA GPUs only' in attention.reason
  assert f32.verdict == bf16.verdict == ac.PASS
  # On a CPU the accelerator defaults are true float32: the same curve.
  assert f32.data['losses'] == f32.data['reference']
  assert step32.verdict == step16.verdict == ac.SKIP
  assert "no peak FLOP/s known for 'cpu'" in step32.reason
  assert batch.verdict == ac.PASS and batch.data['largest'] >= 8
  rate, need = feed.data['images_per_second'], feed.data['step_needs']
  assert need == pytest.approx(8 / min(np.median(step32.data['seconds']),
                                       np.median(step16.data['seconds'])))
  assert feed.verdict == (ac.PASS if rate >= need else ac.FAIL)


@pytest.mark.slow
def test_quick_run_bf16_curve_fails_a_too_tight_tolerance(quick):
  """Negative control: bfloat16 is not bit-identical to float32, so a
  tolerance below the difference it showed FAILs."""
  bf16 = quick[0][2]
  ref, losses = (np.array(bf16.data[k]) for k in ('reference', 'losses'))
  diff = np.abs(losses - ref).max()
  assert diff > 0
  fall = ref[0] - ref.min()
  assert ac.curve_row('bf16', ref, losses, diff / fall * 1.01).verdict == ac.PASS
  assert ac.curve_row('bf16', ref, losses, diff / fall * 0.99).verdict == ac.FAIL


@pytest.mark.slow
def test_quick_run_batch_is_the_largest_by_independent_compiles(quick):
  """The batch found fits the limit and the next one (search_step more per
  device) does not, by compiling the recipe here without the script."""
  batch = quick[0][5]
  largest, limit = batch.data['largest'], batch.data['limit']
  mesh = sharding.make_mesh(num_devices=1)

  def memory(per_device):
    c = pretrain.get_config('variant=mu/16')
    c.image_size, c.model.projector, c.batch_size = 64, 'tiny', per_device
    m = train.setup(c, ac.NUM_EXAMPLES, mesh).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.temp_size_in_bytes +
            m.output_size_in_bytes - m.alias_size_in_bytes)

  assert memory(largest) <= limit < memory(largest + ac.QUICK.search_step)


def _attention_in_float32(q, k, v):
  """An attention that rounds elsewhere than XLA's bfloat16 one (as cuDNN
  does): float32 throughout, the output rounded to bfloat16."""
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  return jax.nn.dot_product_attention(*f32).astype(q.dtype)


def _attention_unscaled(q, k, v):
  """A broken attention: the 1/sqrt(head dim) scale forgotten."""
  return jax.nn.dot_product_attention(q, k, v, scale=1.)


@pytest.mark.slow
@pytest.mark.parametrize('fake, verdict', [(_attention_in_float32, ac.PASS),
                                           (_attention_unscaled, ac.FAIL)])
def test_attention_check_judges_what_runs_as_cudnn(monkeypatch, fake, verdict):
  """With a stand-in for cuDNN (the model's attention given 'cudnn'), the
  check runs it through the whole model: another rounding passes, a
  forgotten scale fails, on the logits, the attentive pass and the
  gradients alike."""
  real = vit.dot_product_attention
  monkeypatch.setattr(ac, 'cudnn_unavailable', lambda: None)
  monkeypatch.setattr(vit, 'dot_product_attention', lambda q, k, v, impl: (
      fake(q, k, v) if impl == 'cudnn' else real(q, k, v, impl)))
  row = ac.check_attention(ac.Recipe(ac.QUICK, sharding.make_mesh(num_devices=1)))
  assert row.verdict == verdict, row
  if verdict == ac.FAIL:
    assert row.reason == 'over the limit: attentive pass, gradients, logits'
