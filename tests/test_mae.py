"""The MAE objective against a PyTorch restatement of MAE's public model
(tests/torch_reference.py: loss, gradients, three AdamW steps, and a
perturbed decoder weight that must fail the same checks); its analytic
FLOPs against the traced matmuls; its config errors."""
import jax
import ml_collections
import numpy as np
import pytest

from droppos_jax import masking, optim
from droppos_jax.configs import mae_pretrain
from droppos_jax.errors import UserError
from droppos_jax.models import architecture, convert
from droppos_jax.models import mae as mae_model
from droppos_jax.objectives import mae as mae_objective

HW, PATCH, WIDTH, DEPTH, HEADS = (32, 48), 8, 32, 2, 2
DECODER = dict(decoder_dim=16, decoder_depth=2, decoder_heads=2)
CFG = mae_objective.MAEConfig(image_hw=HW, patch_size=PATCH,
                              masking=masking.Masking('random', 0.75, 0.),
                              norm_pix_loss=True)
MODEL = mae_model.build(architecture.Architecture(
    WIDTH, DEPTH, 4 * WIDTH, HEADS, PATCH,
    decoder=architecture.DecoderSize(16, 2, 2)))
LR, STEPS, BATCH = 1e-3, 3, 4


def _torch_model(torch_reference, perturb: bool = False):
  tm = torch_reference.MAE(HW, PATCH, WIDTH, DEPTH, HEADS, **DECODER)
  if perturb:  # the negative control: one decoder weight off by 1e-3
    with __import__('torch').no_grad():
      tm.decoder_blocks[1].mlp.fc1.weight[0, 0] += 1e-3
  return tm


def _images(step):
  return np.random.default_rng(step).normal(
      size=(BATCH, *HW, 3)).astype(np.float32)


def _masks(step):
  """The visible patches the train step draws at `step` (seed 0)."""
  return CFG.masking.visible(jax.random.fold_in(jax.random.key(0), step),
                             BATCH, CFG.grid)


def _check_against(torch, torch_reference, tm, params):
  """Loss and every gradient of one batch, then the parameters after three
  AdamW steps (MAE's groups: no decay on 1-D tensors; no clipping), ours
  against torch's `tm` started from `params`."""
  nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)
  ids = _masks(0)
  (loss, _), grads = jax.jit(jax.value_and_grad(
      mae_objective.masked_loss_fn, has_aux=True), static_argnums=(1, 4))(
          params, MODEL, _images(0), ids, CFG)
  loss_t, _, _ = tm(nchw(_images(0)), torch.from_numpy(np.asarray(ids, np.int64)))
  loss_t.backward()
  np.testing.assert_allclose(loss, loss_t.item(), rtol=1e-5)
  ours = convert.flax_to_torch(grads, kind='mae', grid_hw=CFG.grid)
  for name, p in tm.named_parameters():
    if p.requires_grad:
      scale = float(p.grad.abs().max()) + 1e-12
      np.testing.assert_allclose(ours[name] / scale, p.grad.numpy() / scale,
                                 atol=2e-5, err_msg=f'gradient of {name}')

  opt = ml_collections.ConfigDict(dict(
      b1=0.9, b2=0.95, weight_decay=0.05, clip='none', clip_norm=0.))
  tx = optim.make_optimizer(opt, lambda step: LR)
  step_fn = jax.jit(mae_objective.make_train_step(
      MODEL, tx, CFG, lr_fn=lambda step: LR, seed=0))
  state = {'step': np.int32(0), 'params': params, 'opt_state': tx.init(params)}
  adamw = torch.optim.AdamW(torch_reference.decay_groups(tm, 0.05), lr=LR,
                            betas=(0.9, 0.95), eps=1e-8)
  for step in range(STEPS):
    state, _ = step_fn(state, _images(step))
    adamw.zero_grad()
    tm(nchw(_images(step)),
       torch.from_numpy(np.asarray(_masks(step), np.int64)))[0].backward()
    adamw.step()
  after = convert.flax_to_torch(state['params'], kind='mae', grid_hw=CFG.grid)
  for name, p in tm.named_parameters():
    if p.requires_grad:  # Adam moves each weight by about LR per step
      ours, theirs = after[name], p.detach().numpy()
      if name.endswith('qkv.bias'):
        # The key bias's gradient is zero in exact arithmetic (a softmax
        # ignores what is added to every key), so Adam turns each side's
        # rounding noise into steps of +-LR: compare the query and value
        # biases only.
        d = ours.shape[0] // 3
        ours, theirs = (np.delete(x, np.s_[d:2 * d]) for x in (ours, theirs))
      np.testing.assert_allclose(ours, theirs, rtol=0, atol=LR * 1e-2,
                                 err_msg=f'{name} after steps')


def _params_of(tm):
  state = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
  params, report = convert.torch_to_flax(state, kind='mae',
                                         projector_num_heads=2)
  assert report.ok and not report.unused
  return params


@pytest.mark.slow
def test_loss_gradients_and_three_steps_match_mae_in_torch():
  torch = pytest.importorskip('torch')
  import torch_reference  # pylint: disable=import-outside-toplevel
  tm = _torch_model(torch_reference)
  _check_against(torch, torch_reference, tm, _params_of(tm))


