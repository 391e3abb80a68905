"""DropPos: a ViT encoder that classifies the grid position of PE-dropped tokens.

Parameter tree: `encoder` (a VisionTransformer), `mask_pos_token` [1, 1, D]
and `projector` (`embed`, `blocks_{i}`, `norm`, `pred`), matching the reference
names `decoder_embed`, `decoder_blocks.{i}`, `decoder_norm`, `decoder_pred`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from droppos_jax.errors import UserError
from droppos_jax.models import architecture, vit

# name -> (width, depth, num_heads); the paper's projector is 'default'.
PROJECTORS = {
    'default': (512, 2, 16),
    'small': (256, 2, 8),
    'tiny': (64, 1, 4),
}


class Projector(nn.Module):
  """The paper's position head ('transformer'): Linear D->width, transformer
  blocks without PE, LayerNorm, Linear->N.

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
    return vit.decoder_tail(x, num_positions, depth=self.depth,
                            num_heads=self.num_heads, dtype=self.dtype,
                            attention=self.attention)

  def flops(self, num_visible: int, width_in: int, num_positions: int) -> int:
    """Matmul FLOPs of the forward pass for one example (the planner's)."""
    k, w = num_visible, self.width
    out = 2 * (1 + k) * width_in * w + 2 * k * w * num_positions
    return out + sum(vit.block_flops(1 + k, k if i == self.depth - 1 else 1 + k,
                                     w, 4 * w) for i in range(self.depth))


class LinearHead(nn.Module):
  """A linear position head ('linear'): each visible token's encoder feature
  (after the final LayerNorm) straight to its N position logits, as the
  paper's position probe (§4.3) reads positions, but trained end to end."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, num_positions: int):
    return nn.Dense(num_positions, dtype=self.dtype, kernel_init=vit.dense_init,
                    name='pred')(x[:, 1:])

  def flops(self, num_visible: int, width_in: int, num_positions: int) -> int:
    return 2 * num_visible * width_in * num_positions


def transformer_head(size: str = 'default', *, dtype: Any = jnp.float32,
                     attention: str = 'auto', width: Optional[int] = None,
                     depth: Optional[int] = None,
                     num_heads: Optional[int] = None) -> Projector:
  """The paper's head, sized by `size` (a PROJECTORS name); width, depth and
  num_heads, where given, replace the table's."""
  if size not in PROJECTORS:
    raise UserError(f'Unknown projector {size!r}; choose from '
                    f'{sorted(PROJECTORS)} (and override width/depth/num_heads).')
  sizes = dict(zip(('width', 'depth', 'num_heads'), PROJECTORS[size]))
  sizes.update({k: v for k, v in dict(width=width, depth=depth,
                                      num_heads=num_heads).items()
                if v is not None})
  if sizes['width'] % sizes['num_heads']:
    raise UserError(f'Projector width {sizes["width"]} is not divisible by '
                    f'{sizes["num_heads"]} heads.')
  return Projector(dtype=dtype, attention=attention, **sizes)


def linear_head(size: str = 'default', *, dtype: Any = jnp.float32,
                attention: str = 'auto', **sizes: Optional[int]) -> LinearHead:
  """The linear head has no sizes: the projector's table does not apply."""
  del size, attention
  given = sorted(k for k, v in sizes.items() if v is not None)
  if given:
    raise UserError(f'model.head=\'linear\' has no {", ".join(given)}: unset '
                    'the projector_* fields or use model.head=\'transformer\'.')
  return LinearHead(dtype=dtype)


# name -> builder(size, *, dtype, attention, width, depth, num_heads) of the
# position head on the encoder's [cls] + K visible tokens -> [B, K, N] logits.
# A head module has `flops(num_visible, width_in, num_positions)`; its
# parameters live under `projector`, exported as the authors' `decoder_*`.
POSITION_HEADS = {
    'transformer': transformer_head,
    'linear': linear_head,
}


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
  projector: nn.Module = dataclasses.field(default_factory=Projector)
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
    return jnp.bfloat16 if vit.is_accelerator(platform) else model_dtype
  return vit.compute_dtype(name)


