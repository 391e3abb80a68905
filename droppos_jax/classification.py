"""Fine-tuning and linear probing (MAE's protocols, with which the DropPos
paper, arXiv 2309.03576, evaluates): models, optimizers with layer-wise lr
decay, mixup/cutmix, initial weights, and the jit-able train/eval steps."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from droppos_jax import optim, settings
from droppos_jax.errors import UserError
from droppos_jax.models import classifier, convert, vit, weights

def check_protocol(config) -> 'Protocol':
  """`config.protocol`'s Protocol, once the config has the fields it reads
  (a linear-probe config switched to 'finetune' lacks drop_path_rate...)."""
  protocol = PROTOCOLS.get(config.protocol)
  if protocol is None:
    raise UserError(f'protocol={config.protocol!r}; registered: '
                    f'{", ".join(PROTOCOLS)}.')
  settings.require_fields(config, protocol.fields,
                          chosen=f'protocol={config.protocol!r}',
                          what='protocol', config_file=protocol.config_file)
  return protocol


def build_model(config, num_classes: int):
  """The protocol's model (ViTClassifier or LinearProbe) from `config.model`."""
  return check_protocol(config).build_model(config.model, num_classes)


def _finetune_model(m, num_classes: int) -> classifier.ViTClassifier:
  if not 0 <= m.drop_path_rate < 1:
    raise UserError(f'model.drop_path_rate={m.drop_path_rate} must be in '
                    '[0, 1).')
  return classifier.classifier_from_variant(
      m.variant, num_classes, drop_path_rate=m.drop_path_rate,
      dtype=vit.compute_dtype(m.dtype), remat=m.remat)


def _linear_probe_model(m, num_classes: int) -> classifier.LinearProbe:
  return classifier.linear_probe_from_variant(
      m.variant, num_classes, feature=m.feature,
      dtype=vit.compute_dtype(m.dtype))


# --------------------------------------------------------------- optimizer ---

def layer_id(path: tuple[str, ...], depth: int) -> int:
  """MAE's get_layer_id_for_vit: embeddings 0, block k -> k + 1, the rest
  (fc_norm, head, final norm) depth + 1."""
  if path[0] == 'encoder' and len(path) > 1:
    if path[1] in ('patch_embed', 'cls_token'):
      return 0
    match = re.fullmatch(r'blocks_(\d+)', path[1])
    if match:
      return int(match.group(1)) + 1
  return depth + 1


def layer_scales(params: Any, depth: int, decay: float) -> Any:
  """lr multiplier per leaf: decay ** (depth + 1 - layer_id)."""
  def scale(path, _):
    keys = tuple(str(getattr(k, 'key', k)) for k in path)
    return decay ** (depth + 1 - layer_id(keys, depth))
  return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
  """Multiplies each update by its constant in `scales` (same tree)."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def finetune_decay_mask(params: Any) -> Any:
  """Weight decay on >1-D tensors except cls_token (MAE's no_weight_decay)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim > 1 and 'cls_token' not in jax.tree_util.keystr(path),
      params)


def make_optimizer(config, lr_fn: optax.Schedule, params: Any
                   ) -> optax.GradientTransformation:
  """The protocol's optimizer for `params`."""
  return check_protocol(config).make_optimizer(config, lr_fn, params)


def _finetune_optimizer(config, lr_fn, params):
  """AdamW with layer-wise lr decay (scaling AdamW's whole update, decay
  included, is exactly a per-group lr)."""
  o = config.optim
  optim.check_adamw(o)
  if not 0 < o.layer_decay <= 1:
    raise UserError(f'optim.layer_decay={o.layer_decay} must be in (0, 1].')
  depth = vit.decode_variant(config.model.variant).depth
  return optax.chain(
      optax.adamw(lr_fn, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                  mask=finetune_decay_mask),
      scale_by_tree(layer_scales(params, depth, o.layer_decay)))


