"""Device mesh, state shardings (data-parallel or FSDP) and multi-host start-up."""
from __future__ import annotations

import os
from typing import Any, Optional

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
SHARDING_MODES = ('dp', 'fsdp')
# Leaves smaller than this stay replicated under FSDP: splitting biases and
# LayerNorm scales saves nothing and costs a collective each.
FSDP_MIN_SIZE = 2**12


def cluster_environment() -> Optional[str]:
  """Names the multi-process launcher visible in the environment, if any."""
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  if ',' in env.get('TPU_WORKER_HOSTNAMES', ''):
    return 'Cloud TPU pod (TPU_WORKER_HOSTNAMES)'
  if int(env.get('SLURM_NTASKS', '1')) > 1:
    return 'SLURM'
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'Open MPI'
  return None


def maybe_initialize_distributed(mode: str) -> None:
  """Calls `jax.distributed.initialize()` if asked ('yes') or if 'auto' finds
  a cluster launcher; logs the decision either way."""
  if mode not in ('auto', 'yes', 'no'):
    raise ValueError(f'--distributed={mode!r}; valid: auto, yes, no.')
  found = cluster_environment()
  if mode == 'yes' or (mode == 'auto' and found):
    logging.info('Multi-host start-up: jax.distributed.initialize() (%s).',
                 found or 'requested by --distributed=yes')
    jax.distributed.initialize()
  else:
    logging.info('Single-process run (--distributed=%s, cluster env: %s).',
                 mode, found)
  logging.info('Process %d/%d, %d local / %d global devices (%s).',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)


def make_mesh(num_devices: int = -1) -> Mesh:
  """1-D mesh over the first `num_devices` devices (-1: all) on axis 'data'."""
  devices = jax.devices()
  if num_devices == -1:
    num_devices = len(devices)
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f'num_devices={num_devices} but {len(devices)} devices are '
                     'available; use -1 for all of them.')
  # Auto axes: XLA propagates shardings (the pjit model), not jax's explicit mode.
  return jax.make_mesh((num_devices,), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:num_devices])


def check_batch_divides(batch_size: int, mesh: Mesh, name: str = 'batch_size'):
  n, procs = mesh.devices.size, jax.process_count()
  if batch_size <= 0 or batch_size % n or batch_size % procs:
    raise ValueError(
        f'{name}={batch_size} must be a positive multiple of the {n} devices '
        f'(and of the {procs} processes) so every device gets an equal share; '
        f'e.g. {max(n, procs) * max(1, batch_size // max(n, procs))}.')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def leaf_spec(shape: tuple[int, ...], mode: str, axis_size: int) -> P:
  """Replicated for 'dp'; for 'fsdp', the largest dimension divisible by the
  data axis is split over it (small leaves stay replicated)."""
  if mode not in SHARDING_MODES:
    raise ValueError(f'sharding={mode!r}; valid: {SHARDING_MODES}.')
  if mode == 'dp' or int(np.prod(shape)) < FSDP_MIN_SIZE:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % axis_size == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: shape[i])
  return P(*[DATA_AXIS if i == axis else None for i in range(len(shape))])


def state_shardings(abstract_state: Any, mesh: Mesh, mode: str) -> Any:
  """NamedSharding for every leaf of an abstract (eval_shape) pytree."""
  size = mesh.shape[DATA_AXIS]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, leaf_spec(x.shape, mode, size)),
      abstract_state)
