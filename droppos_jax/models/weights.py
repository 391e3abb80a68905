"""The one reader of weights: every entry point that takes weights to start
from, evaluate or export calls `read`.

It accepts what a user may pass, local or gs://:
  - a pre-training or fine-tuning workdir, its checkpoints/ folder, or one
    step folder (Orbax): only complete steps, newest first; an unreadable one
    is skipped with a warning naming it and why (checkpoint.newest_readable);
  - a weights file in the PyTorch (authors'/MAE/timm) naming: .safetensors,
    a torch.save file (.pth/.pt/.bin; needs torch) or .npz. The format is read
    from the bytes, not the suffix; our exports (droppos_jax/export.py) carry
    kind, architecture and image size in their metadata, other files have
    them inferred from names and shapes (models/convert.py).

It returns `Weights`: the kind, the params in our naming (float32 host
arrays), the architecture, the image size, the mask token, and what was
dropped and why. Policy stays with the consumers, one rule for all:
  - a learned `pos_embed` is refused (`check_fixed_pe`): our ViT has only the
    fixed sin-cos table, so such weights would not compute what they learned;
  - the final norm: consumers that read features after the final LayerNorm
    (probes, pictures) get the file's `norm`, or a global-pool fine-tuned
    model's `fc_norm` in its place; global-pool fine-tuning drops `norm`
    (`encoder_params(final_norm=...)`).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import zipfile
from typing import Any, Mapping, Optional

from absl import logging
from etils import epath
import numpy as np

from droppos_jax import checkpoint
from droppos_jax.errors import UserError
from droppos_jax.models import architecture, convert
from droppos_jax.models import droppos as droppos_lib
from droppos_jax.models import vit

ACCEPTED = ('a pre-training or fine-tuning workdir (or its checkpoints/ or a '
            'step folder), or a .safetensors, .pth/.pt/.bin (PyTorch) or .npz '
            'weights file')
KIND_NAMES = {'droppos': 'DropPos pre-training checkpoint',
              'mae': 'MAE pre-training checkpoint',
              'classifier': 'fine-tuned classifier',
              'linear_probe': 'linear probe',
              'encoder': 'plain ViT encoder'}
# Our exports mark their metadata with this producer name; other metadata
# (e.g. a timm file's {'format': 'pt'}) is not trusted for kind/architecture.
PRODUCER = 'droppos_jax'


@dataclasses.dataclass(frozen=True)
class Weights:
  """What `read` found. `params` is the tree of `kind` in our naming:
  'droppos' {'encoder', 'mask_pos_token', 'projector'}, 'mae' {'encoder',
  'mask_token', 'decoder'}, 'classifier' {'encoder', 'fc_norm', 'head'} (timm-style: encoder with `norm`, no
  fc_norm), 'linear_probe' {'encoder', 'head'}, 'encoder' the ViT itself."""
  kind: str
  params: dict[str, Any]
  arch: architecture.Architecture
  image_hw: Optional[tuple[int, int]]   # trained at; None if unknown
  mask_pos_token: Optional[np.ndarray]  # [1, 1, D], DropPos only
  batch_stats: Optional[dict[str, Any]]  # linear probe: {'head_norm': ...}
  source: str                           # the path (and step) read
  step: Optional[int]
  workdir: Optional[epath.Path]         # the run folder of a checkpoint
  pos_embed: str                        # 'sincos'|'learned'|'absent'|'bad shape'
  dropped: tuple[str, ...]              # '<what>: <why>' of what was not read
  notes: tuple[str, ...]
  meta: dict[str, Any]                  # the run's meta, or the file metadata

  @property
  def grid(self) -> Optional[tuple[int, int]]:
    if self.image_hw is None:
      return None
    return vit.grid_size(self.image_hw, self.arch.patch_size)

  @property
  def description(self) -> str:
    a = self.arch
    size = a.variant or f'ViT width {a.width} depth {a.depth} patch {a.patch_size}'
    return f'{KIND_NAMES[self.kind]} {size} ({self.source})'

  def summary(self) -> str:
    hw = 'x'.join(map(str, self.image_hw)) if self.image_hw else 'unknown'
    lines = [f'{self.description}; image size {hw}.']
    lines += [f'  dropped {d}' for d in self.dropped]
    lines += [f'  note: {n}' for n in self.notes]
    return '\n'.join(lines)

  def check_fixed_pe(self) -> None:
    """The rule for every consumer: weights with a learned PE are refused."""
    if self.pos_embed == 'learned':
      raise UserError(
          f'{self.source} has a LEARNED pos_embed, but this ViT uses the fixed '
          '2-D sin-cos table: its features would not be the ones it learned. '
          'Only weights with sin-cos PE (DropPos, MAE, our runs) are accepted.')

  def encoder_params(self, *, final_norm: bool) -> dict[str, Any]:
    """The encoder tree, with or without its final `norm` (see the module
    docstring for the rule)."""
    encoder = dict(self.params if self.kind == 'encoder'
                   else self.params['encoder'])
    if final_norm and 'norm' not in encoder:
      if 'fc_norm' not in self.params:
        raise UserError(f'{self.source} has neither a final norm nor an '
                        'fc_norm: its token features cannot be normalised.')
      encoder['norm'] = self.params['fc_norm']
      logging.info('%s has no final norm (a global-pool fine-tuned model): '
                   'its fc_norm stands in for it.', self.source)
    elif not final_norm and 'norm' in encoder:
      del encoder['norm']
      logging.info('Dropped the final norm of %s: global pooling has its own '
                   'fc_norm (as MAE).', self.source)
    return encoder

  def vit(self, **kwargs: Any) -> vit.VisionTransformer:
    """The VisionTransformer these encoder params fit."""
    if self.arch.num_heads is None:
      raise UserError(
          f'{self.source}: width {self.arch.width} is not a width of '
          'vit.VARIANTS and weights do not store the number of heads: set '
          'model.num_heads.')
    return self.arch.vit(**kwargs)

  def droppos(self, **kwargs: Any) -> droppos_lib.DropPos:
    """The DropPos model these params fit (kind 'droppos' only)."""
    p = self.arch.projector
    if self.kind != 'droppos' or p is None:
      raise UserError(f'{self.source} is a {KIND_NAMES[self.kind]}: it has no '
                      'DropPos projector.')
    if p.width is not None and p.num_heads is None:
      raise UserError(f'{self.source}: projector width {p.width} is not in '
                      'droppos.PROJECTORS, so its number of heads is unknown.')
    self.vit()  # the encoder's heads are known
    return droppos_lib.build(self.arch, **kwargs)


def read(path: str | epath.Path, *, what: str = 'weights',
         num_heads: Optional[int] = None) -> Weights:
  """Reads the weights at `path` (see the module docstring).

  `what` names the setting in messages (e.g. 'init.path'); `num_heads`
  overrides the encoder's head count for widths outside vit.VARIANTS.
  Bad input raises a one-line UserError.
  """
  if num_heads is not None and not num_heads >= 1:
    raise UserError(f'num_heads={num_heads} must be >= 1 (or unset: from the '
                    'weights).')
  if not str(path) or not epath.Path(path).exists():
    raise UserError(f'{what} {str(path)!r} does not exist: expected {ACCEPTED}.')
  path = epath.Path(path)
  if path.is_dir():
    weights = _read_run(path, what, num_heads)
  else:
    weights = _read_file(path, what, num_heads)
  width = weights.arch.width
  if num_heads is not None and width % num_heads:
    raise UserError(f'num_heads={num_heads} does not divide the width {width} '
                    f'of {weights.source}; use a divisor of {width}.')
  logging.info('Read %s', weights.summary())
  return weights


# ------------------------------------------------------- Orbax checkpoints ---

def _read_run(path: epath.Path, what: str, num_heads) -> Weights:
  if (path / 'state').is_dir() or (path / 'meta').is_dir():  # one step
    if not (path / checkpoint.COMMIT_MARKER).exists():
      raise UserError(
          f'{what} {path} is a step folder whose save never finished (no '
          f'{checkpoint.COMMIT_MARKER}); pass its workdir to read the newest '
          'complete step.')
    try:
      return _from_step(path, num_heads)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # see newest_readable
      raise UserError(f'{what} {path} is unreadable '
                      f'({checkpoint.unreadable_reason(e)}).') from e
  folder = path / 'checkpoints' if (path / 'checkpoints').is_dir() else path
  steps = checkpoint.complete_steps(folder)
  unfinished = checkpoint.unfinished_steps(folder)
  if not steps:
    half = (f' (only step folders whose save never finished: '
            f'{", ".join(map(str, unfinished))})' if unfinished else '')
    raise UserError(f'{what} {path} holds no checkpoint{half}: expected '
                    f'{ACCEPTED}.')
  newer = [s for s in unfinished if s > steps[0]]
  if newer:
    logging.warning('Ignoring step folder(s) %s in %s: their save never '
                    'finished.', ', '.join(map(str, newer)), folder)
  _, weights = checkpoint.newest_readable(
      steps, lambda step: _from_step(folder / str(step), num_heads),
      where=str(folder))
  return weights


def _run_kind(params, meta) -> str:
  """The kind a run's meta declares, checked against its params tree."""
  protocol = meta.get('protocol')
  # Pre-training meta names its objective (older runs: DropPos's).
  kind = {None: meta.get('objective', 'droppos'), 'finetune': 'classifier',
          'linear_probe': 'linear_probe'}.get(protocol)
  needs = {'droppos': ('encoder', 'mask_pos_token', 'projector'),
           'mae': ('encoder', 'mask_token', 'decoder'),
           'classifier': ('encoder', 'fc_norm', 'head'),
           'linear_probe': ('encoder', 'head')}.get(kind)
  if needs is None or not set(needs) <= set(params):
    raise ValueError(f'meta (protocol {protocol!r}) does not match the saved '
                     f'params {sorted(params)}')
  return kind


