"""Orbax checkpoints: keep-N, interrupted saves ignored, restore onto a new mesh."""
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from droppos_jax import checkpoint, sharding


FSDP = {'data': 1, 'fsdp': -1}


def state_on(mesh):
  state = {'w': jnp.arange(64 * 128, dtype=jnp.float32).reshape(64, 128),
           'b': jnp.ones((8,)), 'step': jnp.int32(7)}
  shardings = sharding.state_shardings(jax.eval_shape(lambda: state), mesh)
  return jax.device_put(state, shardings), shardings


def manager(directory, keep):
  return checkpoint.Checkpoints(directory, max_to_keep=keep, save_every=1,
                                last_step=100)


def test_keep_last_n_and_ignore_interrupted_save(tmp_path):
  state, _ = state_on(sharding.make_mesh(FSDP))
  ckpts = manager(str(tmp_path), 2)
  for step in (1, 2, 3):
    ckpts.save(step, state, {'step': step})
  ckpts.close()
  assert ckpts.all_steps() == [2, 3]
  # A save killed mid-write leaves only a temporary folder behind.
  os.makedirs(tmp_path / '4.orbax-checkpoint-tmp' / 'state')
  reopened = manager(str(tmp_path), 2)
  assert reopened.all_steps()[-1] == 3
  assert reopened.restore_meta(3) == {'step': 3}
  reopened.close()


def test_restore_fsdp_checkpoint_onto_single_device(tmp_path):
  state, _ = state_on(sharding.make_mesh(FSDP))
  assert state['w'].sharding.spec == P(None, 'fsdp')  # largest divisible dim
  ckpts = manager(str(tmp_path), 1)
  ckpts.save(5, state, {'data_step': 5})
  ckpts.close()

  _, shardings1 = state_on(sharding.make_mesh(num_devices=1))
  abstract = checkpoint.abstract_with_shardings(
      jax.eval_shape(lambda: state), shardings1)
  restored, meta = manager(str(tmp_path), 1).restore(
      5, abstract)
  assert meta == {'data_step': 5}
  assert restored['w'].sharding.num_devices == 1
  np.testing.assert_array_equal(restored['w'], state['w'])


def test_relative_directory_is_accepted(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state, _ = state_on(sharding.make_mesh())
  ckpts = manager('runs/x/checkpoints', 1)
  ckpts.save(1, state, {'step': 1})
  ckpts.close()
  assert os.path.isdir(tmp_path / 'runs' / 'x' / 'checkpoints' / '1' / 'state')
