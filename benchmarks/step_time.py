r"""Our jitted pre-training step against the authors' step in PyTorch: DropPos,
or MAE with --objective mae.

  python benchmarks/step_time.py       # Ti/16 batch 32 and B/16 batch 16, 224 px
  python benchmarks/step_time.py --variants mu/16 --image_size 64 --steps 3 \
      --alternations 1                  # a quick check, well under a minute
  python benchmarks/step_time.py --objective mae --variants B/16 --steps 5 \
      --alternations 1                  # MAE's step, B/16 batch 16, 224 px

By default both sides do one float32 DropPos training step on the CPU with
the same math: masks,
the attentive pass, the soft-target loss, per-tensor gradient clipping to 5.0
and AdamW (b1 .9, b2 .95, weight decay .05 on tensors with ndim > 1, warm-up +
cosine lr), the paper's projector (width 512, depth 2, 16 heads). The authors'
side is the torch model of tests/torch_reference.py, run as their code runs
it: a second full forward pass for the attentive weights, AdamW over the two
weight-decay groups. Ours is droppos_jax.objectives.droppos.make_train_step,
which embeds the patches once for both passes, stops the attentive pass's last
block after the visible tokens and drops the projector's [cls] row.

With --objective mae both sides do MAE's step instead (configs/mae_pretrain.py):
75 % random masking, the encoder on the visible patches, MAE's decoder (width
512, depth 8, 16 heads, fixed sin-cos PE), the norm_pix_loss squared error on
the masked patches and the same AdamW and lr schedule, with no gradient
clipping. The authors' side is tests/torch_reference.py's MAE (a restatement
of facebookresearch/mae's MaskedAutoencoderViT), its masks drawn as MAE's
random_masking draws them (argsort of uniform noise, the first 25 % kept), its
AdamW over the same two groups. Ours is droppos_jax.objectives.mae's
make_train_step on droppos_jax.models.mae. Both run the encoder on the K
visible tokens and the decoder's blocks on all N+1 tokens; ours differs in
two places only, both of them rows whose output MAE throws away: it embeds
the K visible patches alone (MAE's conv embeds all N and takes its kernel
gradient over all N), and the decoder's last block and pixel head skip the
[cls] row (MAE's compute it and slice it off), as the DropPos projector does.
The FLOPs counted for ours are droppos_jax.objectives.mae.flops_per_example;
the authors' are the same count with those rows put back.

Each side runs in its own process (this script again, with --side), the two
alternating --alternations times so that load from elsewhere falls on both.
Each process uses every core it may run on, times --steps steps after two
warm-up steps, and times a 2048^2 float32 matmul in its own framework before
and after. Printed per model: median s/step and img/s of each side, the
ratio, matmul FLOPs per step counted by hand for both sides (and, for ours,
the dots in XLA's compiled program and XLA's cost_analysis total), and each
side's matmul FLOP/s as a fraction of its framework's median matmul rate in
the same process. Asserts nothing. Without torch it times ours alone.
"""
import argparse
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

from droppos_jax import masking
from droppos_jax.errors import UserError
from droppos_jax.models import droppos, vit

BATCH = {'Ti/16': 32, 'B/16': 16}  # default batch per variant, else 32
PROJECTOR = 'default'  # the paper's: width 512, depth 2, 16 heads
DECODER = (512, 8, 16)  # MAE's decoder: width, depth, heads
# What the header names as each objective's head, and its sizes.
HEADS = {'droppos': ('projector', droppos.PROJECTORS[PROJECTOR]),
         'mae': ('MAE decoder', DECODER)}
CLIP = {'droppos': 'per_tensor', 'mae': 'none'}  # MAE clips no gradient
MATMUL_SIZE = 2048
WARMUP_STEPS = 2
# Objective and optimizer settings; any values do for timing.
SIGMA, TAU, PEAK_LR, CLIP_NORM, WEIGHT_DECAY = 1.0, 0.1, 1.5e-4, 5.0, 0.05
LR_WARMUP, LR_TOTAL = 10, 1000
REFERENCE = pathlib.Path(__file__).resolve().parents[1] / 'tests' / 'torch_reference.py'
RESULT = 'RESULT '  # prefix of a child's one line of JSON on stdout
SIDES = {'torch': "authors' (torch)", 'jax': 'ours (jax)'}


