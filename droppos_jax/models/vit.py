"""Vision Transformer encoder (pre-LN, fixed 2-D sin-cos PE), timm/MAE layout.

Parameter names mirror the PyTorch reference (`patch_embed`, `cls_token`,
`blocks_{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`) so that
checkpoint conversion is a transpose, not a puzzle.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from droppos_jax.errors import UserError

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
    raise UserError(f'model.dtype={name!r}; valid: {sorted(DTYPES)}.')
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
    raise UserError(
        f'Unknown ViT variant {variant!r}; expected "<size>/<patch>" with size '
        f'in {sorted(VARIANTS)} and a positive patch size, e.g. "B/16".')
  patch = int(match.group(2))
  if patch <= 0:
    raise UserError(f'Patch size in variant {variant!r} must be positive.')
  return ViTSize(*VARIANTS[match.group(1)], patch_size=patch)


def grid_size(image_hw: Sequence[int], patch_size: int) -> tuple[int, int]:
  """Patch grid (h, w) for an image; the patch must divide both sides."""
  h, w = int(image_hw[0]), int(image_hw[1])
  if patch_size <= 0 or h % patch_size or w % patch_size:
    raise UserError(
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
    raise UserError(f'Embedding width {dim} must be divisible by 4 for the '
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

POOLS = ('cls', 'gap')
ATTENTION = ('auto', 'xla', 'cudnn')
GPU_PLATFORMS = ('gpu', 'cuda', 'rocm')


def is_accelerator(platform: str) -> bool:
  """Whether jax `platform` is a TPU or a GPU."""
  return platform == 'tpu' or platform in GPU_PLATFORMS


def attention_implementation(name: str, dtype: Any,
                             platform: Optional[str] = None) -> str:
  """`jax.nn.dot_product_attention`'s implementation for the setting `name`.

  'auto' is cuDNN's fused attention on GPUs when the compute dtype is
  bfloat16 or float16 (cuDNN has no float32 kernel) and XLA's everywhere
  else. `platform` defaults to jax.default_backend(), read at trace time.
  """
  if name not in ATTENTION:
    raise UserError(f'model.attention={name!r}; valid: {ATTENTION}.')
  if name != 'auto':
    return name
  platform = platform or jax.default_backend()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return 'cudnn' if platform in GPU_PLATFORMS and half else 'xla'


def take_rows(x, rows):
  """x [B, T, ...] at `rows`: int [B, Q] (per-sample indices) or a slice."""
  if isinstance(rows, slice):
    return x[:, rows]
  return jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)),
                             axis=1, mode='promise_in_bounds')


def patchify(images, patch_size: int):
  """[B, H, W, C] -> [B, N, p*p*C]: row-major patches, each flattened in the
  (row, column, channel) order of a conv kernel [p, p, C, D]."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


@jax.custom_vjp
def _embed_all_and_visible(patches, kernel, bias, ids_keep):
  tokens = patches @ kernel + bias
  return tokens, take_rows(tokens, ids_keep)


def _embed_fwd(patches, kernel, bias, ids_keep):
  out = _embed_all_and_visible(patches.value, kernel.value, bias.value,
                               ids_keep.value)
  return out, (patches.value, kernel.value, ids_keep.value)


def _embed_bwd(residuals, cotangents):
  """Only the visible rows' patches enter the kernel gradient when the
  all-token output is not differentiated (the attentive pass): no scatter
  into N rows and 1/mask-ratio of the matmul."""
  patches, kernel, ids_keep = residuals
  ct_all, ct_visible = cotangents
  d_kernel = jnp.zeros_like(kernel)
  d_bias = jnp.zeros(kernel.shape[-1], kernel.dtype)
  d_patches = jnp.zeros_like(patches)
  if not isinstance(ct_visible, SymbolicZero):
    visible = take_rows(patches, ids_keep)
    d_kernel += jnp.einsum('bkp,bkd->pd', visible, ct_visible)
    d_bias += ct_visible.sum(axis=(0, 1))
    b = jnp.arange(patches.shape[0])[:, None]
    d_patches = d_patches.at[b, ids_keep].add(ct_visible @ kernel.T)
  if not isinstance(ct_all, SymbolicZero):
    d_kernel += jnp.einsum('bnp,bnd->pd', patches, ct_all)
    d_bias += ct_all.sum(axis=(0, 1))
    d_patches += ct_all @ kernel.T
  return d_patches, d_kernel, d_bias, None


