r"""Times the pre-training step and the attentive pass's share of it.

  python benchmarks/step_time.py --variant Ti/16 --image_size 224 --batch 32

Measures, for one jitted train step (forward + backward + AdamW), the wall
time with and without attentive reconstruction; the difference is the cost
of the extra full, gradient-free forward pass. Also reports bf16 compute.
Prints a table; asserts nothing.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import ml_collections

from droppos_jax import optim, pretrain
from droppos_jax.models import droppos


def time_step(variant, image_size, batch, *, attentive, dtype, projector,
              repeats):
  model = droppos.droppos_from_config(variant, projector, dtype=dtype)
  cfg = pretrain.ObjectiveConfig(
      image_hw=(image_size, image_size),
      patch_size=model.encoder.patch_size, attentive=attentive)
  opt = ml_collections.ConfigDict(dict(b1=0.9, b2=0.95, weight_decay=0.05,
                                       clip='per_tensor', clip_norm=5.0))
  lr = optim.lr_schedule(1e-4, total_steps=1000, warmup_steps=10)
  tx = optim.make_optimizer(opt, lr)
  params = model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
                      jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool))['params']
  state = {'step': jnp.int32(0), 'params': params, 'opt_state': tx.init(params)}
  step = jax.jit(pretrain.make_train_step(
      model, tx, cfg, sigma_fn=lambda s: 1.0, lr_fn=lr, seed=0),
                 donate_argnums=(0,))
  images = jax.random.normal(jax.random.key(1), (batch, image_size, image_size, 3))
  state, m = step(state, images)  # compile
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(repeats):
    state, m = step(state, images)
  jax.block_until_ready(m)
  return (time.perf_counter() - t0) / repeats


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--variant', default='Ti/16')
  p.add_argument('--projector', default='default')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--repeats', type=int, default=5)
  a = p.parse_args()
  print(f'{a.variant}, {a.image_size}px, batch {a.batch}, projector '
        f'{a.projector}, {jax.devices()[0].platform} x{jax.device_count()}')
  rows = {}
  for name, attentive, dtype in (('f32', True, jnp.float32),
                                 ('f32 no-attentive', False, jnp.float32),
                                 ('bf16', True, jnp.bfloat16),
                                 ('bf16 no-attentive', False, jnp.bfloat16)):
    rows[name] = time_step(a.variant, a.image_size, a.batch, attentive=attentive,
                           dtype=dtype, projector=a.projector, repeats=a.repeats)
    print(f'  {name:18s} {rows[name] * 1e3:8.1f} ms/step '
          f'{a.batch / rows[name]:8.1f} img/s')
  for prec in ('f32', 'bf16'):
    share = 1 - rows[f'{prec} no-attentive'] / rows[prec]
    print(f'  attentive pass share of the {prec} step: {100 * share:.1f} %')


if __name__ == '__main__':
  main()