@dataclasses.dataclass(frozen=True)
class Shapes:
  """One benchmark setting and the counts that follow from it."""
  variant: str
  image_size: int
  batch: int
  objective: str = 'droppos'

  @property
  def size(self) -> vit.ViTSize:
    return vit.decode_variant(self.variant)

  @property
  def grid(self) -> tuple[int, int]:
    return vit.grid_size((self.image_size,) * 2, self.size.patch_size)

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def mask_counts(self) -> tuple[int, int]:
    """(K visible patches, of which keep their PE) at the paper's ratios."""
    return masking.mask_counts(self.num_patches, 0.75, 0.75)

  @property
  def num_visible(self) -> int:
    """K visible patches of MAE's 75 % random masking."""
    return masking.visible_count(self.num_patches, 0.75)


# ------------------------------------------------------------ FLOP counts ---

def block_flops(tokens: int, queries: int, width: int, mlp_dim: int) -> int:
  """Forward matmul FLOPs of one block for one sample: keys and values of
  `tokens` rows; queries, attention, output projection and MLP of `queries`."""
  return 2 * width * (2 * tokens * width + 2 * queries * width +
                      2 * queries * tokens + 2 * queries * mlp_dim)


def droppos_step_flops(shapes: Shapes, ours: bool) -> int:
  """DropPos's matmul FLOPs per step (see step_flops)."""
  size, n = shapes.size, shapes.num_patches
  k = shapes.mask_counts[0]
  width, depth, _ = droppos.PROJECTORS[PROJECTOR]
  d, t = size.width, k + 1

  def chain(num, dim, mlp_dim, tokens, last_queries):
    return ((num - 1) * block_flops(tokens, tokens, dim, mlp_dim) +
            block_flops(tokens, last_queries, dim, mlp_dim))

  out = k if ours else t  # ours: the projector's last block skips [cls]
  masked = (chain(size.depth, d, size.mlp_dim, t, t) + 2 * t * d * width +
            chain(depth, width, 4 * width, t, out) + 2 * out * width * n)
  attentive = chain(size.depth, d, size.mlp_dim, n + 1, t if ours else n + 1)
  embed = lambda rows: 2 * rows * 3 * size.patch_size**2 * d
  # The authors embed all N patches in each pass and take the kernel
  # gradient over all N; ours embeds once and takes it over the K visible.
  stem = embed(n) + embed(k) if ours else 3 * embed(n)
  return shapes.batch * (3 * masked + attentive + stem)


def mae_parts(shapes: Shapes):
  """(our MAE model, its objective config) for `shapes`: MAE's recipe."""
  from droppos_jax.models import architecture
  from droppos_jax.models import mae as mae_model
  from droppos_jax.objectives import mae as mae_objective

  size = shapes.size
  model = mae_model.build(architecture.Architecture(
      size.width, size.depth, size.mlp_dim, size.num_heads, size.patch_size,
      decoder=architecture.DecoderSize(*DECODER)))
  cfg = mae_objective.MAEConfig(
      image_hw=(shapes.image_size,) * 2, patch_size=size.patch_size,
      masking=masking.Masking('random', 0.75, 0.), norm_pix_loss=True)
  return model, cfg


def mae_step_flops(shapes: Shapes, ours: bool) -> int:
  """MAE's matmul FLOPs per step (see step_flops): ours is the analytic
  mae.flops_per_example; the authors' adds the rows MAE computes and then
  discards: the decoder's last block and decoder_pred on the [cls] row, and
  the conv (forward and kernel gradient) on the N - K masked patches."""
  from droppos_jax.objectives import mae as mae_objective

  model, cfg = mae_parts(shapes)
  n, k, w = shapes.num_patches, shapes.num_visible, DECODER[0]
  pixels, d = 3 * shapes.size.patch_size**2, shapes.size.width
  cls_row = (block_flops(n + 1, n + 1, w, 4 * w) -
             block_flops(n + 1, n, w, 4 * w) + 2 * w * pixels)
  authors_extra = 3 * cls_row + 4 * (n - k) * pixels * d
  return shapes.batch * (mae_objective.flops_per_example(model, cfg) +
                         (0 if ours else authors_extra))


STEP_FLOPS = {'droppos': droppos_step_flops, 'mae': mae_step_flops}


def step_flops(shapes: Shapes, ours: bool) -> int:
  """Matmul FLOPs of one training step as each side computes it (backward =
  2 x forward; elementwise work, softmaxes and the optimizer left out)."""
  return STEP_FLOPS[shapes.objective](shapes, ours)


_INSTRUCTION = re.compile(r'%(\S+) = \w+\[([\d,]*)\]')
_DOT = re.compile(r'%\S+ = \w+\[([\d,]*)\]\S* dot\(%([^,\s]+), .*?'
                  r'lhs_contracting_dims=\{([\d,]*)\}')