_embed_all_and_visible.defvjp(_embed_fwd, _embed_bwd, symbolic_zeros=True)


class PatchEmbed(nn.Module):
  """The patch conv (kernel = stride = p, VALID) as patchify + one matmul.

  Parameters are nn.Conv's (`kernel` [p, p, C, D], `bias` [D]) so that
  checkpoints are unchanged; a matmul keeps XLA from transposing the images
  into a conv layout and lets the visible patches be embedded alone.
  """
  width: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, ids_keep=None, *, with_all: bool = False):
    """[B, N, D] tokens of every patch, or [B, K, D] of the patches
    `ids_keep` [B, K]; with `with_all` both (all, visible), computed once."""
    p, c = self.patch_size, images.shape[-1]
    kernel = self.param('kernel', patch_init, (p, p, c, self.width))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.width,))
    patches, kernel, bias = nn.dtypes.promote_dtype(
        patchify(images, p), kernel.reshape(p * p * c, self.width), bias,
        dtype=self.dtype)
    if ids_keep is None:
      return patches @ kernel + bias
    if with_all:
      return _embed_all_and_visible(patches, kernel, bias, ids_keep)
    return take_rows(patches, ids_keep) @ kernel + bias


class QKV(nn.Module):
  """The fused q/k/v projection (timm's `qkv`: nn.Dense(3D) parameters),
  split into heads [B, T, H, D/H]. With `rows`, queries are projected for
  those tokens only; keys and values always for every token."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, rows=None):
    d = x.shape[-1]
    kernel = self.param('kernel', dense_init, (d, 3 * d))
    bias = self.param('bias', nn.initializers.zeros_init(), (3 * d,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    heads = lambda y: y.reshape(y.shape[:2] + (-1, self.num_heads,
                                               d // self.num_heads))
    if rows is None:
      qkv = heads(x @ kernel + bias)
      return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = heads(take_rows(x, rows) @ kernel[:, :d] + bias[:d])[:, :, 0]
    kv = heads(x @ kernel[:, d:] + bias[d:])
    return q, kv[:, :, 0], kv[:, :, 1]


def dot_product_attention(q, k, v, implementation: str):
  """softmax(q k^T / sqrt(d)) v per head: q [B, Q, H, d], k and v [B, T, H, d]
  -> [B, Q, H, d], as jax.nn.dot_product_attention computes it.

  In float32 with 'xla', the heads move ahead of the tokens first (torch's
  layout): XLA's CPU dots then run on [B, H, Q, T] as they are, where
  jax.nn.dot_product_attention's products cost two extra transposes of the
  probabilities and of k and v (the attentive pass's attention ran 1.4x
  slower). Other dtypes keep jax's version, which picks their dot algorithms.
  """
  if implementation != 'xla' or q.dtype != jnp.float32:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  q, k, v = (y.swapaxes(1, 2) for y in (q, k, v))
  logits = jnp.einsum('bhqd,bhtd->bhqt', q, k) * (q.shape[-1]**-0.5)
  out = jnp.einsum('bhqt,bhtd->bhqd', jax.nn.softmax(logits, axis=-1), v)
  return out.swapaxes(1, 2)


def gelu(x):
  """Exact GELU, x * Phi(x), in the erf form of torch's nn.GELU: XLA's erf is
  2.5x cheaper on the CPU than the erfc of nn.gelu(approximate=False)."""
  return 0.5 * x * (1. + jax.lax.erf(x * 0.5**0.5))


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (timm layout);
  with `rows`, outputs only for those query tokens."""
  num_heads: int
  dtype: Any = jnp.float32
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, x, rows=None):
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f'Width {d} is not divisible by {self.num_heads} heads.')
    q, k, v = QKV(self.num_heads, self.dtype, name='qkv')(x, rows)
    out = dot_product_attention(
        q, k, v, attention_implementation(self.implementation, q.dtype))
    return nn.Dense(d, dtype=self.dtype, kernel_init=dense_init,
                    name='proj')(out.reshape(out.shape[:2] + (d,)))


