"""Tiny torch.nn ViT and DropPos in the reference (timm/MAE) layout, for tests.

Same math and parameter names as the authors' code: pre-LN blocks, LayerNorm
eps 1e-6, exact GELU, fused qkv, fixed sin-cos `pos_embed` stored in the state
dict with a zero [cls] row. timm itself does not import here (its torchvision does not load
beside torch 2.13), so this is written out by hand.
"""
import numpy as np
import torch
from torch import nn


def sincos_pos_embed(dim, grid_hw):
  """MAE's get_2d_sincos_pos_embed, generalised to h x w, with a zero [cls] row."""
  h, w = grid_hw
  grid = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))

  def one_d(d, pos):
    omega = 1. / 10000**(np.arange(d // 2, dtype=np.float64) / (d / 2.))
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
  return np.concatenate([np.zeros((1, dim)), emb])[None].astype(np.float32)


class PatchEmbed(nn.Module):

  def __init__(self, patch, dim, in_chans=3):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, dim, patch, patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1) * (c // self.heads)**-0.5).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):

  def __init__(self, dim, heads, mlp_ratio=4.):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


def _randomise(module, seed):
  """Random weights everywhere (incl. LayerNorm affine) so no mapping hides."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith('pos_embed'):  # the fixed sin-cos tables
        continue
      scale = p[0].numel()**-0.5 if p.ndim >= 2 and p.shape[0] > 1 else 0.2
      shift = 1. if 'norm' in name and name.endswith('.weight') else 0.
      p.copy_(torch.randn(p.shape, generator=gen) * scale + shift)


class VisionTransformer(nn.Module):
  """MAE's models_vit layout. With num_classes and global_pool it is the
  fine-tuned model: mean of patch tokens -> fc_norm -> head, no final norm."""

  def __init__(self, image_hw, patch, dim, depth, heads, mlp_ratio=4.,
               num_classes=0, global_pool=False, seed=0):
    super().__init__()
    self.grid = (image_hw[0] // patch, image_hw[1] // patch)
    self.patch_embed = PatchEmbed(patch, dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.from_numpy(sincos_pos_embed(dim, self.grid)),
                                  requires_grad=False)
    self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
    self.global_pool = global_pool
    if global_pool:
      self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
    else:
      self.norm = nn.LayerNorm(dim, eps=1e-6)
    if num_classes:
      self.head = nn.Linear(dim, num_classes)
    _randomise(self, seed)

  def tokens(self, x):
    """[B, 3, H, W] -> [B, 1+N, D] after the blocks (before any final LN)."""
    x = self.patch_embed(x) + self.pos_embed[:, 1:]
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    return x

  def forward_features(self, x):
    x = self.tokens(x)
    return self.fc_norm(x[:, 1:].mean(dim=1)) if self.global_pool else self.norm(x)

  def forward(self, x):
    return self.head(self.forward_features(x))


class DropPos(VisionTransformer):
  """Encoder + mask_pos_token + decoder_* projector (no PE), reference forward."""

  def __init__(self, image_hw, patch, dim, depth, heads, decoder_dim,
               decoder_depth, decoder_heads, seed=0):
    super().__init__(image_hw, patch, dim, depth, heads, seed=seed)
    n = self.grid[0] * self.grid[1]
    self.mask_pos_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.decoder_embed = nn.Linear(dim, decoder_dim)
    self.decoder_blocks = nn.ModuleList(
        [Block(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
    self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
    self.decoder_pred = nn.Linear(decoder_dim, n)
    _randomise(self, seed + 1)

  def forward(self, imgs, ids_keep, drop_mask):
    """Position logits [B, K, N] for visible tokens `ids_keep` [B, K]; tokens
    with drop_mask True get mask_pos_token instead of their PE."""
    x = self.patch_embed(imgs)
    d = x.shape[-1]
    idx = ids_keep.unsqueeze(-1).expand(-1, -1, d)
    x = torch.gather(x, 1, idx)
    pos = torch.gather(self.pos_embed[:, 1:].expand(x.shape[0], -1, -1), 1, idx)
    pos = torch.where(drop_mask.unsqueeze(-1), self.mask_pos_token.expand_as(pos), pos)
    x = x + pos
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    x = self.decoder_embed(self.norm(x))
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:]


# ---------------------------------------------------------------- objective ---

def smoothing_targets(grid_hw, sigma):
  """[N, N] soft targets exp(-d^2/sigma^2) over the true h x w grid, each row
  normalised (sigma > 0)."""
  h, w = grid_hw
  rows, cols = np.divmod(np.arange(h * w), w)
  d2 = (rows[:, None] - rows[None])**2 + (cols[:, None] - cols[None])**2
  t = np.exp(-d2 / sigma**2)
  return torch.from_numpy((t / t.sum(axis=1, keepdims=True)).astype(np.float32))


def sample_masks(batch, num_patches, num_visible, num_keep_pe, generator):
  """ids_keep [B, K] (a random K of N patches, random order) and drop_mask
  [B, K] (True: PE dropped) with exactly num_keep_pe PEs kept per sample."""
  ids_keep = torch.rand(batch, num_patches, generator=generator).argsort(1)
  ids_keep = ids_keep[:, :num_visible]
  kept = torch.rand(batch, num_visible, generator=generator).argsort(1)
  drop_mask = torch.ones(batch, num_visible, dtype=torch.bool)
  drop_mask.scatter_(1, kept[:, :num_keep_pe], False)
  return ids_keep, drop_mask


def droppos_loss(model, imgs, ids_keep, drop_mask, targets, tau=0.1):
  """The authors' objective, computed as they do: attentive weights from a
  gradient-free forward of the whole image (softmax of cos(cls, patch)/tau
  over all N patches, gathered at ids_keep, renormalised), then the
  soft-target cross entropy of the PE-dropped tokens weighted over the batch.
  Returns (loss, attentive weights [B, K])."""
  with torch.no_grad():
    feats = model.forward_features(imgs)
    cos = torch.nn.functional.cosine_similarity(feats[:, :1], feats[:, 1:],
                                                dim=-1)
    attn = torch.gather((cos / tau).softmax(dim=-1), 1, ids_keep)
    attn = attn / attn.sum(dim=1, keepdim=True)
  logits = model(imgs, ids_keep, drop_mask)
  ce = -(targets[ids_keep] * logits.log_softmax(dim=-1)).sum(dim=-1)
  w = drop_mask.float() * attn
  return (w * ce).sum() / w.sum(), attn


def clip_per_tensor_(grads, max_norm):
  """Scales each gradient tensor whose L2 norm exceeds max_norm down to it."""
  norms = torch._foreach_norm(grads)
  torch._foreach_mul_(grads, [torch.clamp(max_norm / (n + 1e-6), max=1.)
                              for n in norms])


def decay_groups(model, weight_decay):
  """AdamW parameter groups as MAE's: no decay on 1-D tensors (biases, norms)."""
  params = [p for p in model.parameters() if p.requires_grad]
  return [{'params': [p for p in params if p.ndim > 1],
           'weight_decay': weight_decay},
          {'params': [p for p in params if p.ndim <= 1], 'weight_decay': 0.}]


# --------------------------------------------------------------------- MAE ---

class MAE(VisionTransformer):
  """MAE's MaskedAutoencoderViT (facebookresearch/mae, models_mae.py): the
  encoder on the visible patches, `mask_token`, `decoder_*` with the fixed
  sin-cos `decoder_pos_embed`, and its loss. MAE draws its masks from
  torch.rand inside the forward; here they are given, as `ids_keep`, and
  turned into MAE's `ids_shuffle`/`ids_restore` so the rest runs as MAE's."""

  def __init__(self, image_hw, patch, dim, depth, heads, decoder_dim,
               decoder_depth, decoder_heads, norm_pix_loss=True, seed=0):
    super().__init__(image_hw, patch, dim, depth, heads, seed=seed)
    self.patch = patch
    self.norm_pix_loss = norm_pix_loss
    self.decoder_embed = nn.Linear(dim, decoder_dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
    self.decoder_pos_embed = nn.Parameter(
        torch.from_numpy(sincos_pos_embed(decoder_dim, self.grid)),
        requires_grad=False)
    self.decoder_blocks = nn.ModuleList(
        [Block(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
    self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
    self.decoder_pred = nn.Linear(decoder_dim, patch**2 * 3)
    _randomise(self, seed + 1)

  def patchify(self, imgs):
    p = self.patch
    h, w = imgs.shape[2] // p, imgs.shape[3] // p
    x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
    x = torch.einsum('nchpwq->nhwpqc', x)
    return x.reshape(imgs.shape[0], h * w, p**2 * 3)

  def masking(self, x, ids_keep):
    """MAE's random_masking with the kept ids given (first in ids_shuffle)."""
    n, length, d = x.shape
    kept = torch.zeros(n, length, dtype=torch.bool).scatter_(1, ids_keep, True)
    rest = torch.stack([torch.nonzero(~row).flatten() for row in kept])
    ids_shuffle = torch.cat([ids_keep, rest], dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones(n, length)
    mask[:, :ids_keep.shape[1]] = 0
    return x_masked, torch.gather(mask, 1, ids_restore), ids_restore

  def forward_encoder(self, imgs, ids_keep):
    x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
    x, mask, ids_restore = self.masking(x, ids_keep)
    cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    x = torch.cat((cls, x), dim=1)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x), mask, ids_restore

  def forward_decoder(self, x, ids_restore):
    x = self.decoder_embed(x)
    mask_tokens = self.mask_token.repeat(
        x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

  def forward_loss(self, imgs, pred, mask):
    target = self.patchify(imgs)
    if self.norm_pix_loss:
      mean = target.mean(dim=-1, keepdim=True)
      var = target.var(dim=-1, keepdim=True)
      target = (target - mean) / (var + 1.e-6)**.5
    loss = ((pred - target)**2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()

  def forward(self, imgs, ids_keep):
    latent, mask, ids_restore = self.forward_encoder(imgs, ids_keep)
    pred = self.forward_decoder(latent, ids_restore)
    return self.forward_loss(imgs, pred, mask), pred, mask
