"""Vision Transformer encoder (pre-LN, fixed 2-D sin-cos PE), timm/MAE layout.

Parameter names mirror the PyTorch reference (`patch_embed`, `cls_token`,
`blocks_{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`) so that
checkpoint conversion is a transpose, not a puzzle.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# name -> (width, depth, mlp_dim, num_heads). Ti/S/B/L/H follow ViT/DeiT;
# 'mu' and 'nano' are tiny sizes for tests and the CPU demo.
VARIANTS = {
    'mu': (32, 2, 128, 2),
    'nano': (64, 4, 256, 4),
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
    'g': (1408, 40, 6144, 16),
}


# Compute dtypes by config name; parameters always stay float32.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  if name not in DTYPES:
    raise ValueError(f'model.dtype={name!r}; valid: {sorted(DTYPES)}.')
  return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class ViTSize:
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int


def decode_variant(variant: str) -> ViTSize:
  """'B/16' -> ViTSize(768, 12, 3072, 12, 16); raises on unknown names."""
  match = re.fullmatch(r'([A-Za-z]+)/(\d+)', str(variant))
  if not match or match.group(1) not in VARIANTS:
    raise ValueError(
        f'Unknown ViT variant {variant!r}; expected "<size>/<patch>" with size '
        f'in {sorted(VARIANTS)} and a positive patch size, e.g. "B/16".')
  patch = int(match.group(2))
  if patch <= 0:
    raise ValueError(f'Patch size in variant {variant!r} must be positive.')
  return ViTSize(*VARIANTS[match.group(1)], patch_size=patch)


def grid_size(image_hw: Sequence[int], patch_size: int) -> tuple[int, int]:
  """Patch grid (h, w) for an image; the patch must divide both sides."""
  h, w = int(image_hw[0]), int(image_hw[1])
  if patch_size <= 0 or h % patch_size or w % patch_size:
    raise ValueError(
        f'Patch size {patch_size} must divide the image size {h}x{w}; valid '
        f'patch sizes are the common divisors of {h} and {w}.')
  return h // patch_size, w // patch_size


def posemb_sincos_2d(h: int, w: int, dim: int,
                     temperature: float = 10000.) -> np.ndarray:
  """Fixed 2-D sin-cos table [h*w, dim], row-major patches, MAE layout.

  Channels [0, dim/2) encode the column, [dim/2, dim) the row; each half is
  [sin(pos*omega_k)..., cos(pos*omega_k)...] with omega_k = 1/T^(k/(dim/4)).
  Computed in float64 (as MAE does) and returned as float32.
  """
  if dim % 4:
    raise ValueError(f'Embedding width {dim} must be divisible by 4 for the '
                     '2-D sin-cos position embedding.')
  quarter = dim // 4
  omega = 1. / temperature**(np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(h, dtype=np.float64),
                           np.arange(w, dtype=np.float64), indexing='ij')

  def encode(pos):
    angles = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


# PyTorch's nn.Linear init in MAE: xavier-uniform weights, zero bias.
dense_init = nn.initializers.xavier_uniform()
# MAE inits the patch conv as a Linear over the flattened (p*p*3) input.
patch_init = nn.initializers.variance_scaling(
    1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2), out_axis=3)
token_init = nn.initializers.normal(stddev=0.02)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (timm layout)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f'Width {d} is not divisible by {self.num_heads} heads.')
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=dense_init, name='qkv')(x)
    q, k, v = jnp.split(qkv.reshape(b, t, 3, self.num_heads, d // self.num_heads),
                        3, axis=2)
    out = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
    return nn.Dense(d, dtype=self.dtype, kernel_init=dense_init,
                    name='proj')(out.reshape(b, t, d))


class Mlp(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=dense_init,
                 name='fc1')(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(d, dtype=self.dtype, kernel_init=dense_init, name='fc2')(x)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.:
      return x
    keep = 1. - self.rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep,
                                (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)
    drop = DropPath(self.drop_path)
    x = x + drop(Attention(self.num_heads, self.dtype, name='attn')(
        norm('norm1')(x)), deterministic)
    x = x + drop(Mlp(self.mlp_dim, self.dtype, name='mlp')(
        norm('norm2')(x)), deterministic)
    return x


class VisionTransformer(nn.Module):
  """ViT encoder. `__call__` is the ordinary full pass; DropPos composes
  `embed_patches` and `encode` itself to change what is added to each token.

  Parameters are float32; `dtype` is the compute dtype (e.g. bfloat16).
  `drop_path_rate` grows linearly with depth, as in timm.
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  drop_path_rate: float = 0.
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    self.patch_embed = nn.Conv(
        self.width, (self.patch_size, self.patch_size),
        strides=(self.patch_size, self.patch_size), padding='VALID',
        dtype=self.dtype, kernel_init=patch_init)
    self.cls_token = self.param('cls_token', token_init, (1, 1, self.width))
    block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    rates = np.linspace(0., self.drop_path_rate, self.depth) if self.depth else []
    self.blocks = [block(self.num_heads, self.mlp_dim, float(rate), self.dtype)
                   for rate in rates]
    self.norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)

  def embed_patches(self, images):
    """[B, H, W, 3] -> (tokens [B, N, D] without PE, grid (h, w))."""
    grid = grid_size(images.shape[1:3], self.patch_size)
    x = self.patch_embed(images.astype(self.dtype))
    return x.reshape(x.shape[0], -1, self.width), grid

  def posemb(self, grid):
    return jnp.asarray(posemb_sincos_2d(grid[0], grid[1], self.width))

  def encode(self, tokens, *, train: bool = False, final_norm: bool = True):
    """Prepends [cls] (zero PE), runs the blocks and the final LayerNorm
    (`final_norm=False` for MAE-style fine-tuning, which has none)."""
    cls = jnp.broadcast_to(self.cls_token, (tokens.shape[0], 1, self.width))
    x = jnp.concatenate([cls.astype(tokens.dtype), tokens], axis=1)
    for blk in self.blocks:
      x = blk(x, not train)
    return self.norm(x) if final_norm else x

  def __call__(self, images, *, train: bool = False):
    """Full pass with every patch and its true PE.

    Returns a dict: 'tokens' [B, 1+N, D] (final LN), 'cls' [B, D],
    'patches' [B, N, D] and 'gap' [B, D] (mean of patch tokens).
    """
    x, grid = self.embed_patches(images)
    x = self.encode(x + self.posemb(grid).astype(x.dtype), train=train)
    return {'tokens': x, 'cls': x[:, 0], 'patches': x[:, 1:],
            'gap': x[:, 1:].mean(axis=1)}


def vit_from_variant(variant: str, **kwargs: Any) -> VisionTransformer:
  """Builds a VisionTransformer by name; keyword arguments override the table."""
  size = dataclasses.asdict(decode_variant(variant))
  size.update(kwargs)
  return VisionTransformer(**size)