def _legacy_architecture(params, kind: str, meta, num_heads):
  """The architecture of a checkpoint whose meta names only the config's
  model block: sizes from its params' shapes, checked against the block."""
  cfg = convert.flax_config(params, kind)
  variant = vit.decode_variant(meta['model']['variant'])
  if (variant.width, variant.depth, variant.patch_size) != (
      cfg['width'], cfg['depth'], cfg['patch_size']):
    raise ValueError(f'meta names variant {meta["model"]["variant"]!r} but the '
                     f'saved params have width {cfg["width"]}, depth '
                     f'{cfg["depth"]}, patch {cfg["patch_size"]}')
  projector = None
  if kind == 'droppos':
    named = droppos_lib.architecture_from_config(
        meta['model'], meta['image_hw']).projector
    projector = dataclasses.replace(
        named, width=cfg['projector']['width'],
        depth=cfg['projector']['depth'],
        num_positions=cfg['projector']['num_positions'])
  return architecture.Architecture(
      cfg['width'], cfg['depth'], cfg['mlp_dim'], num_heads or variant.num_heads,
      cfg['patch_size'], cfg['in_chans'], projector, cfg.get('num_classes'))


def _from_step(step_dir: epath.Path, num_heads) -> Weights:
  """Weights of one complete step; damage raises (newest_readable decides)."""
  tree, meta = checkpoint.read_step(step_dir)
  params = tree['params']
  kind = _run_kind(params, meta)
  for key in ('model', 'image_hw'):
    if key not in meta:
      raise ValueError(f'meta/metadata has no {key!r}')
  if 'architecture' in meta:
    arch = architecture.Architecture.from_dict(meta['architecture'])
    if num_heads:
      arch = dataclasses.replace(arch, num_heads=num_heads)
  else:  # saved before checkpoints kept their architecture
    arch = _legacy_architecture(params, kind, meta, num_heads)
  folder = step_dir.parent
  return Weights(
      kind=kind, params=params, arch=arch,
      image_hw=tuple(int(x) for x in meta['image_hw']),
      mask_pos_token=params.get('mask_pos_token'),
      batch_stats=tree.get('batch_stats'),
      source=f'{folder.parent if folder.name == "checkpoints" else folder} '
             f'step {step_dir.name}',
      step=int(step_dir.name) if step_dir.name.isdigit() else meta.get('step'),
      workdir=folder.parent if folder.name == 'checkpoints' else None,
      pos_embed='sincos', dropped=(), notes=(), meta=meta)


