r"""Offline demo: DropPos pre-training of a tiny ViT on built-in photos.

  python train.py --config configs/demo.py --workdir runs/demo

Uses the real photos that ship with scikit-image (random crops, no download).
ViT 'nano/8' (width 64, depth 4) on 32x32 crops: a 4x4 grid, so chance
position accuracy is 1/16 = 6.25 %. On 2 CPU cores it runs in about 5 minutes;
see the README for the accuracy it reaches.
"""
from droppos_jax.configs import common


def get_config(arg=None):
  del arg
  c = common.base_pretrain_config()
  c.image_size = 32
  c.model.variant = 'nano/8'
  c.model.projector = 'tiny'          # 2-3x faster here than 'small', same accuracy
  c.data = common.data_config('demo')
  c.batch_size = 64
  c.epochs = 800                  # 6400 steps of 64 images
  c.warmup_epochs = 20
  # sigma_0 = 1 is for a 14x14 grid; on 4x4 it blurs targets over the grid.
  c.objective.sigma = 0.5
  c.optim.blr = 4e-3              # tiny model, small batch: larger base lr
  c.log_every = 50
  c.ckpt_every = 500
  c.keep_ckpts = 2
  c.eval.enabled = True            # k-NN on photo labels, held-out positions
  c.eval.every_steps = 1600
  return c
