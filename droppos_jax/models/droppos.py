"""DropPos: a ViT encoder that classifies the grid position of PE-dropped tokens.

Parameter tree: `encoder` (a VisionTransformer), `mask_pos_token` [1, 1, D]
and `projector` (`embed`, `blocks_{i}`, `norm`, `pred`), matching the reference
names `decoder_embed`, `decoder_blocks.{i}`, `decoder_norm`, `decoder_pred`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from droppos_jax.models import vit

# name -> (width, depth, num_heads); the paper's projector is 'default'.
PROJECTORS = {
    'default': (512, 2, 16),
    'small': (256, 2, 8),
    'tiny': (64, 1, 4),
}


class Projector(nn.Module):
  """Linear D->width, transformer blocks without PE, LayerNorm, Linear->N."""
  width: int = 512
  depth: int = 2
  num_heads: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, num_positions: int):
    x = nn.Dense(self.width, dtype=self.dtype, kernel_init=vit.dense_init,
                 name='embed')(x)
    for i in range(self.depth):
      x = vit.Block(self.num_heads, 4 * self.width, dtype=self.dtype,
                    name=f'blocks_{i}')(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(x)
    return nn.Dense(num_positions, dtype=self.dtype, kernel_init=vit.dense_init,
                    name='pred')(x)


class DropPos(nn.Module):
  """Encoder + learned position mask token + position-classification projector.

  `__call__(images, ids_keep, drop_mask)` runs the masked pass and returns
  float32 position logits [B, K, N] for the K visible tokens.
  `full_features(images)` is the unmasked pass (all patches, true PEs) whose
  final-LN features drive attentive reconstruction.
  """
  encoder: vit.VisionTransformer
  projector: Projector = dataclasses.field(default_factory=Projector)

  def setup(self):
    self.mask_pos_token = self.param('mask_pos_token', vit.token_init,
                                     (1, 1, self.encoder.width))

  def __call__(self, images, ids_keep, drop_mask, *, train: bool = True):
    x, grid = self.encoder.embed_patches(images)
    num_positions = grid[0] * grid[1]
    x = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
    pos = jnp.take(self.encoder.posemb(grid), ids_keep, axis=0)
    pos = jnp.where(drop_mask[..., None], self.mask_pos_token.astype(pos.dtype), pos)
    x = self.encoder.encode(x + pos.astype(x.dtype), train=train)
    logits = self.projector(x, num_positions)[:, 1:]
    return logits.astype(jnp.float32)

  def full_features(self, images):
    """(cls [B, D], patches [B, N, D]) of the full unmasked pass, float32."""
    out = self.encoder(images, train=False)
    return out['cls'].astype(jnp.float32), out['patches'].astype(jnp.float32)


def droppos_from_model_config(m: Any) -> DropPos:
  """From a config's `model` block, or the copy a checkpoint's meta keeps."""
  return droppos_from_config(
      m['variant'], m['projector'], dtype=vit.compute_dtype(m['dtype']),
      remat=m['remat'], width=m['projector_width'],
      depth=m['projector_depth'], num_heads=m['projector_heads'])


def droppos_from_config(variant: str, projector: str = 'default', *,
                        dtype: Any = jnp.float32, remat: bool = False,
                        **projector_overrides: Any) -> DropPos:
  """DropPos by names: `variant` like 'B/16', `projector` from PROJECTORS.

  `projector_overrides` (width/depth/num_heads) replace table entries.
  """
  if projector not in PROJECTORS:
    raise ValueError(f'Unknown projector {projector!r}; choose from '
                     f'{sorted(PROJECTORS)} (and override width/depth/num_heads).')
  proj = dict(zip(('width', 'depth', 'num_heads'), PROJECTORS[projector]))
  unknown = set(projector_overrides) - set(proj)
  if unknown:
    raise ValueError(f'Unknown projector settings {sorted(unknown)}; valid: '
                     f'{sorted(proj)}.')
  proj.update({k: v for k, v in projector_overrides.items() if v is not None})
  if proj['width'] % proj['num_heads']:
    raise ValueError(f'Projector width {proj["width"]} is not divisible by '
                     f'{proj["num_heads"]} heads.')
  encoder = vit.vit_from_variant(variant, dtype=dtype, remat=remat)
  return DropPos(encoder=encoder, projector=Projector(dtype=dtype, **proj))
