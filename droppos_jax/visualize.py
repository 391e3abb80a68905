r"""Pictures of a DropPos checkpoint's position predictions.

  python visualize.py --checkpoint runs/demo --output runs/demo/positions.png
  python visualize.py --checkpoint runs/demo --output val.png --num_images 6 \
      --data.source=folder --data.path=/data/images

Per image: the input, the visible patches, the PE-dropped patches at their
true and at their predicted positions (errors outlined red) and the attentive
weights. Images come from the demo 'val' split unless --data says otherwise.
"""
from __future__ import annotations

import sys

from absl import app, flags
import jax
import ml_collections
from ml_collections import config_dict, config_flags

from droppos_jax import pictures

flags.DEFINE_string('checkpoint', None, 'DropPos pre-training workdir (or its '
                    'checkpoints/ or a step folder), or a DropPos weights file.')
flags.DEFINE_string('output', None, 'PNG file to write.')
flags.DEFINE_integer('num_images', 4, 'Images (rows) to show.')
flags.DEFINE_integer('seed', 0, 'Key of the masks.')
flags.DEFINE_float('mask_ratio', None, 'Default: the run\'s config.json, else 0.75.')
flags.DEFINE_float('pos_drop_ratio', None,
                   'Default: the run\'s config.json, else 0.75.')
_UNSET = config_dict.placeholder  # None, but overridable from the command line
config_flags.DEFINE_config_dict('data', ml_collections.ConfigDict(dict(
    source='demo', name=_UNSET(str), data_dir=_UNSET(str), split='val',
    path=_UNSET(str))), 'Image source, as data in a train config.')


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.checkpoint or not f.output:
    sys.exit('error: --checkpoint and --output are required.')
  if f.num_images < 1:
    sys.exit(f'error: --num_images={f.num_images} must be >= 1.')
  try:
    out = pictures.visualize_checkpoint(
        f.checkpoint, f.output, data_cfg=f.data, num_images=f.num_images,
        seed=f.seed, mask_ratio=f.mask_ratio, pos_drop_ratio=f.pos_drop_ratio)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  print(f'wrote {out["path"]} (step {out["step"]}, {100 * out["acc"]:.1f}% of '
        'PE-dropped patches placed right)')


def run():
  jax.config.update('jax_threefry_partitionable', True)
  app.run(main)


if __name__ == '__main__':
  run()
