r"""Position probing (paper §4.3) of a frozen ViT on the offline demo photos.

  python probe_position.py --config configs/position_probe.py \
      --config.init.path=runs/demo --workdir runs/probe_demo
  python probe_position.py --config configs/position_probe.py \
      --config.image_size=32 --workdir runs/probe_random   # random init

`init.path` is a pre-training or fine-tuning workdir or step folder, or a
DropPos/MAE/timm weights file (.safetensors, .pth/.pt/.bin, .npz;
models/weights.py); empty means a random `model.variant`, as in fine-tuning.
Dropped tokens get the checkpoint's mask_pos_token if it has one (and
use_mask_token), else no PE.

Demo data: the head trains on 2,048 fresh crops (crop seed 1) and is scored
on 256 others (seed 2) of the photos' training region; the demo pre-training
saw only seed-0 crops. `--config.eval_data.split=val` scores the held-out
band (pixels pre-training never saw) instead. For ImageNet:
--config.train_data.source=tfds --config.train_data.name=imagenet2012 (split
train) and the same for eval_data (split validation), with
num_train_images/num_eval_images to bound the cost.
"""
import ml_collections
from ml_collections import config_dict

from droppos_jax.configs import common


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.init = ml_collections.ConfigDict(dict(path=''))
  # `variant`: random init only (checkpoints carry theirs). Unset
  # `num_heads`: from the weights; it only matters for files whose width is
  # not a vit.VARIANTS width.
  c.model = ml_collections.ConfigDict(dict(
      variant='nano/8', num_heads=config_dict.placeholder(int)))
  # Unset: from the checkpoint; the square probe size.
  c.image_size = config_dict.placeholder(int)
  c.masking = common.masking_config()
  c.use_mask_token = True         # False: dropped tokens get no PE
  c.train_data = common.data_config('demo', split='train')
  c.train_data.num_images, c.train_data.seed = 2048, 1
  c.eval_data = common.data_config('demo', split='train')
  c.eval_data.num_images, c.eval_data.seed = 256, 2
  c.num_train_images = -1         # -1: the whole split
  c.num_eval_images = -1
  c.mask_draws = 4                # mask draws per image (more tokens)
  c.batch_size = 64               # feature extraction; multiple of the devices
  c.head = ml_collections.ConfigDict(dict(
      optimizer='adamw', lr=1e-2, weight_decay=1e-4, momentum=0.9, steps=500,
      batch_size=1024))
  c.seed = 0
  c.num_devices = -1
  return c
