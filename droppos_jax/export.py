r"""Exports weights in the authors'/timm naming: your own runs, and any file
the reader takes (models/weights.py), to .safetensors, .pth or .npz.

  python export.py --config.init.path=runs/demo --output demo.safetensors
  python export.py --config.init.path=runs/ft_b16/checkpoints/50000 \
      --output ft_b16.pth                                    # one step
  python export.py --config.init.path=DropPos_pretrain_vit_base.pth \
      --output droppos_b16.safetensors                       # authors' file

The source (`init.path`, as for every command that reads weights) is a
pre-training or fine-tuning workdir (newest readable complete step), a step
folder, or a .safetensors/.pth/.pt/.bin/.npz file; its kind
(DropPos, fine-tuned classifier, linear probe, plain encoder) is read, not
asked. The output format follows the suffix: .safetensors (metadata in its
header), .pth/.pt (`{'model': state_dict, 'metadata': ...}`; needs torch) or
.npz (metadata in a `__metadata__` entry). The metadata names the kind, the
architecture (incl. the head counts weights cannot tell), the image size, the
source and step, so reading the export back restores all of it; timm/the
authors' models load the state dict as is (`pos_embed` is the fixed sin-cos
table for the image size). Any of these files also initialises fine-tuning
and the probes directly: exporting is the way back too.
"""
from __future__ import annotations

import io
import json
from typing import Any, Mapping, Optional, Sequence

from etils import epath
import numpy as np

from droppos_jax import launch, settings
from droppos_jax.errors import UserError, writing
from droppos_jax.models import convert, vit, weights

SUFFIXES = ('.safetensors', '.pth', '.pt', '.npz')


def state_dict(w: weights.Weights,
               image_hw: Optional[Sequence[int]] = None) -> dict[str, np.ndarray]:
  """The reference state dict of `w`, with the sin-cos `pos_embed` of
  `image_hw` (default: the size the weights were trained at)."""
  hw = image_hw or w.image_hw
  if hw is None:
    raise UserError(f'{w.source} does not tell its image size (no sin-cos '
                    'pos_embed, no metadata): set --config.image_size.')
  tree = dict(w.params)
  if w.kind == 'linear_probe':
    tree.update(w.batch_stats)
  return convert.flax_to_torch(
      tree, kind=w.kind, grid_hw=vit.grid_size(hw, w.arch.patch_size))


def metadata(w: weights.Weights,
             image_hw: Optional[Sequence[int]] = None) -> dict[str, str]:
  """String metadata (safetensors headers hold only strings; JSON inside)."""
  return {'producer': weights.PRODUCER, 'format': 'pt', 'kind': w.kind,
          'architecture': json.dumps(w.arch.to_dict()),
          'image_hw': json.dumps(list(image_hw or w.image_hw)),
          'source': w.source, 'step': json.dumps(w.step)}


def _check_suffix(path: epath.Path) -> str:
  suffix = path.suffix.lower()
  if suffix not in SUFFIXES:
    raise UserError(f'Unknown output format {path.name!r}: the name must end '
                    f'in {", ".join(SUFFIXES)}.')
  if suffix in ('.pth', '.pt'):
    _torch(path)
  return suffix


def _torch(path):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError(f'Writing {path.name} needs PyTorch (`pip install torch`); '
                    'write .safetensors or .npz instead.') from None
  return torch


def write(state: Mapping[str, np.ndarray], meta: Mapping[str, str],
          path: str | epath.Path) -> None:
  """Writes `state` and `meta` in the format of `path`'s suffix."""
  path = epath.Path(path)
  suffix = _check_suffix(path)
  arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
  if suffix == '.safetensors':
    try:
      from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise UserError(f'Writing {path.name} needs `pip install safetensors`; '
                      'write .npz instead.') from None
    data = save(arrays, metadata=dict(meta))
  else:
    buffer = io.BytesIO()
    if suffix == '.npz':
      np.savez(buffer, **arrays, __metadata__=np.array(json.dumps(dict(meta))))
    else:
      torch = _torch(path)
      torch.save({'model': {k: torch.tensor(v) for k, v in arrays.items()},
                  'metadata': dict(meta)}, buffer)
    data = buffer.getvalue()
  with writing(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def export(source: str, output: str, *, num_heads: Optional[int] = None,
           image_hw: Optional[Sequence[int]] = None) -> dict[str, Any]:
  """Reads `source`, writes `output`; returns {'weights', 'num_tensors'}."""
  _check_suffix(epath.Path(output))  # before reading a big checkpoint
  w = weights.read(source, what='init.path', num_heads=num_heads)
  w.check_fixed_pe()
  state = state_dict(w, image_hw)
  write(state, metadata(w, image_hw), output)
  return {'weights': w, 'num_tensors': len(state)}


def run(config, output: str) -> dict[str, Any]:
  """The command: exports `config.init.path` to `output`."""
  if not config.init.path:
    raise UserError('--config.init.path is required: the workdir, step folder '
                    'or weights file to export.')
  image_hw = None if config.image_size is None else settings.image_hw(config.image_size)
  out = export(config.init.path, output, num_heads=config.model.num_heads,
               image_hw=image_hw)
  w = out['weights']
  print(w.summary())
  print(f'wrote {out["num_tensors"]} tensors ({w.kind}) to {output}')
  return out


def main():
  launch.run(run, config_kind='export', output='output',
             output_help=f'File to write: {", ".join(SUFFIXES)} (local or '
             'gs://).',
             default_config=launch.packaged_configs()['export'])


if __name__ == '__main__':
  main()
