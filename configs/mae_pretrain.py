r"""MAE pre-training recipes (arXiv 2111.06377, facebookresearch/mae), by `:arg`:
the baseline DropPos is measured against, through the same trainer.

  python train.py --config configs/mae_pretrain.py:variant=B/16,epochs=800 \
      --workdir gs://bucket/mae_b16_800ep \
      --config.data.data_dir=gs://bucket/tensorflow_datasets

Args (comma separated `key=value` after the colon):
  variant  'B/16' (default) or 'L/16'; any ViT name works.
  epochs   default 800 (MAE's main results; 1600 for its best).
  runlocal if set, a tiny smoke-test version of the same recipe.

MAE's recipe: 75 % random masking, a decoder of 8 blocks of width 512 with
16 heads, mean-squared error on the masked patches of per-patch normalised
pixels (norm_pix_loss), global batch 4096, lr = 1.5e-4 * 4096/256, 40
warm-up epochs, AdamW (0.9, 0.95), weight decay 0.05, no gradient clipping.
Expected ImageNet-1K fine-tuning top-1 (MAE, Table 3): B/16 83.6, L/16 85.9
(1600 epochs).
"""
import ml_collections

from droppos_jax.configs import common


def mae_config() -> ml_collections.ConfigDict:
  """The pre-training config with MAE's objective, model and optimizer."""
  c = common.base_pretrain_config()
  c.model = ml_collections.ConfigDict(dict(
      variant='B/16', decoder_width=512, decoder_depth=8, decoder_heads=16,
      dtype='float32', remat=False,
      # jax.nn.dot_product_attention: 'auto' = cuDNN on GPUs in half
      # precision, XLA elsewhere; or 'xla' / 'cudnn'.
      attention='auto'))
  c.objective = ml_collections.ConfigDict(dict(name='mae', norm_pix_loss=True))
  c.masking.pos_drop_ratio = 0.0   # MAE keeps every visible patch's PE
  c.optim.clip = 'none'
  c.eval.evaluators = ('knn',)     # held-out positions need a position head
  return c


def get_config(arg=None):
  args = common.parse_arg(arg, variant='B/16', epochs=800, runlocal=False)
  c = mae_config()
  c.model.variant = args.variant
  c.epochs = args.epochs
  c.warmup_epochs = 40
  if args.runlocal:
    common.smoke_run(c)
    c.model.update(decoder_width=64, decoder_depth=1, decoder_heads=4)
  return c
