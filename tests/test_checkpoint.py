"""Orbax checkpoints: keep-N, interrupted saves ignored, restore onto a new mesh."""
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from droppos_jax import checkpoint, sharding


def state_on(mesh, mode):
  state = {'w': jnp.arange(64 * 128, dtype=jnp.float32).reshape(64, 128),
           'b': jnp.ones((8,)), 'step': jnp.int32(7)}
  shardings = sharding.state_shardings(jax.eval_shape(lambda: state), mesh, mode)
  return jax.device_put(state, shardings), shardings


def test_keep_last_n_and_ignore_interrupted_save(tmp_path):
  mesh = sharding.make_mesh()
  state, _ = state_on(mesh, 'fsdp')
  ckpts = checkpoint.Checkpoints(str(tmp_path), max_to_keep=2)
  for step in (1, 2, 3):
    ckpts.save(step, state, {'step': step})
  ckpts.close()
  assert ckpts.all_steps() == [2, 3]
  # A save killed mid-write leaves only a temporary folder behind.
  os.makedirs(tmp_path / '4.orbax-checkpoint-tmp' / 'state')
  reopened = checkpoint.Checkpoints(str(tmp_path), max_to_keep=2)
  assert reopened.latest_step() == 3
  assert reopened.restore_meta(3) == {'step': 3}
  reopened.close()


def test_restore_fsdp_checkpoint_onto_single_device(tmp_path):
  mesh8 = sharding.make_mesh()
  state, shardings8 = state_on(mesh8, 'fsdp')
  assert state['w'].sharding.spec == P(None, 'data')  # largest divisible dim
  ckpts = checkpoint.Checkpoints(str(tmp_path), max_to_keep=1)
  ckpts.save(5, state, {'data_step': 5})
  ckpts.close()

  mesh1 = sharding.make_mesh(1)
  _, shardings1 = state_on(mesh1, 'dp')
  abstract = checkpoint.abstract_with_shardings(
      jax.eval_shape(lambda: state), shardings1)
  restored, meta = checkpoint.Checkpoints(str(tmp_path), max_to_keep=1).restore(
      5, abstract)
  assert meta == {'data_step': 5}
  assert restored['w'].sharding.num_devices == 1
  np.testing.assert_array_equal(restored['w'], state['w'])


def test_fsdp_leaf_specs():
  assert sharding.leaf_spec((768, 3072), 'fsdp', 8) == P(None, 'data')
  assert sharding.leaf_spec((768,), 'fsdp', 8) == P()          # small: replicated
  assert sharding.leaf_spec((3, 1000, 7), 'fsdp', 8) == P(None, 'data', None)
  assert sharding.leaf_spec((999, 7), 'fsdp', 8) == P()        # nothing divides
  assert sharding.leaf_spec((768, 3072), 'dp', 8) == P()


def test_relative_directory_is_accepted(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state, _ = state_on(sharding.make_mesh(), 'dp')
  ckpts = checkpoint.Checkpoints('runs/x/checkpoints', max_to_keep=1)
  ckpts.save(1, state, {'step': 1})
  ckpts.close()
  assert os.path.isdir(tmp_path / 'runs' / 'x' / 'checkpoints' / '1' / 'state')