class Mlp(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=dense_init,
                 name='fc1')(x)
    x = gelu(x)
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


def block_flops(tokens_in: int, tokens_out: int, width: int,
                mlp_dim: int) -> int:
  """Matmul FLOPs of one Block's forward pass for one example: keys and
  values of `tokens_in`, queries, attention output, projection and MLP of
  `tokens_out` (the Block with `rows`)."""
  kv = 2 * tokens_in * width * 2 * width
  attention = 2 * 2 * tokens_out * tokens_in * width  # scores and values
  rest = 2 * tokens_out * (2 * width * width + 2 * width * mlp_dim)  # q, proj
  return kv + attention + rest


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x)).

  `rows` (int [B, Q] or a slice) keeps only those tokens' outputs: every
  token still serves as key and value, but queries, the MLP and the
  residuals run for the kept rows alone.
  """
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.
  dtype: Any = jnp.float32
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x, deterministic: bool = True, rows=None):
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)
    drop = DropPath(self.drop_path)
    y = Attention(self.num_heads, self.dtype, self.attention, name='attn')(
        norm('norm1')(x), rows)
    if rows is not None:
      x = take_rows(x, rows)
    x = x + drop(y, deterministic)
    x = x + drop(Mlp(self.mlp_dim, self.dtype, name='mlp')(
        norm('norm2')(x)), deterministic)
    return x


def decoder_tail(x, num_outputs: int, *, depth: int, num_heads: int,
                 dtype: Any, attention: str):
  """Pre-LN blocks on [cls] + tokens, LayerNorm, Dense -> num_outputs per
  token, as MAE's decoder ends and DropPos's projector does. Only the
  tokens' outputs are read, so the last block keeps their rows alone ([cls]
  stays a key and value). Call it inside a compact method: the modules are
  the caller's `blocks_{i}`, `norm` and `pred`."""
  width = x.shape[-1]
  for i in range(depth):
    last = i == depth - 1
    x = Block(num_heads, 4 * width, dtype=dtype, attention=attention,
              name=f'blocks_{i}')(x, rows=slice(1, None) if last else None)
  if not depth:
    x = x[:, 1:]
  x = nn.LayerNorm(epsilon=1e-6, dtype=dtype, name='norm')(x)
  return nn.Dense(num_outputs, dtype=dtype, kernel_init=dense_init,
                  name='pred')(x)


