"""Name mapping between PyTorch ViT/DropPos state dicts and our Flax params.

Reference names (timm/MAE, and the authors' DropPos repository Haochen-Wang409/DropPos) map one-to-one onto ours:
`patch_embed.proj` -> `patch_embed`, `blocks.{i}.*` -> `blocks_{i}/*`,
`decoder_embed|decoder_blocks.{i}|decoder_norm|decoder_pred` ->
`projector/{embed,blocks_{i},norm,pred}`. Linear weights are transposed, the
patch conv goes [D, C, p, p] -> [p, p, C, D], LayerNorm `weight` is `scale`.
`pos_embed` is no parameter here (we use the fixed sin-cos table): it is checked
against `posemb_sincos_2d` and used to find the patch grid; a learned one is
reported loudly and dropped.

Layouts (`kind`): 'encoder' (VisionTransformer params), 'droppos' (DropPos:
`encoder`, `mask_pos_token`, `projector`), 'mae' (MAE pre-training:
`encoder`, `mask_token`, `decoder`; MAE's `decoder_pos_embed` is its fixed
sin-cos table, checked and regenerated like `pos_embed`), 'classifier' (fine-tuned:
`{'encoder', 'fc_norm', 'head'}`; MAE's global-pool model has no final `norm`)
and 'linear_probe' (MAE's linear probe: `encoder` with its final norm, the
BatchNorm statistics `head_norm/{mean,var}` <-> `head.0.running_{mean,var}`
and `head` <-> `head.1`).

Reading and writing files is `weights.py`'s job; this module maps names and
infers the architecture from shapes.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from droppos_jax.errors import UserError
from droppos_jax.models import architecture
from droppos_jax.models import droppos as droppos_lib
from droppos_jax.models import mae as mae_lib
from droppos_jax.models import vit

KINDS = ('encoder', 'droppos', 'mae', 'classifier', 'linear_probe')
_CONTAINER_KEYS = ('model', 'state_dict', 'module')
_HEADS_BY_WIDTH = {v[0]: v[3] for v in vit.VARIANTS.values()}
_PROJECTOR_HEADS_BY_WIDTH = {v[0]: v[2] for v in droppos_lib.PROJECTORS.values()}


# ------------------------------------------------------------- state dicts ---

def unwrap_state_dict(obj: Any, *, source: str = 'state dict') -> dict[str, np.ndarray]:
  """Container -> flat name -> numpy array, `module.` prefixes stripped."""
  while isinstance(obj, Mapping):
    inner = next((obj[k] for k in _CONTAINER_KEYS
                  if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      break
    obj = inner
  if not isinstance(obj, Mapping) or not obj:
    raise UserError(
        f'{source} is not a checkpoint: expected a non-empty state dict '
        f'(name -> tensor), optionally under {list(_CONTAINER_KEYS)}; got '
        f'{type(obj).__name__}.')
  bad = [str(k) for k, v in obj.items() if not hasattr(v, 'shape')]
  if bad:
    raise UserError(
        f'{source} is not a checkpoint state dict: entries {bad[:5]} are not '
        f'tensors (keys found: {sorted(map(str, obj))[:10]}).')
  return {re.sub(r'^(module\.)+', '', k): _to_numpy(v) for k, v in obj.items()}


def _to_numpy(x) -> np.ndarray:
  if hasattr(x, 'detach'):  # a torch tensor; torch has no numpy bfloat16 view
    x = x.detach().cpu()
    if str(x.dtype) == 'torch.bfloat16':
      return x.float().numpy().astype(ml_dtypes.bfloat16)
    return x.numpy()
  return np.asarray(x)


def guess_kind(state_dict: Mapping[str, Any]) -> str:
  """The layout of a cleaned reference state dict, read from its names.

  DropPos files have `mask_pos_token`, MAE pre-training files `mask_token`;
  MAE's linear probe wraps its head as `head.0` (BatchNorm) + `head.1`; a
  `head` alone is a fine-tuned model.
  """
  if 'mask_pos_token' in state_dict:
    return 'droppos'
  if 'mask_token' in state_dict:
    return 'mae'
  if 'head.1.weight' in state_dict:
    return 'linear_probe'
  if 'head.weight' in state_dict:
    return 'classifier'
  return 'encoder'


# ------------------------------------------------------------- name layout ---

@dataclasses.dataclass(frozen=True)
class _Leaf:
  torch_key: str
  flax_path: tuple[str, ...]
  op: str  # 'copy', 'linear' (transpose) or 'conv' ([D,C,p,p] <-> [p,p,C,D])
  torch_shape: tuple[int, ...] | None  # None: unknown, not checked


_TO_FLAX = {'copy': lambda a: a, 'linear': lambda a: a.T,
            'conv': lambda a: a.transpose(2, 3, 1, 0)}
_TO_TORCH = {'copy': lambda a: a, 'linear': lambda a: a.T,
             'conv': lambda a: a.transpose(3, 2, 0, 1)}


def _dense(tk, fp, n_in, n_out):
  return [_Leaf(f'{tk}.weight', fp + ('kernel',), 'linear', (n_out, n_in)),
          _Leaf(f'{tk}.bias', fp + ('bias',), 'copy', (n_out,))]


def _norm(tk, fp, d):
  return [_Leaf(f'{tk}.weight', fp + ('scale',), 'copy', (d,)),
          _Leaf(f'{tk}.bias', fp + ('bias',), 'copy', (d,))]


def _block(tk, fp, d, mlp):
  return (_norm(f'{tk}.norm1', fp + ('norm1',), d)
          + _dense(f'{tk}.attn.qkv', fp + ('attn', 'qkv'), d,
                   None if d is None else 3 * d)
          + _dense(f'{tk}.attn.proj', fp + ('attn', 'proj'), d, d)
          + _norm(f'{tk}.norm2', fp + ('norm2',), d)
          + _dense(f'{tk}.mlp.fc1', fp + ('mlp', 'fc1'), d, mlp)
          + _dense(f'{tk}.mlp.fc2', fp + ('mlp', 'fc2'), mlp, d))


_FLAX_TO_TORCH_LEAF = {'kernel': ('weight', 'linear'), 'scale': ('weight', 'copy'),
                       'bias': ('bias', 'copy')}


def _decoder_leaves(shapes: Mapping[tuple[str, ...], Any]) -> list[_Leaf]:
  """The leaves of a head whose Flax params `shapes` (path -> shape or None)
  sit under one root, in the reference's decoder naming, whatever the head:
  `<root>/<sub>/...` <-> `decoder_<sub>....`, `blocks_{i}` <-> `blocks.{i}`,
  a Dense kernel transposed to `weight`, a LayerNorm scale to `weight`."""
  out = []
  for path, shape in shapes.items():
    name, op = _FLAX_TO_TORCH_LEAF[path[-1]]
    modules = [re.sub(r'^blocks_(\d+)$', r'blocks.\1', m) for m in path[1:-1]]
    out.append(_Leaf('decoder_' + '.'.join(modules + [name]), tuple(path), op,
                     None if shape is None else tuple(
                         reversed(shape) if op == 'linear' else shape)))
  return out


def _position_head_shapes(proj: Mapping[str, Any], width_in: int):
  """Flax path -> shape of the position head `proj` (a ProjectorSize dict)
  on `width_in`-wide tokens; shapes None where its position count is
  unknown. Heads do not change shapes, so an unknown count is 1 here."""
  size = architecture.ProjectorSize(**dict(proj,
                                           num_heads=proj.get('num_heads') or 1))
  n = size.num_positions
  head = droppos_lib.position_head(size)
  tree = jax.eval_shape(lambda: head.init(
      jax.random.key(0), jnp.zeros((1, 2, width_in)), n or 1))['params']
  return {('projector',) + k: None if n is None else tuple(v.shape)
          for k, v in _flatten(tree).items()}


def _pixel_decoder_shapes(dec: Mapping[str, Any], width_in: int, pixels: int):
  """Flax path -> shape of MAE's decoder `dec` ({width, depth, num_heads})
  on `width_in`-wide tokens predicting `pixels` values per patch."""
  module = mae_lib.PixelDecoder(dec['width'], dec['depth'],
                                dec.get('num_heads') or 1)
  tree = jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, 2, width_in)), jnp.zeros((1, 1), int),
      jnp.zeros((1, 1, dec['width'])), (1, 1), pixels))['params']
  return {('decoder',) + k: tuple(v.shape) for k, v in _flatten(tree).items()}


def _position_head(found: set[str], width_in: int, sizes: Mapping[str, Any]):
  """The ProjectorSize dict of the registered position head whose tensors
  are exactly the `decoder_*` names `found`, at the `sizes` read from them
  (the first head that accepts them if none matches: the report lists what
  differs)."""
  fallback = None
  for head in droppos_lib.POSITION_HEADS:
    proj = dict(sizes, head=head)
    try:
      keys = {l.torch_key for l in _decoder_leaves(
          _position_head_shapes(proj, width_in))}
    except UserError:  # this head takes no such sizes
      continue
    if keys == found:
      return proj
    fallback = fallback or proj
  return fallback


def _leaves(kind: str, cfg: Mapping[str, Any]) -> list[_Leaf]:
  """Every tensor of `kind` for architecture `cfg`, with expected shapes."""
  d, mlp, p, c = cfg['width'], cfg['mlp_dim'], cfg['patch_size'], cfg['in_chans']
  enc = () if kind == 'encoder' else ('encoder',)
  out = [_Leaf('patch_embed.proj.weight', enc + ('patch_embed', 'kernel'), 'conv',
               (d, c, p, p)),
         _Leaf('patch_embed.proj.bias', enc + ('patch_embed', 'bias'), 'copy', (d,)),
         _Leaf('cls_token', enc + ('cls_token',), 'copy', (1, 1, d))]
  for i in range(cfg['depth']):
    out += _block(f'blocks.{i}', enc + (f'blocks_{i}',), d, mlp)
  if kind != 'classifier' or cfg['final_norm']:
    out += _norm('norm', enc + ('norm',), d)
  if kind == 'droppos':
    out.append(_Leaf('mask_pos_token', ('mask_pos_token',), 'copy', (1, 1, d)))
    if cfg.get('projector'):
      out += _decoder_leaves(_position_head_shapes(cfg['projector'], d))
  if kind == 'mae' and cfg.get('decoder'):
    dec = cfg['decoder']
    out.append(_Leaf('mask_token', ('mask_token',), 'copy',
                     (1, 1, dec['width'])))
    out += _decoder_leaves(_pixel_decoder_shapes(dec, d, p * p * c))
  if kind == 'classifier':
    if cfg['fc_norm'] or not cfg['final_norm']:
      out += _norm('fc_norm', ('fc_norm',), d)
    out += _dense('head', ('head',), d, cfg.get('num_classes'))
  if kind == 'linear_probe':  # BatchNorm1d(affine=False) then Linear
    out += [_Leaf('head.0.running_mean', ('head_norm', 'mean'), 'copy', (d,)),
            _Leaf('head.0.running_var', ('head_norm', 'var'), 'copy', (d,))]
    out += _dense('head.1', ('head',), d, cfg.get('num_classes'))
  # Unknown sizes (None) switch the shape check off for that tensor.
  return [dataclasses.replace(l, torch_shape=None)
          if l.torch_shape is None or None in l.torch_shape else l for l in out]


# ------------------------------------------------------ architecture guess ---

def _block_ids(keys, prefix):
  ids = {int(m.group(1)) for k in keys
         if (m := re.match(re.escape(prefix) + r'\.(\d+)\.', k))}
  return max(ids) + 1 if ids else 0


def _first_shape(sd, pattern, depth):
  """Output size of the first 2-D `pattern.format(i)` weight, if any."""
  for i in range(depth):
    a = sd.get(pattern.format(i))
    if a is not None and a.ndim == 2:
      return int(a.shape[0])
  return None


def _match_sincos(table: np.ndarray, tol: float):
  """(h, w) whose sin-cos table equals `table` [N, D] within tol, or None."""
  n, d = table.shape
  if d % 4 or n == 0:
    return None
  for h in range(1, n + 1):
    if n % h == 0:
      ref = vit.posemb_sincos_2d(h, n // h, d)
      if np.allclose(table, ref, rtol=0, atol=tol):
        return h, n // h
  return None


def _analyse_pos_embed(sd, width, grid_hw, dtypes):
  """(grid, status, cls_row, warnings) from `pos_embed`, if there is one."""
  pe = sd.get('pos_embed')
  if pe is None:
    return grid_hw, 'absent', None, []
  if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != width or pe.shape[1] < 2:
    return grid_hw, 'bad shape', None, [
        f'pos_embed has shape {tuple(pe.shape)}, expected [1, 1+N, {width}]; '
        'it is dropped.']
  table, cls_row = pe[0, 1:], pe[0, 0]
  n = table.shape[0]
  if grid_hw is not None and grid_hw[0] * grid_hw[1] != n:
    raise UserError(f'grid_hw {tuple(grid_hw)} has {grid_hw[0] * grid_hw[1]} '
                    f'patches but pos_embed has {n} patch rows (plus [cls]).')
  # Rounding of the stored dtype bounds how well a sin-cos table can match.
  tol = max(1e-4, float(ml_dtypes.finfo(dtypes.get('pos_embed', np.float32)).eps))
  if grid_hw is not None:
    ref = vit.posemb_sincos_2d(*grid_hw, width)
    found = tuple(grid_hw) if (width % 4 == 0 and np.allclose(
        table, ref, rtol=0, atol=tol)) else None
  else:
    found = _match_sincos(table, tol)
  warnings = []
  if np.any(cls_row != 0):
    warnings.append(
        'pos_embed has a non-zero [cls] row; it is folded into cls_token '
        '(exactly equivalent, since that row is only ever added to [cls]).')
  if found is not None:
    return found, 'sincos', cls_row, warnings
  side = math.isqrt(n)
  grid = tuple(grid_hw) if grid_hw is not None else (
      (side, side) if side * side == n else None)
  warnings.append(
      f'!!! pos_embed is LEARNED (differs from the fixed 2-D sin-cos table by '
      f'more than {tol:g}): '
      'our ViT always uses fixed sin-cos PE, so it is DROPPED and the Flax '
      'model will NOT reproduce the PyTorch outputs without further training.')
  return grid, 'learned', cls_row, warnings


def _infer(sd, num_heads=None, grid_hw=None, projector_num_heads=None,
           dtypes=None):
  """(config, cls_row, warnings, notes) for a cleaned state dict."""
  w = sd.get('patch_embed.proj.weight')
  if w is None or w.ndim != 4:
    raise UserError(
        'Not a ViT checkpoint: it has no 4-D patch_embed.proj.weight '
        f'(first keys: {sorted(sd)[:8]}).')
  width, in_chans, patch = (int(s) for s in w.shape[:3])
  depth = _block_ids(sd, 'blocks')
  mlp_dim = _first_shape(sd, 'blocks.{}.mlp.fc1.weight', depth) or 4 * width
  notes = []
  if num_heads is None:
    num_heads = _HEADS_BY_WIDTH.get(width)
    if num_heads is None:
      notes.append(f'num_heads cannot be read from weights and width {width} is '
                   'not in vit.VARIANTS: pass num_heads to build the model.')
  if grid_hw is not None:
    grid_hw = tuple(int(g) for g in grid_hw)
  grid, pe_status, cls_row, warnings = _analyse_pos_embed(
      sd, width, grid_hw, dtypes or {})
  cfg = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
             patch_size=patch, grid=grid, in_chans=in_chans, pos_embed=pe_status,
             final_norm='norm.weight' in sd or 'norm.bias' in sd,
             fc_norm='fc_norm.weight' in sd or 'fc_norm.bias' in sd)
  for head in ('head.weight', 'head.1.weight'):
    if head in sd and sd[head].ndim == 2:
      cfg['num_classes'] = int(sd[head].shape[0])
  if any(k.startswith('decoder_') for k in sd):
    grid = _infer_decoder(sd, cfg, projector_num_heads, warnings, notes)
  if grid is None:
    notes.append('Patch grid unknown (no sin-cos pos_embed): pass grid_hw to '
                 'export this model back to PyTorch.')
  return cfg, cls_row, warnings, notes


def _infer_decoder(sd, cfg, num_heads, warnings, notes):
  """Adds the decoder of a pre-training file to `cfg`: MAE's pixel decoder
  ('decoder', with `mask_token`) or DropPos's position head ('projector');
  returns the grid, which a square position count may tell."""
  width, grid = cfg['width'], cfg['grid']
  depth = _block_ids(sd, 'decoder_blocks')
  emb = sd.get('decoder_embed.weight')
  dwidth = int(emb.shape[0]) if emb is not None and emb.ndim == 2 else (
      _first_shape(sd, 'decoder_blocks.{}.attn.proj.weight', depth))
  heads = num_heads or _PROJECTOR_HEADS_BY_WIDTH.get(dwidth)
  if heads is None and dwidth is not None:
    notes.append(f'decoder num_heads unknown for width {dwidth}: pass '
                 'projector_num_heads to build the model.')
  if 'mask_token' in sd:
    cfg['decoder'] = dict(width=dwidth, depth=depth, num_heads=heads)
    pe = sd.get('decoder_pos_embed')
    if pe is not None and grid is not None and dwidth and dwidth % 4 == 0 and (
        pe.shape != (1, 1 + grid[0] * grid[1], dwidth) or not np.allclose(
            pe[0], _pos_embed(grid, dwidth)[0], rtol=0, atol=1e-4)):
      warnings.append('decoder_pos_embed is not the fixed 2-D sin-cos table '
                      'MAE uses: it is dropped (ours is always sin-cos).')
    return grid
  pred = sd.get('decoder_pred.weight')
  n = grid[0] * grid[1] if grid else (
      int(pred.shape[0]) if pred is not None and pred.ndim == 2 else None)
  cfg['projector'] = _position_head(
      {k for k in sd if k.startswith('decoder_')}, width, dict(
          width=dwidth, depth=depth, num_heads=heads, num_positions=n))
  if grid is None and n is not None and math.isqrt(n) ** 2 == n:
    cfg['grid'] = grid = (math.isqrt(n),) * 2
  return grid


def _pos_embed(grid, width) -> np.ndarray:
  """[1, 1+h*w, width]: the sin-cos table with a zero [cls] row, as MAE
  stores `pos_embed` and `decoder_pos_embed`."""
  return np.concatenate([np.zeros((1, width), np.float32),
                         vit.posemb_sincos_2d(*grid, width)])[None]


def infer_vit_config(state_dict: Mapping[str, Any], *, num_heads: int | None = None,
                     grid_hw=None, projector_num_heads: int | None = None
                     ) -> dict[str, Any]:
  """Architecture of a reference state dict.

  Returns width, depth, mlp_dim, num_heads (weights cannot tell it: the
  argument, else vit.VARIANTS by width, else None), patch_size, grid (h, w)
  (from the sin-cos pos_embed, which also fixes non-square grids; else the
  argument, a square learned table or a square DropPos position count; else
  None), in_chans, pos_embed ('sincos'|'learned'|'absent'|'bad shape'),
  final_norm/fc_norm (which LayerNorms the file has), num_classes if it has a
  head, and `projector` {width, depth, num_heads, num_positions} if it has a
  DropPos/MAE decoder (num_heads from the argument or PROJECTORS by width).
  """
  sd, dtypes = _clean(state_dict)
  return _infer(sd, num_heads, grid_hw, projector_num_heads, dtypes)[0]


def _clean(state_dict):
  """(float32 arrays without `module.` prefixes, original float dtypes)."""
  sd = unwrap_state_dict(state_dict)
  dtypes = {}
  for k, v in sd.items():
    if np.issubdtype(v.dtype, np.floating) or v.dtype.name == 'bfloat16':
      if v.dtype != np.float32:
        dtypes[k] = v.dtype
        sd[k] = v.astype(np.float32)
  return sd, dtypes


# -------------------------------------------------------------- conversion ---

@dataclasses.dataclass
class ConversionReport:
  """What happened to every tensor of a checkpoint; `str()` is for humans."""
  kind: str
  config: dict[str, Any]
  converted: list[str]
  unused: list[str]
  missing: list[str]
  shape_mismatches: list[tuple[str, tuple, tuple]]
  warnings: list[str]
  notes: list[str]

  @property
  def ok(self) -> bool:
    return not self.missing and not self.shape_mismatches

  def __str__(self):
    c = self.config
    grid = 'x'.join(map(str, c['grid'])) if c.get('grid') else 'unknown'
    lines = [f'{self.kind}: {len(self.converted)} checkpoint tensors converted.',
             f'  architecture: width {c["width"]}, depth {c["depth"]}, mlp '
             f'{c["mlp_dim"]}, heads {c["num_heads"]}, patch {c["patch_size"]}, '
             f'grid {grid}, in_chans {c["in_chans"]}']
    for part in ('projector', 'decoder'):
      if part in c:
        lines.append(f'  {part}: {c[part]}')
    if 'num_classes' in c:
      lines.append(f'  head: {c["num_classes"]} classes')
    lines.append({
        'sincos': '  pos_embed: fixed 2-D sin-cos, matches ours (not a Flax '
                  'parameter; regenerated on export).',
        'learned': '  pos_embed: LEARNED, dropped (see warning).',
        'absent': '  pos_embed: absent.',
        'bad shape': '  pos_embed: unexpected shape, dropped.'}[c['pos_embed']])
    if self.unused:
      lines.append(f'  unused checkpoint tensors ({len(self.unused)}), NOT '
                   f'converted: {", ".join(self.unused)}')
    if self.missing:
      lines.append(f'  missing tensors ({len(self.missing)}): '
                   f'{", ".join(self.missing)}')
    for key, got, want in self.shape_mismatches:
      lines.append(f'  shape mismatch: {key} is {list(got)}, expected {list(want)}')
    lines += [f'  WARNING: {w}' for w in self.warnings]
    lines += [f'  note: {n}' for n in self.notes]
    return '\n'.join(lines)


def _hints(kind, sd, missing):
  hints = []
  if kind == 'encoder' and 'norm.weight' in missing and 'fc_norm.weight' in sd:
    hints.append("this looks like a fine-tuned checkpoint (fc_norm/head, no "
                 "final norm): use kind='classifier'.")
  if kind == 'droppos' and 'mask_pos_token' in missing:
    hints.append("no DropPos projector state here (mask_pos_token missing; MAE "
                 "and fine-tuned files have none): use kind='encoder'.")
  if kind == 'classifier' and 'norm.weight' in sd and 'fc_norm.weight' not in sd:
    hints.append('no fc_norm: this classifier pools [cls] after the final norm '
                 '(timm style), so its tree has encoder/norm and no fc_norm.')
  if kind == 'classifier' and 'head.weight' in missing:
    hints.append("no classification head here: use kind='encoder' (or "
                 "'droppos' for a DropPos pre-training file).")
  return hints


def torch_to_flax(state_dict: Mapping[str, Any], *, kind: str,
                  num_heads: int | None = None, grid_hw=None,
                  projector_num_heads: int | None = None,
                  strict: bool = True) -> tuple[dict, ConversionReport]:
  """Reference state dict -> (Flax params of `kind`, report).

  Floats become float32. With `strict`, missing tensors or wrong shapes raise
  a UserError carrying the full report; otherwise the params hold what could
  be converted. Unused tensors never raise but are listed in the report.
  """
  if kind not in KINDS:
    raise UserError(f'Unknown kind {kind!r}; choose from {KINDS}.')
  sd, dtypes = _clean(state_dict)
  cfg, cls_row, warnings, notes = _infer(sd, num_heads, grid_hw,
                                         projector_num_heads, dtypes)
  # Not parameters here: the sin-cos tables (recomputed from the grid) and
  # BatchNorm's step counter (unused by a BatchNorm with momentum).
  skipped = {'pos_embed', 'head.0.num_batches_tracked'} & set(sd)
  if kind == 'mae':
    skipped.add('decoder_pos_embed')
  params, used, missing, mismatches = {}, set(skipped), [], []
  for leaf in _leaves(kind, cfg):
    arr = sd.get(leaf.torch_key)
    if arr is None:
      missing.append(leaf.torch_key)
      continue
    used.add(leaf.torch_key)
    if leaf.torch_shape is not None and tuple(arr.shape) != leaf.torch_shape:
      mismatches.append((leaf.torch_key, tuple(arr.shape), leaf.torch_shape))
      continue
    node = params
    for name in leaf.flax_path[:-1]:
      node = node.setdefault(name, {})
    node[leaf.flax_path[-1]] = np.ascontiguousarray(_TO_FLAX[leaf.op](arr))
  if cls_row is not None and np.any(cls_row != 0):
    enc = params if kind == 'encoder' else params.get('encoder', {})
    if 'cls_token' in enc:
      enc['cls_token'] = enc['cls_token'] + cls_row
  cast = sorted({str(dtypes[k]) for k in used if k in dtypes})
  if cast:
    notes.append(f'cast {"/".join(cast)} tensors to float32.')
  converted = sorted(used - skipped - {m[0] for m in mismatches})
  report = ConversionReport(
      kind=kind, config=cfg, converted=converted,
      unused=sorted(k for k in sd if k not in used), missing=missing,
      shape_mismatches=mismatches, warnings=warnings,
      notes=notes + _hints(kind, sd, missing))
  if strict and not report.ok:
    raise UserError(f'Checkpoint does not fit kind {kind!r}:\n{report}')
  return params, report


def _flatten(tree, prefix=()):
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (str(k),)))
    return out
  return {prefix: tree}


def flax_config(params: Mapping[str, Any], kind: str) -> dict[str, Any]:
  """Architecture of our params tree of `kind`, read from its shapes (the
  format of infer_vit_config without num_heads, grid and pos_embed)."""
  if isinstance(params, Mapping) and set(params) == {'params'}:
    params = params['params']
  return _config_from_flax(
      {k: np.asarray(v) for k, v in _flatten(params).items()}, kind)


def _config_from_flax(flat, kind):
  enc = () if kind == 'encoder' else ('encoder',)
  try:
    p, _, c, d = flat[enc + ('patch_embed', 'kernel')].shape
  except KeyError:
    raise UserError(f'Not a {kind!r} params tree: no '
                    f'{"/".join(enc + ("patch_embed", "kernel"))}.') from None
  depth = max((int(m.group(1)) for path in flat if len(path) > len(enc)
               if (m := re.fullmatch(r'blocks_(\d+)', path[len(enc)]))),
              default=-1) + 1
  fc1 = flat.get(enc + ('blocks_0', 'mlp', 'fc1', 'kernel'))
  cfg = dict(width=d, depth=depth, patch_size=p, in_chans=c,
             mlp_dim=fc1.shape[1] if fc1 is not None else None,
             final_norm=enc + ('norm', 'scale') in flat,
             fc_norm=('fc_norm', 'scale') in flat)
  root = {'droppos': 'projector', 'mae': 'decoder'}.get(kind)
  if root:
    depth = max((int(m.group(1)) for path in flat if path[0] == root
                 if (m := re.fullmatch(r'blocks_(\d+)', path[1]))),
                default=-1) + 1
    emb = flat.get((root, 'embed', 'kernel'))
    width = None if emb is None else emb.shape[1]
  if kind == 'mae':
    cfg['decoder'] = dict(width=width, depth=depth)
  if kind == 'droppos':
    pred = flat.get(('projector', 'pred', 'kernel'))
    names = {l.torch_key for l in _decoder_leaves(
        {k: None for k in flat if k[0] == 'projector'})}
    cfg['projector'] = _position_head(names, d, dict(
        width=width, depth=depth, num_heads=None,
        num_positions=None if pred is None else pred.shape[1]))
    del cfg['projector']['num_heads']  # not in weights; from the metadata
  if kind in ('classifier', 'linear_probe') and ('head', 'kernel') in flat:
    cfg['num_classes'] = flat[('head', 'kernel')].shape[1]
  return cfg


def flax_to_torch(params: Mapping[str, Any], *, kind: str,
                  grid_hw) -> dict[str, np.ndarray]:
  """Flax params of `kind` -> reference state dict, incl. the sin-cos
  `pos_embed` [1, 1+h*w, D] (zero [cls] row) for the (h, w) patch grid.

  A 'linear_probe' tree also holds the BatchNorm statistics `head_norm`
  ({'mean', 'var'}, from the 'batch_stats' collection)."""
  if kind not in KINDS:
    raise UserError(f'Unknown kind {kind!r}; choose from {KINDS}.')
  if isinstance(params, Mapping) and set(params) == {'params'}:
    params = params['params']
  flat = {k: np.asarray(v) for k, v in _flatten(params).items()}
  cfg = _config_from_flax(flat, kind)
  h, w = (int(g) for g in grid_hw)
  n = cfg.get('projector', {}).get('num_positions')
  if n is not None and n != h * w:
    raise UserError(f'grid_hw {(h, w)} has {h * w} positions but the projector '
                    f'predicts {n}.')
  leaves = _leaves(kind, cfg)
  missing = ['/'.join(l.flax_path) for l in leaves if l.flax_path not in flat]
  extra = sorted('/'.join(k) for k in set(flat) - {l.flax_path for l in leaves})
  if missing or extra:
    raise UserError(f'params do not have the {kind!r} layout: missing '
                    f'{missing or "nothing"}; unexpected {extra or "nothing"}.')
  state = {l.torch_key: np.ascontiguousarray(_TO_TORCH[l.op](flat[l.flax_path]))
           for l in leaves}
  pos = _pos_embed((h, w), cfg['width'])
  if kind == 'mae':
    state['decoder_pos_embed'] = _pos_embed((h, w), cfg['decoder']['width'])
  if kind == 'linear_probe':  # torch's BatchNorm counter; unused with momentum
    state['head.0.num_batches_tracked'] = np.zeros((), np.int64)
  return {'pos_embed': pos, **state}


# ------------------------------------------------------------ model checks ---

def compatibility_problems(params, reference_params) -> list[str]:
  """Every path that is missing, unexpected or of the wrong shape in `params`
  relative to `reference_params` (e.g. from `jax.eval_shape(model.init,
  ...)`; a top-level {'params': ...} is unwrapped), one line each."""
  def flat(tree):
    if isinstance(tree, Mapping) and set(tree) == {'params'}:
      tree = tree['params']
    return {'/'.join(k): tuple(np.shape(v)) for k, v in _flatten(tree).items()}
  got, want = flat(params), flat(reference_params)
  problems = [f'missing {k} {list(want[k])}' for k in sorted(set(want) - set(got))]
  problems += [f'unexpected {k} {list(got[k])}' for k in sorted(set(got) - set(want))]
  problems += [f'{k}: checkpoint {list(got[k])} vs model {list(want[k])}'
               for k in sorted(set(got) & set(want)) if got[k] != want[k]]
  return problems