@pytest.mark.slow
def test_a_perturbed_decoder_weight_fails_the_same_checks():
  torch = pytest.importorskip('torch')
  import torch_reference  # pylint: disable=import-outside-toplevel
  params = _params_of(_torch_model(torch_reference))
  with pytest.raises(AssertionError):
    _check_against(torch, torch_reference,
                   _torch_model(torch_reference, perturb=True), params)


@pytest.mark.slow
def test_analytic_flops_match_the_traced_matmuls():
  """flops_per_example against XLA's count of the step's dot FLOPs."""
  params = mae_objective.init_params(MODEL, jax.random.key(0), HW)
  tx = optim.make_optimizer(ml_collections.ConfigDict(dict(
      b1=0.9, b2=0.95, weight_decay=0.05, clip='none', clip_norm=0.)),
                            lambda step: LR)
  step_fn = mae_objective.make_train_step(MODEL, tx, CFG, lr_fn=lambda s: LR,
                                          seed=0)
  state = {'step': np.int32(0), 'params': params, 'opt_state': tx.init(params)}
  compiled = jax.jit(step_fn).lower(state, _images(0)).compile()
  total = compiled.cost_analysis()['flops']
  analytic = BATCH * mae_objective.flops_per_example(MODEL, CFG)
  # The compiled count adds the elementwise work (softmax, norms, AdamW).
  assert analytic <= total <= 1.35 * analytic, (analytic, total)


def test_mae_settings_are_refused_in_one_line():
  with pytest.raises(UserError, match=r'^masking.pos_drop_ratio=0.5: MAE '
                     r'keeps the PE of every visible patch; set it to 0\.$'):
    mae_objective.MAEConfig(image_hw=HW, patch_size=PATCH,
                            masking=masking.Masking('random', 0.75, 0.5),
                            norm_pix_loss=True)
  m = mae_pretrain.get_config('variant=S/16').model
  m.decoder_heads = 5
  with pytest.raises(UserError, match=r'^model.decoder_width=512, '
                     r'decoder_heads=5, decoder_depth=8: the width must be'):
    mae_model.architecture_from_config(m)


def _tiny_mae_run_config():
  from droppos_jax.configs import mae_demo  # pylint: disable=g-import-not-at-top
  c = mae_demo.get_config()
  c.model.update(variant='mu/8', decoder_width=16, decoder_depth=2,
                 decoder_heads=2)
  c.batch_size, c.num_train_steps, c.warmup_epochs = 16, 6, 0
  c.data.num_images, c.log_every, c.ckpt_every = 256, 1, 3
  c.eval.enabled = False
  return c


@pytest.mark.slow
def test_an_mae_run_resumes_bit_exactly_and_exports_mae_naming(
    tmp_path, monkeypatch):
  """Preempted after step 3 and resumed: the losses of steps 4-6 equal an
  uninterrupted run's bit for bit. Its export loads into MAE's model (every
  key) and computes the same loss; a timm-layout ViT takes the encoder with
  no missing key."""
  torch = pytest.importorskip('torch')
  import test_train  # pylint: disable=import-outside-toplevel
  import torch_reference  # pylint: disable=import-outside-toplevel
  from droppos_jax import export, train  # pylint: disable=g-import-not-at-top
  from droppos_jax.models import weights  # pylint: disable=g-import-not-at-top
  full = train.train(_tiny_mae_run_config(), str(tmp_path / 'full'))['losses']
  with monkeypatch.context() as m:
    test_train.sigterm_after(m, 2)
    first = train.train(_tiny_mae_run_config(), str(tmp_path / 'cut'))
  assert first['stopped'] == 'preempted' and first['last_step'] == 3
  resumed = train.train(_tiny_mae_run_config(), str(tmp_path / 'cut'))['losses']
  np.testing.assert_array_equal([resumed[s] for s in (4, 5, 6)],
                                [full[s] for s in (4, 5, 6)])

  out = tmp_path / 'mae.pth'
  export.export(str(tmp_path / 'full'), str(out))
  state = torch.load(out, weights_only=True)['model']
  tm = torch_reference.MAE((32, 32), 8, 32, 2, 2, decoder_dim=16,
                           decoder_depth=2, decoder_heads=2)
  tm.load_state_dict(state, strict=True)   # every key, every shape
  w = weights.read(str(out))
  assert w.kind == 'mae' and w.arch == weights.read(str(tmp_path / 'full')).arch
  cfg = mae_objective.MAEConfig(image_hw=(32, 32), patch_size=8,
                                masking=masking.Masking('random', 0.75, 0.),
                                norm_pix_loss=True)
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(
      np.float32)
  ids = cfg.masking.visible(jax.random.key(0), 2, cfg.grid)
  model = mae_model.build(w.arch)
  ours, _ = mae_objective.masked_loss_fn(w.params, model, images, ids, cfg)
  with torch.no_grad():
    theirs, _, _ = tm(torch.from_numpy(images).permute(0, 3, 1, 2),
                      torch.from_numpy(np.asarray(ids, np.int64)))
  np.testing.assert_allclose(ours, theirs.item(), rtol=1e-5)
  vit_t = torch_reference.VisionTransformer((32, 32), 8, 32, 2, 2)
  missing, unexpected = vit_t.load_state_dict(state, strict=False)
  assert not missing
  assert sorted(unexpected) == sorted(
      k for k in state if k.startswith('decoder_') or k == 'mask_token')
