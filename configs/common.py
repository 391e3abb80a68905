"""Defaults shared by every pre-training config; recipes override fields."""
import ml_collections
from ml_collections import config_dict

from droppos_jax.evaluators import online


def parse_arg(arg, valid):
  """'variant=B/16,epochs=800' -> dict; bare words are flags set to True."""
  out = {}
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in valid:
      raise ValueError(f'Unknown config arg {key!r} in {arg!r}; valid: '
                       f'{valid}.')
    out[key] = value if value else True
  return out


def data_config(source='tfds', name=None, data_dir=None, split='train',
                path=None) -> ml_collections.ConfigDict:
  """Data source fields; unset strings are typed placeholders so that
  `--config.data.path=…` works from the command line."""
  text = lambda v: config_dict.placeholder(str) if v is None else v
  return ml_collections.ConfigDict(dict(
      source=source, name=text(name), data_dir=text(data_dir), split=split,
      path=text(path)))


def base_pretrain_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = 224              # int, or (height, width) for non-square
  c.model = ml_collections.ConfigDict(dict(
      variant='B/16', projector='default',
      projector_width=config_dict.placeholder(int),
      projector_depth=config_dict.placeholder(int),
      projector_heads=config_dict.placeholder(int), dtype='float32',
      remat=False))
  c.objective = ml_collections.ConfigDict(dict(
      mask_ratio=0.75, pos_drop_ratio=0.75, attentive=True, tau=0.1,
      sigma=1.0, sigma_schedule='linear_epoch', official_quirks=False))
  c.data = data_config('tfds', name='imagenet2012')
  c.batch_size = 4096             # global, over all devices and hosts
  c.grad_accum_steps = 1          # micro-batches per step (exact, see pretrain.py)
  c.epochs = 800
  c.warmup_epochs = 40
  c.num_train_steps = -1          # > 0 overrides epochs (smoke runs)
  c.optim = ml_collections.ConfigDict(dict(
      blr=1.5e-4, min_lr=0., b1=0.9, b2=0.95, weight_decay=0.05,
      clip='per_tensor', clip_norm=5.0))
  c.sharding = 'dp'               # 'dp' (replicated state) or 'fsdp'
  c.num_devices = -1              # -1: every device
  c.log_every = 50
  c.ckpt_every = 1000
  c.keep_ckpts = 3
  c.eval = online.default_eval_config()   # k-NN + held-out position acc
  return c
