"""Converts checkpoints between the PyTorch reference layout and our Flax params.

  # authors' DropPos / MAE / timm file -> Flax params (msgpack) + <stem>.json
  python convert_checkpoint.py --input droppos_vit_base.pth \
      --output droppos_b16.msgpack --kind droppos
  # and back; the grid comes from the .json sidecar unless --grid is given
  python convert_checkpoint.py --direction flax2torch --kind droppos \
      --input droppos_b16.msgpack --output droppos_b16.pth

Flax files are `flax.serialization.msgpack_serialize` of the params tree (load
with `convert.load_flax_params` or `msgpack_restore`); the sidecar holds the
kind, the inferred architecture and the conversion report. torch2flax prints
the report (unused tensors, learned-PE warnings); missing tensors or wrong
shapes are errors unless --no-strict. --variant checks the result against one
of our model sizes (e.g. S/16) before writing.
"""
from __future__ import annotations

import argparse
import sys

from droppos_jax.models import convert
from droppos_jax.models import vit


def _grid(text):
  parts = text.replace('x', ',').split(',')
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    raise argparse.ArgumentTypeError(f'grid must look like 14,14 or 14x14; got {text!r}')
  return tuple(int(p) for p in parts)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--input', required=True)
  p.add_argument('--output', required=True)
  p.add_argument('--kind', required=True, choices=convert.KINDS)
  p.add_argument('--direction', default='torch2flax',
                 choices=('torch2flax', 'flax2torch'))
  p.add_argument('--num_heads', type=int, default=None,
                 help='encoder heads (not stored in weights; default by width)')
  p.add_argument('--projector_num_heads', type=int, default=None)
  p.add_argument('--grid', type=_grid, default=None,
                 help='patch grid h,w (default: from pos_embed / the sidecar)')
  p.add_argument('--variant', default=None,
                 help='torch2flax: fail unless the encoder fits this size, e.g. B/16')
  p.add_argument('--strict', action=argparse.BooleanOptionalAction, default=True,
                 help='fail on missing tensors or wrong shapes')
  return p.parse_args(argv)


def _variant_config(variant, config):
  """The file's config with the encoder size replaced by `variant`'s."""
  size = vit.decode_variant(variant)
  return dict(config, width=size.width, depth=size.depth, mlp_dim=size.mlp_dim,
              num_heads=size.num_heads, patch_size=size.patch_size)


def torch2flax(args):
  state = convert.load_torch_state_dict(args.input)
  params, report = convert.torch_to_flax(
      state, kind=args.kind, num_heads=args.num_heads, grid_hw=args.grid,
      projector_num_heads=args.projector_num_heads, strict=args.strict)
  print(report)
  if args.variant:
    convert.check_compatible(params, convert.abstract_params(
        args.kind, _variant_config(args.variant, report.config)))
  convert.save_flax_params(params, args.output, metadata={
      'kind': args.kind, 'source': str(args.input), 'config': report.config,
      'report': str(report)})
  print(f'wrote {args.output}')


def flax2torch(args):
  params, meta = convert.load_flax_params(args.input)
  grid = args.grid or (meta or {}).get('config', {}).get('grid')
  if grid is None:
    raise ValueError(f'No patch grid for {args.input}: pass --grid h,w.')
  if meta and meta.get('kind') not in (None, args.kind):
    raise ValueError(f'{args.input} holds kind {meta["kind"]!r}, not {args.kind!r}.')
  state = convert.flax_to_torch(params, kind=args.kind, grid_hw=grid)
  convert.save_torch_state_dict(state, args.output)
  print(f'wrote {len(state)} tensors to {args.output}')


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    (torch2flax if args.direction == 'torch2flax' else flax2torch)(args)
  except (ValueError, ImportError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
