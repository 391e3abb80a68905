r"""Exports weights in the authors'/timm naming: your own runs, and any file
the reader takes (models/weights.py), to .safetensors, .pth or .npz.

  python export.py runs/demo demo.safetensors            # pre-training run
  python export.py runs/ft_b16/checkpoints/50000 ft_b16.pth  # one step
  python export.py DropPos_pretrain_vit_base.pth droppos_b16.safetensors
  python export.py droppos_b16.safetensors droppos_b16.npz

The source is a pre-training or fine-tuning workdir (newest readable complete
step), a step folder, or a .safetensors/.pth/.pt/.bin/.npz file; its kind
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

import argparse
import io
import json
import sys
from typing import Any, Mapping, Optional, Sequence

from etils import epath
import numpy as np

from droppos_jax.errors import UserError
from droppos_jax.models import convert, vit, weights

SUFFIXES = ('.safetensors', '.pth', '.pt', '.npz')


def state_dict(w: weights.Weights,
               image_hw: Optional[Sequence[int]] = None) -> dict[str, np.ndarray]:
  """The reference state dict of `w`, with the sin-cos `pos_embed` of
  `image_hw` (default: the size the weights were trained at)."""
  hw = image_hw or w.image_hw
  if hw is None:
    raise UserError(f'{w.source} does not tell its image size (no sin-cos '
                    'pos_embed, no metadata): pass --image_size.')
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
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def export(source: str, output: str, *, num_heads: Optional[int] = None,
           image_hw: Optional[Sequence[int]] = None) -> dict[str, Any]:
  """Reads `source`, writes `output`; returns {'weights', 'num_tensors'}."""
  _check_suffix(epath.Path(output))  # before reading a big checkpoint
  w = weights.read(source, what='source', num_heads=num_heads)
  w.check_fixed_pe()
  state = state_dict(w, image_hw)
  write(state, metadata(w, image_hw), output)
  return {'weights': w, 'num_tensors': len(state)}


def _image_size(text: str) -> tuple[int, int]:
  parts = text.replace('x', ',').split(',')
  if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
    raise argparse.ArgumentTypeError(
        f'image size must look like 224 or 224,160; got {text!r}')
  sizes = [int(p) for p in parts]
  return (sizes[0], sizes[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0].replace('\n', ' '),
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__.split('\n\n', 1)[1])
  p.add_argument('source', help='workdir, step folder or weights file '
                 '(local or gs://)')
  p.add_argument('output', help=f'file to write: {", ".join(SUFFIXES)}')
  p.add_argument('--num_heads', type=int, default=None,
                 help='encoder heads, for widths outside vit.VARIANTS')
  p.add_argument('--image_size', type=_image_size, default=None,
                 help='image size H[,W] of the exported pos_embed (default: '
                 'the size the weights were trained at)')
  args = p.parse_args(argv)
  try:
    out = export(args.source, args.output, num_heads=args.num_heads,
                 image_hw=args.image_size)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  w = out['weights']
  print(w.summary())
  print(f'wrote {out["num_tensors"]} tensors ({w.kind}) to {args.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
