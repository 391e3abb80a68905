"""The one identity of a model: its sizes, as the config builds them, a
checkpoint's meta stores them, an export's metadata carries them and the
weight reader returns them (models/weights.py). Only foreign files have
theirs inferred from tensor shapes (models/convert.py)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from droppos_jax.models import vit


@dataclasses.dataclass(frozen=True)
class ProjectorSize:
  """The position head: its droppos.POSITION_HEADS name and sizes (None
  where the head has none)."""
  width: Optional[int]
  depth: int
  num_heads: Optional[int]
  num_positions: Optional[int]     # None: not known (no image size)
  head: str = 'transformer'


@dataclasses.dataclass(frozen=True)
class DecoderSize:
  """MAE's pixel decoder (models/mae.py)."""
  width: int
  depth: int
  num_heads: int


@dataclasses.dataclass(frozen=True)
class Architecture:
  """Sizes of the weights. num_heads is not stored in weights: it comes from
  the run config, our file metadata, the size table by width, or None."""
  width: int
  depth: int
  mlp_dim: int
  num_heads: Optional[int]
  patch_size: int
  in_chans: int = 3
  projector: Optional[ProjectorSize] = None    # DropPos only
  num_classes: Optional[int] = None            # classifiers and linear probes
  decoder: Optional[DecoderSize] = None        # MAE only

  @property
  def variant(self) -> Optional[str]:
    """'B/16'-style name when the encoder is a size of vit.VARIANTS."""
    for name, size in vit.VARIANTS.items():
      if size == (self.width, self.depth, self.mlp_dim, self.num_heads):
        return f'{name}/{self.patch_size}'
    return None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'Architecture':
    d = dict(d)
    if d.get('projector'):
      d['projector'] = ProjectorSize(**d['projector'])
    if d.get('decoder'):
      d['decoder'] = DecoderSize(**d['decoder'])
    return cls(**d)

  def vit(self, **kwargs: Any) -> vit.VisionTransformer:
    """The VisionTransformer of these sizes (`kwargs`: dtype, remat, ...)."""
    return vit.VisionTransformer(self.width, self.depth, self.mlp_dim,
                                 self.num_heads, self.patch_size, **kwargs)


def of_encoder(encoder: vit.VisionTransformer, **extra: Any) -> Architecture:
  """The Architecture of a built encoder (`extra`: projector, num_classes)."""
  return Architecture(encoder.width, encoder.depth, encoder.mlp_dim,
                      encoder.num_heads, encoder.patch_size, **extra)
