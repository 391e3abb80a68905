"""Classification heads on a ViT encoder for the evaluation protocols: MAE's
fine-tuning and linear probing, as the DropPos paper uses them.

`ViTClassifier` is MAE's global-pool fine-tuning model: an encoder without a
final norm that pools the mean of its patch tokens (not [cls]), then `fc_norm`
(LayerNorm) and `head`. Its tree {'encoder', 'fc_norm', 'head'} is exactly
what `convert.torch_to_flax(kind='classifier')` makes of a fine-tuned PyTorch
file.

`LinearProbe` is MAE's linear-probing model: a frozen encoder (its pooled
feature after the final norm: [cls] or patch mean) -> BatchNorm without
affine -> `head`.

Which tokens are pooled and whether there is a final norm are fields of the
encoder (`pool`, `final_norm`); both models read its 'pooled' output.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from droppos_jax.errors import UserError
from droppos_jax.models import vit

PROBE_FEATURES = vit.POOLS


class ViTClassifier(nn.Module):
  """Fine-tuning model: encoder 'pooled' -> fc_norm -> head (std 2e-5).

  Built by classifier_from_variant as MAE's (no final norm, GAP); drop-path
  and compute dtype come from `encoder`; logits are float32.
  """
  encoder: vit.VisionTransformer
  num_classes: int

  def flops_per_example(self, image_hw) -> int:
    """Analytic matmul FLOPs of one image's train step: forward and backward
    (3x the forward) of the blocks and head; the patch embedding's forward
    and weight gradient (the images take none)."""
    embed, blocks = self.encoder.forward_flops(image_hw)
    return 2 * embed + 3 * (blocks + 2 * self.encoder.width * self.num_classes)

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    x = self.encoder(images, train=train)['pooled']
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.encoder.dtype, name='fc_norm')(x)
    logits = nn.Dense(self.num_classes, dtype=self.encoder.dtype,
                      kernel_init=nn.initializers.normal(2e-5),
                      name='head')(x)
    return logits.astype(jnp.float32)


class LinearProbe(nn.Module):
  """Frozen encoder 'pooled' -> BatchNorm (no affine) -> head (std 0.01).

  The encoder always runs in inference mode under stop_gradient; the trainer
  also keeps it out of the optimizer. BatchNorm statistics live in the
  'batch_stats' collection (momentum 0.9, eps 1e-6 as PyTorch's 0.1/1e-6).
  """
  encoder: vit.VisionTransformer
  num_classes: int

  def flops_per_example(self, image_hw) -> int:
    """The frozen encoder's forward, and 3x the head's (its gradient)."""
    return (sum(self.encoder.forward_flops(image_hw))
            + 3 * 2 * self.encoder.width * self.num_classes)

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    x = jax.lax.stop_gradient(self.encoder(images, train=False)['pooled'])
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6,
                     use_scale=False, use_bias=False, name='head_norm')(
                         x.astype(jnp.float32))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                    name='head')(x)


def classifier_from_variant(variant: str, num_classes: int, *,
                            drop_path_rate: float = 0., dtype: Any = jnp.float32,
                            remat: bool = False) -> ViTClassifier:
  return ViTClassifier(vit.vit_from_variant(
      variant, drop_path_rate=drop_path_rate, dtype=dtype, remat=remat,
      final_norm=False, pool='gap'), num_classes)


def linear_probe_from_variant(variant: str, num_classes: int, *,
                              feature: str = 'cls', dtype: Any = jnp.float32
                              ) -> LinearProbe:
  if feature not in PROBE_FEATURES:
    raise UserError(f'Probe feature {feature!r}; valid: {PROBE_FEATURES}.')
  return LinearProbe(vit.vit_from_variant(variant, dtype=dtype, pool=feature),
                     num_classes)
