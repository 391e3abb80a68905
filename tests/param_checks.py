"""Shape checks of converted params, for the tests: the model tree a
converted architecture should fill, and every difference from it."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from droppos_jax.errors import UserError
from droppos_jax.models import architecture, convert, vit
from droppos_jax.models import droppos as droppos_lib
from droppos_jax.models import mae as mae_lib


def check_compatible(params, reference_params) -> None:
  """Raises a UserError listing every `compatibility_problems`."""
  problems = convert.compatibility_problems(params, reference_params)
  if problems:
    raise UserError('Converted params do not fit the model ('
                    f'{len(problems)} problems):\n  ' + '\n  '.join(problems))


def abstract_params(kind: str, config: Mapping[str, Any]):
  """Shape tree of our `kind` model for `config` (format of infer_vit_config).

  num_heads does not change shapes, so an unknown one is replaced by 1. The
  'classifier' tree is the fine-tuning layout: encoder without the final
  `norm`, plus `fc_norm` and `head`.
  """
  if kind not in convert.KINDS:
    raise ValueError(f'Unknown kind {kind!r}; choose from {convert.KINDS}.')
  c = config
  encoder = vit.VisionTransformer(c['width'], c['depth'], c['mlp_dim'],
                                  c.get('num_heads') or 1, c['patch_size'])
  p = c['patch_size']
  images = jax.ShapeDtypeStruct((1, p, p, c.get('in_chans', 3)), jnp.float32)
  rng = jax.random.key(0)
  if kind == 'encoder':
    return jax.eval_shape(encoder.init, rng, images)['params']
  if kind == 'classifier':
    enc = jax.eval_shape(encoder.clone(final_norm=False).init, rng, images)
    d, k = c['width'], c['num_classes']
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    return {'encoder': enc['params'], 'fc_norm': {'scale': s(d), 'bias': s(d)},
            'head': {'kernel': s(d, k), 'bias': s(k)}}
  if kind == 'mae':
    dec = c['decoder']
    model = mae_lib.MAE(encoder, mae_lib.PixelDecoder(
        dec['width'], dec['depth'], dec.get('num_heads') or 1))
    grid = c.get('grid') or (1, 1)
    images = jax.ShapeDtypeStruct(
        (1, grid[0] * p, grid[1] * p, c.get('in_chans', 3)), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(model.init, rng, images, ids)['params']
  proj = c['projector']
  n = proj['num_positions']
  grid = c.get('grid') or (1, n)
  images = jax.ShapeDtypeStruct((1, grid[0] * p, grid[1] * p, c.get('in_chans', 3)),
                                jnp.float32)
  head = droppos_lib.position_head(architecture.ProjectorSize(**dict(
      proj, num_heads=proj.get('num_heads') or 1)))
  model = droppos_lib.DropPos(encoder, head)
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, 1), jnp.bool_)
  return jax.eval_shape(model.init, rng, images, ids, mask)['params']
