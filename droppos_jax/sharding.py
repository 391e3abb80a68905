"""Device mesh and shardings: batches split over every device, parameters and
optimizer state replicated or split over the 'fsdp' axis.

The mesh has two axes, as maxtext and big_vision lay out pods:
  data  plain data parallelism; across TPU slices (multi-slice, over DCN) it
        is the only axis, so slices exchange gradients but not parameters;
  fsdp  data parallelism that also splits the parameters and optimizer state
        (ZeRO-3 / FSDP), within a slice.
Config `mesh.data` and `mesh.fsdp` give the sizes; one of them may be -1 (the
rest of the devices). The default data=-1, fsdp=1 replicates the state;
data=1, fsdp=-1 splits it over every device of a slice.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from droppos_jax.errors import UserError

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = MESH_AXES  # a batch is split over every device
# Leaves smaller than this stay replicated under FSDP: splitting biases and
# LayerNorm scales saves nothing and costs a collective each.
FSDP_MIN_SIZE = 2**12


def _num_slices(devices: Sequence[Any]) -> int:
  return len({getattr(d, 'slice_index', 0) for d in devices})


def mesh_shape(mesh_cfg, num_devices: int, num_slices: int = 1
               ) -> tuple[int, int]:
  """(data, fsdp) sizes for `num_devices`; -1 takes the remaining devices."""
  data, fsdp = int(mesh_cfg['data']), int(mesh_cfg['fsdp'])
  if data == fsdp == -1 or 0 in (data, fsdp) or min(data, fsdp) < -1:
    raise UserError(f'mesh.data={data}, mesh.fsdp={fsdp}: each is a positive '
                    'size or -1 (the remaining devices), at most one -1.')
  if fsdp == -1:
    fsdp = max(num_devices // data, 1)
  if data == -1:
    data = max(num_devices // fsdp, 1)
  if data * fsdp != num_devices:
    raise UserError(f'mesh.data={mesh_cfg["data"]} x mesh.fsdp='
                    f'{mesh_cfg["fsdp"]} does not use the {num_devices} '
                    'devices exactly; make the product equal the device count '
                    '(or set one of them to -1).')
  if data % num_slices:
    raise UserError(f'mesh.data={data} must be a multiple of the {num_slices} '
                    'slices: the fsdp axis stays within a slice.')
  return data, fsdp


def make_mesh(mesh_cfg=None, num_devices: int = -1,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
  """The ('data', 'fsdp') mesh over the first `num_devices` devices (-1: all)
  of `devices` (default jax.devices(); the planner passes a TPU topology's)."""
  devices = list(jax.devices() if devices is None else devices)
  if num_devices == -1:
    num_devices = len(devices)
  if not 1 <= num_devices <= len(devices):
    raise UserError(f'num_devices={num_devices} but {len(devices)} devices are '
                    'available; use -1 for all of them.')
  devices = devices[:num_devices]
  slices = _num_slices(devices)
  data, fsdp = mesh_shape(mesh_cfg or {'data': -1, 'fsdp': 1}, num_devices,
                          slices)
  if slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(
        (data // slices, fsdp), (slices, 1), devices)
  elif devices[0].platform == 'tpu':
    grid = mesh_utils.create_device_mesh((data, fsdp), devices)
  else:  # CPU/GPU: process-major order keeps each host's rows contiguous.
    grid = np.asarray(devices).reshape(data, fsdp)
  # Auto axes: XLA propagates shardings (the pjit model).
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def check_batch_divides(batch_size: int, mesh: Mesh, name: str = 'batch_size'):
  n, procs = mesh.devices.size, jax.process_count()
  if batch_size <= 0 or batch_size % n or batch_size % procs:
    raise UserError(
        f'{name}={batch_size} must be a positive multiple of the {n} devices '
        f'(and of the {procs} processes) so every device gets an equal share; '
        f'e.g. {max(n, procs) * max(1, batch_size // max(n, procs))}.')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def local_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
  """[start, stop) of the global batch that this process's devices hold.

  The stream gives each process exactly these rows of every global batch;
  the mesh is laid out so that they are contiguous.
  """
  rows = set()
  for index in sharding.addressable_devices_indices_map(
      (global_batch,)).values():
    rows.update(range(*index[0].indices(global_batch)))
  start, stop = min(rows), max(rows) + 1
  if len(rows) != stop - start:
    raise ValueError(f'This process holds {len(rows)} rows of the batch in '
                     f'[{start}, {stop}), not one contiguous block.')
  return start, stop


def leaf_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
  """Replicated, or (fsdp > 1) the largest dimension divisible by the fsdp
  axis split over it; small leaves stay replicated."""
  if fsdp_size == 1 or int(np.prod(shape)) < FSDP_MIN_SIZE:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: shape[i])
  return P(*['fsdp' if i == axis else None for i in range(len(shape))])


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedSharding for every leaf of an abstract (eval_shape) pytree."""
  size = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(x.shape, size)),
                      abstract_state)
