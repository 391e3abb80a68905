r"""Export of weights in the authors'/timm naming (export.py).

  python export.py --config.init.path=runs/demo --output demo.safetensors

`init.path`: a pre-training or fine-tuning workdir or step folder, or a
.safetensors/.pth/.pt/.bin/.npz weights file. `image_size` (square) sets the
resolution of the exported sin-cos `pos_embed` (default: the one trained
at); `model.num_heads` is only needed for encoder widths outside the ViT
table.
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.init = ml_collections.ConfigDict(dict(path=''))
  c.image_size = config_dict.placeholder(int)
  c.model = ml_collections.ConfigDict(dict(
      num_heads=config_dict.placeholder(int)))
  return c