# ------------------------------------------------------------ weight files ---

def sniff(data: bytes) -> Optional[str]:
  """'safetensors', 'torch' (a torch.save zip or legacy pickle), 'npz' or
  None, from the first bytes of a file."""
  if data[:4] == b'PK\x03\x04':
    try:
      names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile:
      return None
    if any(n.endswith('/data.pkl') or n == 'data.pkl' for n in names):
      return 'torch'
    if names and all(n.endswith('.npy') for n in names):
      return 'npz'
    return None
  if data[:1] == b'\x80' and data[1:2] in (b'\x02', b'\x03', b'\x04', b'\x05'):
    return 'torch'  # torch.save's legacy format: pickles, magic number first
  if len(data) > 10 and data[8:9] == b'{':
    n = int.from_bytes(data[:8], 'little')
    if n <= len(data) - 8:
      return 'safetensors'
  return None


def _describe(data: bytes) -> str:
  if not data:
    return 'it is empty'
  if data[:4] == b'PK\x03\x04':
    try:
      zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
      return ('it is a truncated or damaged zip archive, the container '
              'of .pth and .npz files')
    return 'it is a zip archive of neither a PyTorch file nor .npy arrays'
  try:
    head = data[:24].decode('utf-8')
  except UnicodeDecodeError:
    return f'it starts with the bytes {data[:12]!r}'
  return f'it starts with {head!r}'


