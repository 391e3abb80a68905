r"""Pictures of a DropPos checkpoint's position predictions (visualize.py).

  python visualize.py --config.init.path=runs/demo --output runs/demo/droppos.png
  python visualize.py --config.init.path=gs://bucket/run --output val.png \
      --config.num_images=6 --config.data.source=folder \
      --config.data.path=/data/images

`init.path`: a DropPos pre-training workdir or step folder, or a DropPos
weights file. Images come from the demo's held-out 'val' split unless `data`
says otherwise; masks from key(seed). Unset `masking` fields come from the run's
config.json, else the paper's (configs/common.py).
"""
import ml_collections
from ml_collections import config_dict

from droppos_jax.configs import common


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.init = ml_collections.ConfigDict(dict(path=''))
  c.num_images = 4
  c.seed = 0
  c.masking = ml_collections.ConfigDict(dict(
      strategy=config_dict.placeholder(str),
      mask_ratio=config_dict.placeholder(float),
      pos_drop_ratio=config_dict.placeholder(float)))
  c.data = common.data_config('demo', split='val')
  return c
