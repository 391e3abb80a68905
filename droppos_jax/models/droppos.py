"""DropPos: a ViT encoder that classifies the grid position of PE-dropped tokens.

Parameter tree: `encoder` (a VisionTransformer), `mask_pos_token` [1, 1, D]
and `projector` (`embed`, `blocks_{i}`, `norm`, `pred`), matching the reference
names `decoder_embed`, `decoder_blocks.{i}`, `decoder_norm`, `decoder_pred`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from droppos_jax.errors import UserError
from droppos_jax.models import vit

# name -> (width, depth, num_heads); the paper's projector is 'default'.
PROJECTORS = {
    'default': (512, 2, 16),
    'small': (256, 2, 8),
    'tiny': (64, 1, 4),
}


class Projector(nn.Module):
  """Linear D->width, transformer blocks without PE, LayerNorm, Linear->N.

  Applied to [cls] + K tokens; only the K patch tokens' logits are read, so
  the last block keeps their rows alone (cls stays a key and value).
  """
  width: int = 512
  depth: int = 2
  num_heads: int = 16
  dtype: Any = jnp.float32
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x, num_positions: int):
    x = nn.Dense(self.width, dtype=self.dtype, kernel_init=vit.dense_init,
                 name='embed')(x)
    for i in range(self.depth):
      last = i == self.depth - 1
      x = vit.Block(self.num_heads, 4 * self.width, dtype=self.dtype,
                    attention=self.attention, name=f'blocks_{i}')(
                        x, rows=slice(1, None) if last else None)
    if not self.depth:
      x = x[:, 1:]
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(x)
    return nn.Dense(num_positions, dtype=self.dtype, kernel_init=vit.dense_init,
                    name='pred')(x)


class DropPos(nn.Module):
  """Encoder + learned position mask token + position-classification projector.

  `__call__(images, ids_keep, drop_mask)` runs the masked pass and returns
  {'logits': float32 position logits [B, K, N] of the K visible tokens,
   'encoder': the masked pass's named encoder outputs (vit.VisionTransformer)}
  and, with `attentive=True`, 'attentive': the named outputs of the full
  pass (every patch, true PEs) at [cls] and the visible tokens, which drive
  attentive reconstruction (see attentive_features).

  `attentive_dtype` is that pass's compute dtype (None: the encoder's).
  """
  encoder: vit.VisionTransformer
  projector: Projector = dataclasses.field(default_factory=Projector)
  attentive_dtype: Any = None

  def setup(self):
    self.mask_pos_token = self.param('mask_pos_token', vit.token_init,
                                     (1, 1, self.encoder.width))

  def __call__(self, images, ids_keep, drop_mask, *, attentive: bool = False,
               train: bool = True) -> dict[str, Any]:
    if attentive:  # one patch embedding for both passes
      (every, visible), grid = self.encoder.embed_patches(images, ids_keep,
                                                          with_all=True)
    else:
      visible, grid = self.encoder.embed_patches(images, ids_keep)
    enc = self.encoder.encode(visible, grid, ids_keep, drop_mask,
                              self.mask_pos_token, train=train)
    logits = self.projector(enc['tokens'], grid[0] * grid[1])
    out = {'logits': logits.astype(jnp.float32), 'encoder': enc}
    if attentive:
      out['attentive'] = self._full_pass(every, grid, ids_keep)
    return out

  def attentive_features(self, images, outputs):
    """The full pass's named outputs at [cls] and the patches `outputs`
    [B, Q]: forward only, no gradient to any parameter."""
    every, grid = self.encoder.embed_patches(images)
    return self._full_pass(every, grid, outputs)

  def _full_pass(self, every, grid, outputs):
    """Attentive weights renormalised over the visible tokens need only
    cos([cls], visible patch): the softmax denominator over all N patches
    cancels. So the last block runs queries for [cls] and `outputs` alone
    (vit.VisionTransformer.encode). The pass may compute in another dtype:
    a copy of the encoder module applied to its (stop-gradient) params."""
    encoder = self.encoder.clone(
        parent=None, remat=False,
        dtype=self.attentive_dtype or self.encoder.dtype)
    params = jax.lax.stop_gradient(self.encoder.variables['params'])
    return encoder.apply({'params': params}, jax.lax.stop_gradient(every),
                         grid, outputs=outputs, method=encoder.encode)

  def full_features(self, images):
    """(cls [B, D], patches [B, N, D]) of the full unmasked pass, float32."""
    out = self.encoder(images, train=False)
    return out['cls'].astype(jnp.float32), out['patches'].astype(jnp.float32)


# Compute dtype of the attentive pass by config name; 'auto' is bfloat16
# where matmuls gain from it (TPU, GPU) and the model's dtype elsewhere.
ATTENTIVE_DTYPES = ('auto',) + tuple(vit.DTYPES)


def attentive_dtype(name: str, model_dtype: Any,
                    platform: Optional[str] = None) -> Any:
  """The attentive pass's compute dtype for `name` on `platform` (default
  jax.default_backend(); a planner compiling for a TPU passes 'tpu').

  It is forward-only and its weights are renormalised softmaxes of cosine
  similarities, computed in float32 (losses.attentive_weights) whatever the
  matmul dtype, so bfloat16 costs no precision that matters.
  """
  if name not in ATTENTIVE_DTYPES:
    raise UserError(f'model.attentive_dtype={name!r}; valid: '
                    f'{ATTENTIVE_DTYPES}.')
  if name == 'auto':
    platform = platform or jax.default_backend()
    accelerator = platform == 'tpu' or platform in vit.GPU_PLATFORMS
    return jnp.bfloat16 if accelerator else model_dtype
  return vit.compute_dtype(name)


def droppos_from_model_config(m: Any, platform: Optional[str] = None) -> DropPos:
  """From a config's `model` block, or the copy a checkpoint's meta keeps
  (older copies lack attentive_dtype and attention: 'auto'). `platform`
  resolves the 'auto' attentive dtype (default: jax.default_backend())."""
  dtype = vit.compute_dtype(m['dtype'])
  return droppos_from_config(
      m['variant'], m['projector'], dtype=dtype, remat=m['remat'],
      attentive_dtype=attentive_dtype(m.get('attentive_dtype', 'auto'), dtype,
                                      platform),
      attention=m.get('attention', 'auto'), width=m['projector_width'],
      depth=m['projector_depth'], num_heads=m['projector_heads'])


def droppos_from_config(variant: str, projector: str = 'default', *,
                        dtype: Any = jnp.float32, remat: bool = False,
                        attentive_dtype: Any = None, attention: str = 'auto',
                        **projector_overrides: Any) -> DropPos:
  """DropPos by names: `variant` like 'B/16', `projector` from PROJECTORS.

  `projector_overrides` (width/depth/num_heads) replace table entries;
  `attention` is vit.attention_implementation's setting.
  """
  if projector not in PROJECTORS:
    raise UserError(f'Unknown projector {projector!r}; choose from '
                     f'{sorted(PROJECTORS)} (and override width/depth/num_heads).')
  proj = dict(zip(('width', 'depth', 'num_heads'), PROJECTORS[projector]))
  unknown = set(projector_overrides) - set(proj)
  if unknown:
    raise UserError(f'Unknown projector settings {sorted(unknown)}; valid: '
                     f'{sorted(proj)}.')
  proj.update({k: v for k, v in projector_overrides.items() if v is not None})
  if proj['width'] % proj['num_heads']:
    raise UserError(f'Projector width {proj["width"]} is not divisible by '
                     f'{proj["num_heads"]} heads.')
  vit.attention_implementation(attention, dtype)  # validates the name
  encoder = vit.vit_from_variant(variant, dtype=dtype, remat=remat,
                                 attention=attention)
  return DropPos(encoder=encoder,
                 projector=Projector(dtype=dtype, attention=attention, **proj),
                 attentive_dtype=attentive_dtype)