class VisionTransformer(nn.Module):
  """ViT encoder: patch embedding, fixed sin-cos PE, [cls], pre-LN blocks
  and (with `final_norm`) a final LayerNorm.

  `__call__` is the one encoder pass: every patch with its true PE, or only
  the patches `ids_keep` with the PEs of `drop_mask` replaced by a token (as
  DropPos and the position probe need). It returns named intermediates:
    'stem'     [B, T, D] patch embeddings of the T tokens run, without PE;
    'blocks'   [B, 1+T, D] after the last block;
    'tokens'   [B, 1+T, D] the encoder output (final norm if any);
    'cls' [B, D], 'patches' [B, T, D], 'gap' [B, D] (mean of 'patches') and
    'pooled' [B, D] (the one named by `pool`), all from 'tokens'.
  `final_norm=False` is MAE's fine-tuning trunk (no `norm` parameters).
  Parameters are float32; `dtype` is the compute dtype. `drop_path_rate`
  grows linearly with depth, as in timm. `attention` picks the attention
  implementation (see attention_implementation).
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  drop_path_rate: float = 0.
  dtype: Any = jnp.float32
  remat: bool = False
  final_norm: bool = True
  pool: str = 'cls'
  attention: str = 'auto'

  def setup(self):
    if self.pool not in POOLS:
      raise UserError(f'pool={self.pool!r}; valid: {POOLS}.')
    self.patch_embed = PatchEmbed(self.width, self.patch_size, self.dtype)
    self.cls_token = self.param('cls_token', token_init, (1, 1, self.width))
    block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    rates = np.linspace(0., self.drop_path_rate, self.depth) if self.depth else []
    self.blocks = [block(self.num_heads, self.mlp_dim, float(rate), self.dtype,
                         self.attention) for rate in rates]
    if self.final_norm:
      self.norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)

  def embed_patches(self, images, ids_keep=None, *, with_all: bool = False):
    """(tokens without PE, grid (h, w)): [B, N, D] for every patch, [B, K, D]
    for the patches `ids_keep` [B, K], or with `with_all` the pair (every
    patch, visible patches) embedded once (see PatchEmbed)."""
    grid = grid_size(images.shape[1:3], self.patch_size)
    return self.patch_embed(images, ids_keep, with_all=with_all), grid

  def posemb(self, grid):
    return jnp.asarray(posemb_sincos_2d(grid[0], grid[1], self.width))

  def encode(self, stem, grid, ids_keep=None, drop_mask=None, pe_token=None, *,
             outputs=None, train: bool = False) -> dict[str, jax.Array]:
    """The encoder pass from patch embeddings `stem` (see __call__).

    `stem` holds every patch of the `grid`, or the patches `ids_keep` [B, K].
    Tokens where `drop_mask` [B, K] is True get `pe_token` [1, 1, D] in place
    of their PE (nothing if None). `outputs` [B, Q] (indices into `stem`)
    asks for those tokens' outputs only: the last block then runs queries
    and MLP for [cls] and them alone, with keys and values from every token.
    """
    pos = self.posemb(grid)
    if ids_keep is not None:
      pos = jnp.take(pos, ids_keep, axis=0)
    if drop_mask is not None:
      fill = 0. if pe_token is None else pe_token.astype(pos.dtype)
      pos = jnp.where(drop_mask[..., None], fill, pos)
    x = stem + pos.astype(stem.dtype)
    cls = jnp.broadcast_to(self.cls_token, (x.shape[0], 1, self.width))
    x = jnp.concatenate([cls.astype(x.dtype), x], axis=1)
    rows = None
    if outputs is not None:  # [cls] and the asked-for tokens
      rows = jnp.concatenate(
          [jnp.zeros((x.shape[0], 1), outputs.dtype), outputs + 1], axis=1)
      if not self.blocks:
        x = take_rows(x, rows)
    for i, blk in enumerate(self.blocks):
      x = blk(x, not train, rows if i == len(self.blocks) - 1 else None)
    tokens = self.norm(x) if self.final_norm else x
    out = {'stem': stem, 'blocks': x, 'tokens': tokens, 'cls': tokens[:, 0],
           'patches': tokens[:, 1:], 'gap': tokens[:, 1:].mean(axis=1)}
    return dict(out, pooled=out[self.pool])

  def forward_flops(self, image_hw: Sequence[int]) -> tuple[int, int]:
    """Matmul FLOPs of one image's full forward pass (every patch): (the
    patch embedding's, the blocks')."""
    h, w = grid_size(image_hw, self.patch_size)
    n = h * w
    return (2 * n * self.patch_size**2 * 3 * self.width,
            self.depth * block_flops(1 + n, 1 + n, self.width, self.mlp_dim))

  def __call__(self, images, ids_keep=None, drop_mask=None, pe_token=None, *,
               train: bool = False) -> dict[str, jax.Array]:
    """Encodes `images` [B, H, W, 3]: every patch with its true PE, or the
    patches `ids_keep` [B, K] only, the PEs of `drop_mask` [B, K] replaced by
    `pe_token` (or nothing). Returns the named intermediates (class doc)."""
    stem, grid = self.embed_patches(images, ids_keep)
    return self.encode(stem, grid, ids_keep, drop_mask, pe_token, train=train)


def vit_from_variant(variant: str, **kwargs: Any) -> VisionTransformer:
  """Builds a VisionTransformer by name; keyword arguments override the table."""
  size = dataclasses.asdict(decode_variant(variant))
  size.update(kwargs)
  return VisionTransformer(**size)
