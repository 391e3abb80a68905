"""Defaults shared by the configs; recipes override fields.

Configs import only this module (and ml_collections): nothing from the
library, so loading one is cheap and never touches jax.
"""
import ml_collections
from ml_collections import config_dict

from droppos_jax.errors import UserError

_TRUE, _FALSE = ('true', '1', 'yes'), ('false', '0', 'no')


def _parse_bool(key, text):
  if text.lower() in _TRUE:
    return True
  if text.lower() in _FALSE:
    return False
  raise UserError(f'Config arg {key}={text!r} is a boolean: use True or False.')


def parse_arg(arg, **defaults):
  """The `:arg` of `--config file.py:arg`, typed by its defaults.

    args = parse_arg('variant=L/16,epochs=800,runlocal', variant='B/16',
                     epochs=800, runlocal=False)
    args.epochs  # 800, an int; args.runlocal  # True

  As big_vision's parse_arg: each value takes the type of its default,
  booleans are strict (True/False, 1/0, yes/no; a bare key means True) and
  unknown keys are refused, naming the valid ones.
  """
  args = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, text = item.partition('=')
    if key not in defaults:
      raise UserError(f'Unknown config arg {key!r} in {arg!r}; valid: '
                      f'{", ".join(defaults)}.')
    kind = type(defaults[key])
    if kind is bool:
      args[key] = _parse_bool(key, text) if sep else True
    elif not sep:
      raise UserError(f'Config arg {key!r} needs a value: {key}=<{kind.__name__}>.')
    else:
      try:
        args[key] = kind(text)
      except ValueError:
        raise UserError(f'Config arg {key}={text!r} must be a '
                        f'{kind.__name__}.') from None
  return ml_collections.ConfigDict(args)


def data_config(source='tfds', name=None, data_dir=None, split='train',
                path=None) -> ml_collections.ConfigDict:
  """Data source fields; unset strings are typed placeholders so that
  `--config.data.path=…` works from the command line. `reads_in_flight`
  (TFDS ArrayRecord only): record reads kept in flight, unset = the
  source's default (droppos_jax.data.sources.READS_IN_FLIGHT)."""
  text = lambda v: config_dict.placeholder(str) if v is None else v
  return ml_collections.ConfigDict(dict(
      source=source, name=text(name), data_dir=text(data_dir), split=split,
      path=text(path), reads_in_flight=config_dict.placeholder(int)))


def masking_config() -> ml_collections.ConfigDict:
  """The paper's masking (§3): 75 % of the patches masked, the PE of 75 % of
  the visible ones dropped. `strategy` names a registered masking
  (droppos_jax.masking.MASKINGS: 'random' as MAE and the paper, 'block' as
  BEiT)."""
  return ml_collections.ConfigDict(dict(
      strategy='random', mask_ratio=0.75, pos_drop_ratio=0.75))


def base_pretrain_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = 224              # int, or (height, width) for non-square
  c.model = ml_collections.ConfigDict(dict(
      # The position head (droppos_jax.models.droppos.POSITION_HEADS):
      # 'transformer' (the paper's, sized by `projector` and projector_*)
      # or 'linear'.
      variant='B/16', head='transformer', projector='default',
      projector_width=config_dict.placeholder(int),
      projector_depth=config_dict.placeholder(int),
      projector_heads=config_dict.placeholder(int), dtype='float32',
      remat=False,
      # The attentive pass (forward only): 'auto' = bfloat16 matmuls on TPUs
      # and GPUs (softmax and cosine stay float32), the model dtype elsewhere.
      attentive_dtype='auto',
      # jax.nn.dot_product_attention: 'auto' = cuDNN on GPUs in half
      # precision, XLA elsewhere; or 'xla' / 'cudnn'.
      attention='auto'))
  c.masking = masking_config()
  # `name`: a registered objective (droppos_jax.objectives.OBJECTIVES).
  c.objective = ml_collections.ConfigDict(dict(
      name='droppos', attentive=True, tau=0.1, sigma=1.0, sigma_schedule='linear_epoch',
      official_quirks=False))
  c.data = data_config('tfds', name='imagenet2012')
  # 0: each crop is resized on the host (tf.data). P > 0: the host decodes
  # the crop window only and ships it padded to P x P; the accelerators do
  # the same PIL resize and the flip (~0.5 GFLOP per image at P = 512).
  # -1: by platform, 512 on TPUs and GPUs (their hosts resize too slowly to
  # feed them), 0 on CPUs; see the README and the planner's input line.
  c.device_resize_window = -1
  c.batch_size = 4096             # global, over all devices and hosts
  c.grad_accum_steps = 1          # micro-batches per step (exact, see objectives/droppos.py)
  c.epochs = 800
  c.warmup_epochs = 40
  c.num_train_steps = -1          # > 0 overrides epochs (smoke runs)
  c.optim = ml_collections.ConfigDict(dict(
      blr=1.5e-4, min_lr=0., b1=0.9, b2=0.95, weight_decay=0.05,
      clip='per_tensor', clip_norm=5.0))
  # Devices as (data, fsdp); -1 = the rest. fsdp > 1 splits the parameters
  # and optimizer state (data=1, fsdp=-1: over every device of a slice).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.num_devices = -1              # -1: every device
  c.log_every = 50
  c.ckpt_every = 1000
  c.keep_ckpts = 3
  c.profile_steps = (0, 0)        # (first, stop): jax.profiler trace of those steps
  c.eval = eval_config()          # k-NN + held-out position acc
  return c


def smoke_run(c: ml_collections.ConfigDict) -> None:
  """Shrinks a pre-training recipe to a few steps of a tiny ViT on the demo
  photos (the recipes' `runlocal`)."""
  c.model.variant = 'mu/16'
  c.batch_size = 16
  c.num_train_steps = 5
  c.warmup_epochs = 0
  c.log_every = 1
  c.ckpt_every = 5
  c.data = data_config('demo')


def eval_config() -> ml_collections.ConfigDict:
  """The online evaluator's block of a pre-training config (off unless
  enabled): k-NN on labelled images and held-out position accuracy."""
  return ml_collections.ConfigDict(dict(
      enabled=False,
      every_steps=500,
      # Registered names (droppos_jax.evaluators.online.ONLINE_EVALUATORS).
      evaluators=('knn', 'heldout_positions'),
      bank_data=data_config('demo', split='train'),   # labelled k-NN memory bank
      query_data=data_config('demo', split='val'),    # queries, held-out positions
      num_bank_examples=256,
      num_query_examples=64,
      batch_size=64,              # multiple of the devices
      knn_k=20,
      knn_temperature=0.07,       # DINO's weighted vote: exp(cos / T)
      knn_feature='cls',          # 'cls' or 'gap' (mean of patch tokens)
      seed=0,                     # held-out masks
  ))
