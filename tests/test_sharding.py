"""The (data, fsdp) mesh, parameter shardings and each process's batch rows."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from droppos_jax import sharding
from droppos_jax.errors import UserError


def test_fsdp_leaf_specs():
  assert sharding.leaf_spec((768, 3072), 8) == P(None, 'fsdp')
  assert sharding.leaf_spec((768,), 8) == P()          # small: replicated
  assert sharding.leaf_spec((3, 1000, 7), 8) == P(None, 'fsdp', None)
  assert sharding.leaf_spec((999, 7), 8) == P()        # nothing divides
  assert sharding.leaf_spec((768, 3072), 1) == P()     # no fsdp axis


@pytest.mark.parametrize('cfg,shape', [
    ({'data': -1, 'fsdp': 1}, (8, 1)), ({'data': 1, 'fsdp': -1}, (1, 8)),
    ({'data': 2, 'fsdp': -1}, (2, 4)), ({'data': -1, 'fsdp': 4}, (2, 4)),
    ({'data': 4, 'fsdp': 2}, (4, 2))])
def test_mesh_shapes(cfg, shape):
  mesh = sharding.make_mesh(cfg)
  assert (mesh.shape['data'], mesh.shape['fsdp']) == shape


@pytest.mark.parametrize('cfg', [{'data': -1, 'fsdp': -1}, {'data': 3, 'fsdp': 2},
                                 {'data': 0, 'fsdp': 1}, {'data': -1, 'fsdp': 3}])
def test_bad_mesh_is_refused(cfg):
  with pytest.raises(UserError, match='mesh.data'):
    sharding.make_mesh(cfg)


def test_slices_get_whole_data_rows():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 4}, 16, num_slices=2) == (4, 4)
  with pytest.raises(UserError, match='multiple of the 2 slices'):
    sharding.mesh_shape({'data': 1, 'fsdp': -1}, 16, num_slices=2)


def test_local_rows_cover_the_batch():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 4})
  # One process holds every device here: all rows, contiguous.
  assert sharding.local_rows(sharding.batch_sharding(mesh), 32) == (0, 32)
  assert jax.process_count() == 1
