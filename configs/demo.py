r"""Offline demo: DropPos pre-training of a tiny ViT on photos shipped with the package.

  python train.py --config configs/demo.py --workdir runs/demo

Random crops of seven public-domain photos (droppos_jax/data/demo_photos,
no download). ViT 'nano/8' (width 64, depth 4) on 32x32 crops: a 4x4 grid, so
chance position accuracy is 1/16 = 6.25 %. The online evaluation measures it
on crops of a band of each photo that pre-training never sees. Under 5
minutes on 2 CPU cores; the README gives the accuracy it reaches.
"""
from droppos_jax.configs import common


def get_config(arg=None):
  del arg
  c = common.base_pretrain_config()
  c.image_size = 32
  c.model.variant = 'nano/8'
  c.model.projector = 'tiny'      # 2-3x faster here than 'small', same accuracy
  c.data = common.data_config('demo')
  c.data.num_images = 8192        # distinct crops: fewer over-fit the photos
  c.batch_size = 64
  c.epochs = 22                   # 2816 steps of 64 images
  c.warmup_epochs = 2
  # A 4x4 jigsaw: every patch visible (no patch masking), half of them
  # without their PE; with 16 patches the paper's 75 % masking and 75 %
  # dropping leave 3 pieces to place from 1 anchor, too little to learn
  # from in minutes.
  c.masking.mask_ratio = 0.0
  c.masking.pos_drop_ratio = 0.5
  # sigma_0 = 1 is for a 14x14 grid; on 4x4 it blurs targets over the grid.
  c.objective.sigma = 0.5
  c.optim.blr = 4e-3              # tiny model, small batch: larger base lr
  c.log_every = 50
  c.ckpt_every = 500
  c.keep_ckpts = 2
  c.eval.enabled = True           # k-NN on photo labels, held-out positions
  c.eval.every_steps = 1408       # and at the end
  c.eval.num_query_examples = 128
  return c