def _linear_probe_optimizer(config, lr_fn, params):
  """LARS on the head only (biases neither decayed nor trust-ratio scaled,
  as MAE's LARS); the encoder gets no update and no optimizer state."""
  o = config.optim
  if not 0 <= o.momentum < 1:
    raise UserError(f'optim.momentum={o.momentum} must be in [0, 1) (LARS '
                    'momentum; MAE uses 0.9).')
  if not o.weight_decay >= 0:
    raise UserError(f'optim.weight_decay={o.weight_decay} must be >= 0.')
  matrices = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  lars = optax.lars(lr_fn, weight_decay=o.weight_decay,
                    weight_decay_mask=matrices, trust_ratio_mask=matrices,
                    momentum=o.momentum)
  labels = {k: 'head' if k == 'head' else 'frozen' for k in params}
  return optax.multi_transform({'head': lars, 'frozen': optax.set_to_zero()},
                               labels)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """An evaluation protocol, chosen by `config.protocol`: the fields it
  reads beyond the shared ones, the config file that has them, its model
  and optimizer, and whether a fine-tuned classifier's head initialises its
  own."""
  fields: tuple[tuple[str, str], ...]
  config_file: str
  build_model: Callable[..., Any]
  make_optimizer: Callable[..., optax.GradientTransformation]
  reuses_head: bool


# name -> Protocol: MAE's fine-tuning and linear probing.
PROTOCOLS = {
    'finetune': Protocol(
        fields=(('model', 'drop_path_rate'), ('model', 'remat'),
                ('optim', 'b1'), ('optim', 'b2'), ('optim', 'layer_decay')),
        config_file='configs/finetune.py', build_model=_finetune_model,
        make_optimizer=_finetune_optimizer, reuses_head=True),
    'linear_probe': Protocol(
        fields=(('model', 'feature'), ('optim', 'momentum')),
        config_file='configs/linear_probe.py',
        build_model=_linear_probe_model,
        make_optimizer=_linear_probe_optimizer, reuses_head=False),
}


# ---------------------------------------------------------- mixup / cutmix ---

