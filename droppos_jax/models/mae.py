"""MAE (arXiv 2111.06377, facebookresearch/mae): a ViT encoder on the visible
patches and a transformer decoder that predicts every patch's pixels.

Parameter tree: `encoder` (a VisionTransformer), `mask_token` [1, 1, W] and
`decoder` (`embed`, `blocks_{i}`, `norm`, `pred`), matching MAE's names
`mask_token`, `decoder_embed`, `decoder_blocks.{i}`, `decoder_norm`,
`decoder_pred`. The decoder's PE is MAE's fixed 2-D sin-cos table with a zero
[cls] row (`decoder_pos_embed`, no parameter here, as the encoder's).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from droppos_jax.errors import UserError
from droppos_jax.models import architecture, vit


class PixelDecoder(nn.Module):
  """MAE's decoder: Linear D->width, mask tokens at the masked positions,
  sin-cos PE, pre-LN blocks, LayerNorm, Linear->pixels of each patch."""
  width: int = 512
  depth: int = 8
  num_heads: int = 16
  dtype: Any = jnp.float32
  attention: str = 'auto'

  @nn.compact
  def __call__(self, tokens, ids_keep, mask_token, grid, pixels: int):
    """tokens [B, 1+K, D] (the encoder's [cls] and visible patches ids_keep
    [B, K]) -> [B, N, pixels] for every patch of the (h, w) `grid`."""
    x = nn.Dense(self.width, dtype=self.dtype, kernel_init=vit.dense_init,
                 name='embed')(tokens)
    b, n = x.shape[0], grid[0] * grid[1]
    # MAE appends mask tokens and un-shuffles; scattering the visible rows
    # into a grid of mask tokens is the same sequence.
    patches = jnp.broadcast_to(mask_token.astype(x.dtype), (b, n, self.width))
    patches = patches.at[jnp.arange(b)[:, None], ids_keep].set(
        x[:, 1:], mode='promise_in_bounds')
    pos = jnp.asarray(vit.posemb_sincos_2d(grid[0], grid[1], self.width))
    x = jnp.concatenate([x[:, :1], patches + pos.astype(x.dtype)], axis=1)
    return vit.decoder_tail(x, pixels, depth=self.depth,
                            num_heads=self.num_heads, dtype=self.dtype,
                            attention=self.attention)

  def flops(self, num_visible: int, num_patches: int, width_in: int,
            pixels: int) -> int:
    """Matmul FLOPs of the forward pass for one example (the planner's)."""
    n, w = num_patches, self.width
    out = 2 * (1 + num_visible) * width_in * w + 2 * n * w * pixels
    return out + sum(vit.block_flops(1 + n, n if i == self.depth - 1 else 1 + n,
                                     w, 4 * w) for i in range(self.depth))


class MAE(nn.Module):
  """Encoder + mask token + pixel decoder.

  `__call__(images, ids_keep)` encodes the patches `ids_keep` [B, K] with
  their PEs and returns {'pred': float32 pixels [B, N, p*p*3] of every patch
  (row, column, channel order, as vit.patchify and MAE's patchify),
  'encoder': the encoder's named outputs}.
  """
  encoder: vit.VisionTransformer
  decoder: PixelDecoder

  def setup(self):
    self.mask_token = self.param('mask_token', vit.token_init,
                                 (1, 1, self.decoder.width))

  def __call__(self, images, ids_keep, *, train: bool = True) -> dict[str, Any]:
    visible, grid = self.encoder.embed_patches(images, ids_keep)
    enc = self.encoder.encode(visible, grid, ids_keep, train=train)
    pixels = self.encoder.patch_size**2 * images.shape[-1]
    pred = self.decoder(enc['tokens'], ids_keep, self.mask_token, grid, pixels)
    return {'pred': pred.astype(jnp.float32), 'encoder': enc}

  def full_features(self, images):
    """(cls [B, D], patches [B, N, D]) of the full unmasked pass, float32."""
    out = self.encoder(images, train=False)
    return out['cls'].astype(jnp.float32), out['patches'].astype(jnp.float32)


def architecture_from_config(m: Any, image_hw: Optional[Sequence[int]] = None
                             ) -> architecture.Architecture:
  """The Architecture of an MAE config's `model` block (image_hw: unused,
  the decoder's sizes do not depend on it)."""
  del image_hw
  size = vit.decode_variant(m['variant'])
  width, heads = m['decoder_width'], m['decoder_heads']
  if not (width >= 1 and heads >= 1 and width % heads == 0
          and m['decoder_depth'] >= 0):
    raise UserError(
        f'model.decoder_width={width}, decoder_heads={heads}, decoder_depth='
        f'{m["decoder_depth"]}: the width must be a positive multiple of the '
        'heads and the depth >= 0 (MAE: 512, 16, 8).')
  return architecture.Architecture(
      size.width, size.depth, size.mlp_dim, size.num_heads, size.patch_size,
      decoder=architecture.DecoderSize(width, m['decoder_depth'], heads))


def build(arch: architecture.Architecture, *, dtype: Any = jnp.float32,
          remat: bool = False, attention: str = 'auto') -> MAE:
  """The one constructor of MAE, of the sizes `arch` names."""
  vit.attention_implementation(attention, dtype)  # validates the name
  d = arch.decoder
  return MAE(encoder=arch.vit(dtype=dtype, remat=remat, attention=attention),
             decoder=PixelDecoder(d.width, d.depth, d.num_heads, dtype=dtype,
                                  attention=attention))


def mae_from_model_config(m: Any, platform: Optional[str] = None,
                          image_hw: Optional[Sequence[int]] = None) -> MAE:
  """From an MAE config's `model` block (`platform`: unused, MAE has no
  platform-dependent part)."""
  del platform
  return build(architecture_from_config(m, image_hw),
               dtype=vit.compute_dtype(m['dtype']), remat=m['remat'],
               attention=m['attention'])