def hlo_dot_flops(hlo_text: str) -> int:
  """FLOPs of every dot in an optimised HLO module's text: 2 x output size
  x contracted size, the operand shapes looked up by instruction name."""
  dims = lambda s: [int(x) for x in s.split(',') if x]
  shapes = {name: dims(shape) for name, shape in _INSTRUCTION.findall(hlo_text)}
  total = 0
  for out, lhs, contracting in _DOT.findall(hlo_text):
    total += 2 * math.prod(dims(out)) * math.prod(
        shapes[lhs][i] for i in dims(contracting))
  return total


# ------------------------------------------------------------ the two sides ---

def timed(step, state, steps: int, warmup: int = 0) -> list[float]:
  """Wall times of `steps` calls `state = step(state)` after `warmup` calls."""
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state = step(state)
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return times


def matmul_times(matmul) -> list[float]:
  """Times of five MATMUL_SIZE^2 float32 products `matmul()` after one."""
  return timed(lambda _: matmul(), None, 5, warmup=1)


def jax_droppos(shapes: Shapes, images, tx, lr):
  """(init(key) -> params, train_step) of our DropPos objective."""
  import jax.numpy as jnp

  from droppos_jax.objectives import droppos as droppos_objective

  model = droppos.droppos_from_config(shapes.variant, PROJECTOR,
                                      dtype=jnp.float32)
  cfg = droppos_objective.ObjectiveConfig(
      image_hw=(shapes.image_size,) * 2, patch_size=shapes.size.patch_size,
      masking=masking.Masking('random', 0.75, 0.75), attentive=True, tau=TAU,
      sigma=SIGMA)
  init = lambda key: model.init(key, images[:1], jnp.zeros((1, 1), jnp.int32),
                                jnp.ones((1, 1), bool))['params']
  return init, droppos_objective.make_train_step(model, tx, cfg, lr_fn=lr,
                                                 seed=0)


def jax_mae(shapes: Shapes, images, tx, lr):
  """(init(key) -> params, train_step) of our MAE objective."""
  from droppos_jax.objectives import mae as mae_objective

  del images  # the parameters' shapes follow from the config alone
  model, cfg = mae_parts(shapes)
  init = lambda key: mae_objective.init_params(model, key, cfg.image_hw)
  return init, mae_objective.make_train_step(model, tx, cfg, lr_fn=lr, seed=0)


JAX_STEPS = {'droppos': jax_droppos, 'mae': jax_mae}


def build_jax_step(shapes: Shapes):
  """(our compiled train step, its state, images) for `shapes`."""
  import jax
  import jax.numpy as jnp
  import ml_collections

  from droppos_jax import optim

  hw = (shapes.image_size,) * 2
  lr = optim.lr_schedule(PEAK_LR, total_steps=LR_TOTAL, warmup_steps=LR_WARMUP)
  tx = optim.make_optimizer(ml_collections.ConfigDict(dict(
      b1=0.9, b2=0.95, weight_decay=WEIGHT_DECAY,
      clip=CLIP[shapes.objective], clip_norm=CLIP_NORM)), lr)
  images = jax.random.normal(jax.random.key(1), (shapes.batch, *hw, 3))
  init, train_step = JAX_STEPS[shapes.objective](shapes, images, tx, lr)
  params = jax.jit(init)(jax.random.key(2))  # one compile, not one per op
  state = {'step': jnp.int32(0), 'params': params,
           'opt_state': jax.jit(tx.init)(params)}
  compiled = jax.jit(train_step, donate_argnums=(0,)).lower(state, images).compile()
  return compiled, state, images


def time_jax(shapes: Shapes, steps: int) -> dict:
  """Our step: timings, matmul times and the compiled program's FLOPs."""
  import jax
  import jax.numpy as jnp

  a, b = jax.random.normal(jax.random.key(0), (2, MATMUL_SIZE, MATMUL_SIZE))
  matmul = jax.jit(jnp.matmul)
  mm = matmul_times(lambda: matmul(a, b).block_until_ready())
  step, state, images = build_jax_step(shapes)
  times = timed(lambda s: jax.block_until_ready(step(s, images)[0]), state,
                steps, WARMUP_STEPS)
  mm += matmul_times(lambda: matmul(a, b).block_until_ready())
  return {'times': times, 'matmul_times': mm,
          'cost_analysis_flops': float(step.cost_analysis()['flops']),
          'dot_flops': hlo_dot_flops(step.as_text())}


