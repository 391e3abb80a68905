r"""DropPos pre-training recipes of the paper (arXiv 2309.03576, §4 and Table 1), by `:arg`.

  python train.py --config configs/pretrain.py:variant=B/16,epochs=800 \
      --workdir gs://bucket/droppos_b16_800ep \
      --config.data.data_dir=gs://bucket/tensorflow_datasets

Args (comma separated `key=value` after the colon):
  variant  'B/16' (default) or 'L/16'; any ViT name ('S/16', 'H/14') works
           with the ViT-B recipe unless it is 'L/…'.
  epochs   200 or 800 (default 800). ViT-L uses 40 warm-up epochs, others 10.
  runlocal if set, a tiny smoke-test version of the same recipe.

Expected ImageNet-1K fine-tuning top-1 after pre-training (paper, Table 1):
  B/16 200 ep: 83.0, B/16 800 ep: 84.2, L/16 800 ep: 85.8.
Global batch 4096 (64 per GPU x 64 GPUs in the paper); lr = 1.5e-4 * 4096/256.
Data: TFDS 'imagenet2012' prepared by the user (manual download), read from
`data.data_dir`; use `--config.data.source=folder --config.data.path=…` for a
folder of images instead.
"""
from droppos_jax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, variant='B/16', epochs=800, runlocal=False)
  c = common.base_pretrain_config()
  c.model.variant = args.variant
  c.epochs = args.epochs
  c.warmup_epochs = 40 if args.variant.startswith('L/') else 10
  if args.runlocal:
    common.smoke_run(c)
    c.model.projector = 'tiny'
  return c
