r"""Pictures of a DropPos checkpoint's position predictions.

  python visualize.py --config.init.path=runs/demo --output runs/demo/droppos.png

Per image: the input, the visible patches, the PE-dropped patches at their
true and at their predicted positions (errors outlined red) and the attentive
weights. Fields: configs/visualize.py (the default --config).
"""
from __future__ import annotations

from droppos_jax import launch, pictures
from droppos_jax.errors import UserError

MAX_IMAGES = 64  # rows of one picture


def visualize(config, output: str) -> dict:
  if not config.init.path:
    raise UserError('--config.init.path is required: a DropPos pre-training '
                    'workdir, one of its step folders or a DropPos weights file.')
  if config.num_images < 1:
    raise UserError(f'num_images={config.num_images} must be >= 1.')
  if config.num_images > MAX_IMAGES:
    raise UserError(f'num_images={config.num_images}: at most {MAX_IMAGES} '
                    'images fit one picture.')
  out = pictures.visualize_checkpoint(
      config.init.path, output, data_cfg=config.data,
      num_images=config.num_images, seed=config.seed,
      masking_cfg=config.masking.to_dict())
  print(f'wrote {out["path"]} (step {out["step"]}, {out["data"]}: '
        f'{100 * out["acc"]:.1f}% of PE-dropped patches placed right)')
  return out


def main():
  launch.run(visualize, config_kind='visualize', output='output',
             output_help='PNG file to write (local or gs://).',
             default_config=launch.packaged_configs()['visualize'])


if __name__ == '__main__':
  main()