def architecture_from_config(m: Any, image_hw: Optional[Sequence[int]] = None
                             ) -> architecture.Architecture:
  """The Architecture a config's `model` block names (or the copy a
  checkpoint's meta keeps: older copies lack `head`), its position count
  from `image_hw` (None: unknown)."""
  size = vit.decode_variant(m['variant'])
  head = m.get('head', 'transformer')
  if head not in POSITION_HEADS:
    raise UserError(f'model.head={head!r}; registered: '
                    f'{", ".join(POSITION_HEADS)}.')
  built = POSITION_HEADS[head](
      m['projector'], width=m['projector_width'], depth=m['projector_depth'],
      num_heads=m['projector_heads'])
  grid = image_hw and vit.grid_size(image_hw, size.patch_size)
  return architecture.Architecture(
      size.width, size.depth, size.mlp_dim, size.num_heads, size.patch_size,
      projector=architecture.ProjectorSize(
          getattr(built, 'width', None), getattr(built, 'depth', 0),
          getattr(built, 'num_heads', None), grid and grid[0] * grid[1], head))


def build(arch: architecture.Architecture, *, dtype: Any = jnp.float32,
          remat: bool = False, attentive_dtype: Any = None,
          attention: str = 'auto') -> DropPos:
  """The one constructor of DropPos: the encoder and position head of
  `arch`, computing in `dtype` (`attention`: vit.attention_implementation's
  setting; `attentive_dtype`: the attentive pass's, None: `dtype`)."""
  vit.attention_implementation(attention, dtype)  # validates the name
  return DropPos(
      encoder=arch.vit(dtype=dtype, remat=remat, attention=attention),
      projector=position_head(arch.projector, dtype=dtype, attention=attention),
      attentive_dtype=attentive_dtype)


def position_head(p: architecture.ProjectorSize, *, dtype: Any = jnp.float32,
                  attention: str = 'auto') -> nn.Module:
  """The head module `p` names, of its sizes (a head without a width, like
  the linear one, has none)."""
  sizes = {} if p.width is None else dict(width=p.width, depth=p.depth,
                                          num_heads=p.num_heads)
  return POSITION_HEADS[p.head](dtype=dtype, attention=attention, **sizes)


def droppos_from_model_config(m: Any, platform: Optional[str] = None,
                              image_hw: Optional[Sequence[int]] = None
                              ) -> DropPos:
  """From a config's `model` block, or the copy a checkpoint's meta keeps
  (older copies lack head, attentive_dtype and attention: their defaults).
  `platform` resolves the 'auto' attentive dtype (default:
  jax.default_backend())."""
  dtype = vit.compute_dtype(m['dtype'])
  return build(
      architecture_from_config(m, image_hw), dtype=dtype, remat=m['remat'],
      attentive_dtype=attentive_dtype(m.get('attentive_dtype', 'auto'), dtype,
                                      platform),
      attention=m.get('attention', 'auto'))


def droppos_from_config(variant: str, projector: str = 'default', *,
                        head: str = 'transformer', dtype: Any = jnp.float32,
                        remat: bool = False, attentive_dtype: Any = None,
                        attention: str = 'auto', width: Optional[int] = None,
                        depth: Optional[int] = None,
                        num_heads: Optional[int] = None) -> DropPos:
  """DropPos by names, as a config's `model` block gives them: `variant`
  like 'B/16', `head` from POSITION_HEADS sized by `projector` (a PROJECTORS
  name) and width/depth/num_heads."""
  arch = architecture_from_config(dict(
      variant=variant, head=head, projector=projector, projector_width=width,
      projector_depth=depth, projector_heads=num_heads))
  return build(arch, dtype=dtype, remat=remat, attentive_dtype=attentive_dtype,
               attention=attention)
