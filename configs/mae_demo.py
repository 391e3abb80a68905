r"""Offline demo: MAE pre-training of a tiny ViT on the photos shipped with the package.

  python train.py --config configs/mae_demo.py --workdir runs/mae_demo

The DropPos demo's budget (configs/demo.py: ViT 'nano/8' on 32x32 crops of
the same photos, 2816 steps of 64 images, the same optimizer) with MAE's
objective: 75 % of the 16 patches masked, a one-block decoder of width 64
(the size of the demo's position head), norm_pix_loss. The online k-NN
evaluation runs as in the DropPos demo.
"""
from droppos_jax.configs import demo, mae_pretrain


def get_config(arg=None):
  del arg
  c = mae_pretrain.mae_config()
  d = demo.get_config()
  for key in ('image_size', 'data', 'batch_size', 'epochs', 'warmup_epochs',
              'optim', 'log_every', 'ckpt_every', 'keep_ckpts'):
    c[key] = d[key]
  c.eval.update(enabled=True, every_steps=d.eval.every_steps,
                num_query_examples=d.eval.num_query_examples)
  c.optim.clip = 'none'            # MAE clips no gradient
  c.model.update(variant=d.model.variant, decoder_width=64, decoder_depth=1,
                 decoder_heads=4)
  return c