def torch_reference():
  """tests/torch_reference.py (the authors' model in torch), by path."""
  if not REFERENCE.is_file():
    raise UserError(f'{REFERENCE} (the torch model) is missing: the torch side '
                    'needs a source checkout of this repository; pass '
                    '--skip_torch to time ours alone.')
  spec = importlib.util.spec_from_file_location('torch_reference', REFERENCE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def authors_lr(step: int) -> float:
  """MAE's per-iteration lr (lr_sched.adjust_learning_rate), the same
  warm-up + half-cosine as optim.lr_schedule."""
  if step < LR_WARMUP:
    return PEAK_LR * step / LR_WARMUP
  return PEAK_LR * 0.5 * (1. + math.cos(math.pi * (step - LR_WARMUP) /
                                        (LR_TOTAL - LR_WARMUP)))


def torch_droppos(ref, shapes: Shapes, gen):
  """(the authors' DropPos model, loss(images) of one step, masks from gen)."""
  size = shapes.size
  model = ref.DropPos((shapes.image_size,) * 2, size.patch_size, size.width,
                      size.depth, size.num_heads, *droppos.PROJECTORS[PROJECTOR])

  def loss(images):
    ids_keep, drop_mask = ref.sample_masks(shapes.batch, shapes.num_patches,
                                           *shapes.mask_counts, gen)
    targets = ref.smoothing_targets(shapes.grid, SIGMA)
    return ref.droppos_loss(model, images, ids_keep, drop_mask, targets, TAU)[0]

  return model, loss


def torch_mae(ref, shapes: Shapes, gen):
  """(MAE's model, loss(images) of one step, masks from gen)."""
  import torch

  size = shapes.size
  model = ref.MAE((shapes.image_size,) * 2, size.patch_size, size.width,
                  size.depth, size.num_heads, *DECODER, norm_pix_loss=True)

  def loss(images):
    # MAE's random_masking: argsort of uniform noise, the first K kept.
    noise = torch.rand(shapes.batch, shapes.num_patches, generator=gen)
    return model(images, noise.argsort(dim=1)[:, :shapes.num_visible])[0]

  return model, loss


TORCH_STEPS = {'droppos': torch_droppos, 'mae': torch_mae}


def build_torch_step(shapes: Shapes):
  """The authors' train step for `shapes`: step(i) -> i + 1."""
  import torch

  ref = torch_reference()
  gen = torch.Generator().manual_seed(0)
  model, loss_fn = TORCH_STEPS[shapes.objective](ref, shapes, gen)
  opt = torch.optim.AdamW(ref.decay_groups(model, WEIGHT_DECAY), lr=PEAK_LR,
                          betas=(0.9, 0.95))
  params = [p for p in model.parameters() if p.requires_grad]
  images = torch.randn(shapes.batch, 3, shapes.image_size, shapes.image_size,
                       generator=gen)
  clip = CLIP[shapes.objective] == 'per_tensor'

  def step(i):
    loss = loss_fn(images)
    opt.zero_grad()
    loss.backward()
    if clip:
      ref.clip_per_tensor_([p.grad for p in params], CLIP_NORM)
    for group in opt.param_groups:
      group['lr'] = authors_lr(i)
    opt.step()
    return i + 1

  return step


def time_torch(shapes: Shapes, steps: int) -> dict:
  """The authors' step in torch: timings and matmul times."""
  import torch

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  a, b = torch.randn(2, MATMUL_SIZE, MATMUL_SIZE)
  mm = matmul_times(lambda: a @ b)
  times = timed(build_torch_step(shapes), 0, steps, WARMUP_STEPS)
  mm += matmul_times(lambda: a @ b)
  return {'times': times, 'matmul_times': mm}


# ------------------------------------------------------------ the driver ---

def child_env(cache_dir: str) -> dict:
  """The environment of a timing process: the CPU only, as one device (fake
  devices would split nothing but confuse the count), a shared compilation
  cache so that later alternations skip XLA's compile."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             TF_CPP_MIN_LOG_LEVEL='2')
  env['XLA_FLAGS'] = re.sub(r'--xla_force_host_platform_device_count=\S+', '',
                            env.get('XLA_FLAGS', '')).strip()
  return env


def run_side(side: str, shapes: Shapes, steps: int, cache_dir: str) -> dict:
  """Times one side in a fresh process (this script with --side)."""
  cmd = [sys.executable, __file__, '--side', side, '--objective',
         shapes.objective, '--variants', shapes.variant,
         '--image_size', str(shapes.image_size), '--batch', str(shapes.batch),
         '--steps', str(steps)]
  proc = subprocess.run(cmd, capture_output=True, text=True,
                        env=child_env(cache_dir))
  lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT)]
  if proc.returncode or not lines:
    raise RuntimeError(f'{" ".join(cmd)} failed (exit {proc.returncode}):\n'
                       f'{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len(RESULT):])


def report(shapes: Shapes, runs: dict) -> None:
  """Prints one model's table from {side: [result per alternation]}."""
  head, sizes = HEADS[shapes.objective]
  print(f'\n{shapes.variant}, {shapes.image_size} px, batch {shapes.batch}, '
        f'float32, {head} {"/".join(map(str, sizes))}, '
        f'{len(os.sched_getaffinity(0))} cores, '
        f'{len(runs["jax"])} alternations x {len(runs["jax"][0]["times"])} steps')
  print(f'{"":17s} {"s/step":>7s} {"img/s":>7s} {"GFLOP/step":>10s} '
        f'{"GFLOP/s":>8s} {"matmul GFLOP/s":>14s} {"of matmul":>9s}')
  median = {}
  for side, results in runs.items():
    median[side] = statistics.median(t for r in results for t in r['times'])
    flops = step_flops(shapes, ours=side == 'jax')
    peak = 2 * MATMUL_SIZE**3 / statistics.median(
        t for r in results for t in r['matmul_times'])
    print(f'{SIDES[side]:17s} {median[side]:7.3f} {shapes.batch / median[side]:7.1f} '
          f'{flops / 1e9:10.1f} {flops / median[side] / 1e9:8.1f} '
          f'{peak / 1e9:14.1f} {100 * flops / median[side] / peak:8.0f} %')
  for side, results in runs.items():
    medians = ' '.join(f'{statistics.median(r["times"]):.3f}' for r in results)
    print(f'  {SIDES[side]} s/step per alternation: {medians}')
  ours = runs['jax'][0]
  print(f'  ours compiled: {ours["dot_flops"] / 1e9:.1f} GFLOP in dots, '
        f'{ours["cost_analysis_flops"] / 1e9:.1f} GFLOP by cost_analysis')
  if 'torch' in runs:
    saved = 1 - step_flops(shapes, True) / step_flops(shapes, False)
    print(f'  ours/authors img/s: {median["torch"] / median["jax"]:.3f}x; '
          f'ours does {100 * saved:.1f} % fewer matmul FLOPs')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--objective', choices=sorted(HEADS), default='droppos',
                 help="droppos (default) or mae: MAE's step on both sides")
  p.add_argument('--variants', nargs='+', default=list(BATCH),
                 help='ViT variants, e.g. Ti/16 B/16')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--batch', type=int, default=None,
                 help=f'batch for every variant (default: {BATCH}, else 32)')
  p.add_argument('--steps', type=int, default=10,
                 help='timed steps per process, after two warm-up steps')
  p.add_argument('--alternations', type=int, default=3)
  p.add_argument('--skip_torch', action='store_true', help='time ours alone')
  p.add_argument('--side', choices=sorted(SIDES), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for name in ('image_size', 'batch', 'steps', 'alternations'):
    value = getattr(args, name)
    if value is not None and value < 1:
      raise UserError(f'--{name}={value} must be >= 1.')
  return args


def main(argv=None):
  args = parse_args(argv)
  settings = []
  for variant in args.variants:
    shapes = Shapes(variant, args.image_size,
                    args.batch or BATCH.get(variant, 32), args.objective)
    shapes.grid  # validates the variant and the image size
    settings.append(shapes)
  if args.side:
    timer = time_jax if args.side == 'jax' else time_torch
    print(RESULT + json.dumps(timer(settings[0], args.steps)))
    return
  sides = ['torch', 'jax']
  if args.skip_torch or importlib.util.find_spec('torch') is None:
    sides = ['jax']
    print('Timing ours only' + ('' if args.skip_torch else
                                ' (torch is not installed).'))
  else:
    torch_reference()  # fails early, with a clear message, outside a checkout
  with tempfile.TemporaryDirectory() as cache_dir:
    for shapes in settings:
      runs = {side: [] for side in sides}
      for _ in range(args.alternations):
        for side in sides:
          runs[side].append(run_side(side, shapes, args.steps, cache_dir))
      report(shapes, runs)


if __name__ == '__main__':
  try:
    main()
  except UserError as e:
    sys.exit(f'error: {e}')