def smooth_one_hot(labels, num_classes: int, smoothing: float):
  """timm's targets: off = smoothing / K, on = 1 - smoothing + off."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1. - smoothing) + off


def mix_batch(key, images, labels, num_classes: int, cfg):
  """timm Mixup (mode 'batch') on device: (images, soft targets, lam).

  With probability cfg.prob the batch is mixed with its reverse: cutmix (box
  of side sqrt(1 - lam) at a uniform centre, lam then set to the unboxed
  area) with probability switch_prob, else mixup; lam ~ Beta(alpha, alpha).
  Targets mix the smoothed one-hots of the two images by lam.
  """
  targets = smooth_one_hot(labels, num_classes, cfg.label_smoothing)
  if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
    return images, targets, jnp.ones(())
  k_switch, k_mixup, k_cutmix, k_apply, k_y, k_x = jax.random.split(key, 6)
  if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < cfg.switch_prob
  else:
    use_cutmix = jnp.asarray(cfg.cutmix_alpha > 0)
  beta = lambda k, a: jax.random.beta(k, a, a) if a > 0 else jnp.ones(())
  lam_mixup = beta(k_mixup, cfg.mixup_alpha)
  h, w = images.shape[1:3]
  ratio = jnp.sqrt(1. - beta(k_cutmix, cfg.cutmix_alpha))
  cut_h, cut_w = (jnp.floor(h * ratio).astype(jnp.int32),
                  jnp.floor(w * ratio).astype(jnp.int32))
  cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  lam_cutmix = 1. - ((y1 - y0) * (x1 - x0)) / (h * w)
  flipped = images[::-1]
  mixed = jnp.where(use_cutmix,
                    jnp.where(box[None, :, :, None], flipped, images),
                    lam_mixup * images + (1. - lam_mixup) * flipped)
  apply = jax.random.uniform(k_apply) < cfg.prob
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.)
  images = jnp.where(apply, mixed.astype(images.dtype), images)
  return images, lam * targets + (1. - lam) * targets[::-1], lam


# ------------------------------------------------------------------- steps ---

def _variables(state):
  extra = {'batch_stats': state['batch_stats']} if 'batch_stats' in state else {}
  return {'params': state['params'], **extra}


def make_train_step(model, tx, *, num_classes: int, mix_cfg, lr_fn: Callable,
                    seed: int):
  """Returns `train_step(state, batch) -> (state, metrics)`, ready for jit.

  `state` is {'step', 'params', 'opt_state'} (+ 'batch_stats' for the
  probe). Mixing and drop-path keys come from fold_in(key(seed), step).
  """

  def train_step(state, batch):
    step = state['step']
    mix_key, drop_key = jax.random.split(
        jax.random.fold_in(jax.random.key(seed), step))
    images, targets, lam = mix_batch(mix_key, batch['image'], batch['label'],
                                     num_classes, mix_cfg)

    def loss_fn(params):
      variables = dict(_variables(state), params=params)
      logits, updates = model.apply(
          variables, images, train=True, rngs={'dropout': drop_key},
          mutable=['batch_stats'] if 'batch_stats' in state else [])
      loss = optax.softmax_cross_entropy(logits, targets).mean()
      return loss, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'])
    param_updates, opt_state = tx.update(grads, state['opt_state'],
                                         state['params'])
    params = optax.apply_updates(state['params'], param_updates)
    new_state = dict(state, step=step + 1, params=params, opt_state=opt_state,
                     **updates)
    metrics = {'loss': loss, 'lr': lr_fn(step), 'lam': lam,
               'grad_norm': optax.tree.norm(grads),
               'param_norm': optax.tree.norm(params)}
    return new_state, metrics

  return train_step


def make_eval_step(model, num_classes: int):
  """Returns `eval_step(state, batch) -> sums` of correct top-1/top-5, loss
  and count over the real (mask 1) examples of a padded batch."""
  k = min(5, num_classes)

  def eval_step(state, batch):
    logits = model.apply(_variables(state), batch['image'], train=False)
    mask, labels = batch['mask'], batch['label']
    hits = jax.lax.top_k(logits, k)[1] == labels[:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {'correct1': (hits[:, 0] * mask).sum(),
            'correct5': (hits.any(axis=-1) * mask).sum(),
            'loss_sum': (ce * mask).sum(), 'count': mask.sum()}

  return eval_step


# ----------------------------------------------------------- initial weights ---

def load_init(init_cfg, protocol: str, abstract_params: Any,
              image_hw: tuple[int, int], patch_size: int) -> dict[str, Any]:
  """Subtrees of the model's params read from `init_cfg.path` (anything
  weights.read takes), checked against the model.

  Returns {'encoder': ...} (and 'fc_norm'/'head' from a fine-tuned model
  whose head fits, when fine-tuning). The encoder must match the model
  exactly; otherwise a UserError names the mismatched keys. Weights with a
  learned pos_embed are refused (weights.Weights.check_fixed_pe).
  """
  w = weights.read(init_cfg.path, what='init.path')
  w.check_fixed_pe()
  if w.arch.patch_size != patch_size:
    raise UserError(f'init.path: {w.description} has patch size '
                    f'{w.arch.patch_size}, the model {patch_size}: set '
                    'model.variant to the size it was trained with.')
  want = abstract_params['encoder']
  encoder = w.encoder_params(final_norm='norm' in want)
  problems = convert.compatibility_problems(encoder, want)
  if problems:
    raise UserError(f'init.path: {w.description} does not fit this model '
                    f'(another width or depth?): {len(problems)} tensors '
                    f'differ, e.g. {"; ".join(problems[:3])}.')
  if w.image_hw and tuple(w.image_hw) != tuple(image_hw):
    logging.info('Trained at %s px, now %s px: the fixed sin-cos PE is '
                 'recomputed for the new grid, nothing to resample.',
                 'x'.join(map(str, w.image_hw)), 'x'.join(map(str, image_hw)))
  out = {'encoder': encoder}
  if w.kind == 'classifier' and PROTOCOLS[protocol].reuses_head:
    heads = {k: w.params[k] for k in ('fc_norm', 'head') if k in w.params}
    problems = convert.compatibility_problems(
        heads, {k: abstract_params[k] for k in heads})
    if problems:
      logging.warning('Not loading the head of %s (re-initialised): %s.',
                      w.source, '; '.join(problems))
    else:
      out.update(heads)
  return jax.tree.map(np.asarray, out)  # host arrays: jit places them


# ----------------------------------------------------------------- logging ---
