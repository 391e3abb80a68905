r"""Linear probing (the MAE protocol: frozen encoder, BatchNorm, LARS), by `:arg`.

  python finetune.py --config configs/linear_probe.py:variant=B/16 \
      --workdir gs://bucket/lin_b16 --config.init.path=gs://bucket/droppos_b16 \
      --config.data.data_dir=gs://bucket/tensorflow_datasets \
      --config.val_data.data_dir=gs://bucket/tensorflow_datasets
  python finetune.py --config configs/linear_probe.py:demo \
      --workdir /tmp/lin_demo --config.init.path=runs/demo

Args: `variant` (default 'B/16'), `demo` (nano/8, 32 px, the built-in
photos, 40 epochs, ~25 s on 2 CPU cores: best val top-1 75.0 % on a random
encoder, 74.2 % after the configs/demo.py pre-training: this 7-photo task is
solved from colour statistics, which a random encoder keeps), `runlocal`
(tiny smoke test).

Frozen encoder -> [cls] after the final norm (`model.feature='gap'` pools the
patch tokens instead) -> BatchNorm without affine -> linear head. LARS
(momentum 0.9, trust coefficient 0.001), lr = 0.1 * batch/256, batch 16384,
90 epochs with 10 warm-up, cosine to 0, no weight decay; RandomResizedCrop +
flip only (no RandAugment, erasing, mixup or label smoothing).
"""
import ml_collections

from droppos_jax.configs import common
from droppos_jax.configs import finetune as finetune_config


def get_config(arg=None):
  args = common.parse_arg(arg, **finetune_config.ARGS)
  c = finetune_config.base_config()
  c.protocol = 'linear_probe'
  c.model = ml_collections.ConfigDict(dict(
      variant=args.variant, feature='cls', dtype='float32'))
  c.optim = ml_collections.ConfigDict(dict(
      blr=0.1, min_lr=0., weight_decay=0., momentum=0.9))
  c.augment.randaugment_layers = 0
  c.augment.random_erasing = 0.
  c.mix.mixup_alpha = c.mix.cutmix_alpha = c.mix.label_smoothing = 0.
  c.batch_size = 16384
  c.epochs = 90
  c.warmup_epochs = 10
  if args.demo:
    finetune_config.demo_data(c)
    c.model.variant = 'nano/8'
    c.batch_size = c.eval_batch_size = 64
    # LARS steps are ~lr * 0.001 * |w|: keep the recipe's lr (0.1 * 16384/256
    # = 6.4) at batch 64, else the head hardly moves in a short run.
    c.optim.blr = 25.6
    c.epochs = 40
    c.warmup_epochs = 4
    c.eval_every_epochs = 4
  if args.runlocal:
    finetune_config.runlocal(c)
  return c