def _read_file(path: epath.Path, what: str, num_heads) -> Weights:
  data = path.read_bytes()
  fmt = sniff(data)
  if fmt is None:
    raise UserError(f'{what} {path} is not a weights file ({_describe(data)}); '
                    f'accepted: {ACCEPTED}.')
  obj, meta = {'safetensors': _load_safetensors, 'torch': _load_torch,
               'npz': _load_npz}[fmt](data, path)
  state = convert.unwrap_state_dict(obj, source=str(path))
  arch_meta = meta.get('architecture') or {}
  kind = meta.get('kind') or convert.guess_kind(state)
  image_hw = meta.get('image_hw')
  patch = arch_meta.get('patch_size')
  grid = (None if image_hw is None or patch is None
          else vit.grid_size(image_hw, patch))
  params, report = convert.torch_to_flax(
      state, kind=kind, num_heads=num_heads or arch_meta.get('num_heads'),
      grid_hw=grid, projector_num_heads=(
          arch_meta.get('projector') or arch_meta.get('decoder') or {}).get(
              'num_heads'))
  cfg = report.config
  if cfg['grid'] is not None and image_hw is None:
    image_hw = tuple(g * cfg['patch_size'] for g in cfg['grid'])
  p = cfg.get('projector') if kind == 'droppos' else None
  dec = cfg.get('decoder') if kind == 'mae' else None
  arch = architecture.Architecture(
      cfg['width'], cfg['depth'], cfg['mlp_dim'], cfg['num_heads'],
      cfg['patch_size'], cfg['in_chans'],
      architecture.ProjectorSize(**p) if p else None, cfg.get('num_classes'),
      architecture.DecoderSize(**dec) if dec else None)
  batch_stats = None
  if kind == 'linear_probe':
    batch_stats = {'head_norm': params.pop('head_norm')}
  dropped = []
  if cfg['pos_embed'] == 'learned':
    dropped.append('pos_embed: a LEARNED table (our ViT uses the fixed '
                   'sin-cos table)')
  elif cfg['pos_embed'] == 'bad shape':
    dropped.append('pos_embed: not of shape [1, 1+N, D]')
  if report.unused:
    dropped.append(f'{len(report.unused)} tensors that kind {kind!r} does not '
                   f'use: {", ".join(report.unused)}')
  return Weights(
      kind=kind, params=params, arch=arch,
      image_hw=None if image_hw is None else tuple(int(x) for x in image_hw),
      mask_pos_token=params.get('mask_pos_token'), batch_stats=batch_stats,
      source=str(path), step=meta.get('step'), workdir=None,
      pos_embed=cfg['pos_embed'], dropped=tuple(dropped),
      notes=tuple(report.warnings + report.notes), meta=meta)


def _our_metadata(raw: Any) -> dict[str, Any]:
  """Our export metadata (string values, JSON where structured), parsed;
  {} for anything else."""
  if not isinstance(raw, Mapping) or raw.get('producer') != PRODUCER:
    return {}
  out = dict(raw)
  for key in ('architecture', 'image_hw', 'step'):
    if isinstance(out.get(key), str):
      out[key] = json.loads(out[key])
  if out.get('kind') not in convert.KINDS:
    out.pop('kind', None)
  return out


def _load_safetensors(data: bytes, path):
  try:
    from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError(f'Reading {path} needs `pip install safetensors`.') from None
  try:
    tensors = load(data)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], 'little')])
  except Exception as e:  # pylint: disable=broad-except  # a damaged file
    raise UserError(f'{path} is not a readable .safetensors file, truncated '
                    f'or damaged ({checkpoint.unreadable_reason(e)}).') from None
  return tensors, _our_metadata(header.get('__metadata__'))


def _load_npz(data: bytes, path):
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except Exception as e:  # pylint: disable=broad-except  # a damaged file
    raise UserError(f'{path} is not a readable .npz archive '
                    f'({checkpoint.unreadable_reason(e)}).') from None
  raw = arrays.pop('__metadata__', None)
  return arrays, _our_metadata(None if raw is None else json.loads(str(raw)))


def _load_torch(data: bytes, path):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError(
        f'{path} is a PyTorch file: reading it needs PyTorch (`pip install '
        'torch`), or convert it where torch is installed: `python export.py '
        f'--config.init.path={path.name} --output={path.stem}.safetensors`.'
    ) from None
  try:
    # MAE-style files pickle the training args; a Namespace is plain data.
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # unpickling failed
    raise UserError(
        f'{path} is a PyTorch file that torch.load(weights_only=True) cannot '
        f'read ({checkpoint.unreadable_reason(e)}). If it holds other pickled '
        'objects and you trust it, re-save just its state dict with '
        'torch.save.') from None
  meta = _our_metadata(obj.get('metadata')) if isinstance(obj, Mapping) else {}
  return obj, meta
