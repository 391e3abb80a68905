"""Multi-host start-up: which cluster launcher (if any) started this
process, the jax.distributed settings from flags and environment, and the
start itself.

On Cloud TPU pods and under SLURM the coordinator, the number of processes
and this process's id are detected; elsewhere give all three on every
process (--coordinator_address, --num_processes, --process_id, or
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""
from __future__ import annotations

import os
import re
from typing import Optional

from absl import logging
import jax

from droppos_jax.errors import UserError

# --distributed: auto starts jax.distributed when a cluster is detected or
# the settings are given.
MODES = ('auto', 'yes', 'no')
_ENV = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS',
        'num_processes': 'JAX_NUM_PROCESSES', 'process_id': 'JAX_PROCESS_ID'}


def cluster_environment() -> Optional[str]:
  """Names the multi-process launcher visible in the environment, if any."""
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  if ',' in env.get('TPU_WORKER_HOSTNAMES', ''):
    return 'Cloud TPU pod (TPU_WORKER_HOSTNAMES)'
  if int(env.get('SLURM_NTASKS', '1') or 1) > 1:
    return 'SLURM'
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return 'Open MPI'
  return None


def distributed_settings(mode: str, coordinator_address: Optional[str],
                         num_processes: Optional[int],
                         process_id: Optional[int]) -> Optional[dict]:
  """Validated jax.distributed.initialize() arguments, or None for a
  single-process run. Flags win over the environment; what neither gives is
  left to JAX's cluster detection (TPU pods, SLURM, MPI)."""
  if mode not in MODES:
    raise UserError(f'--distributed={mode!r}; valid: {", ".join(MODES)}.')
  given = {'coordinator_address': coordinator_address,
           'num_processes': num_processes, 'process_id': process_id}
  for key, var in _ENV.items():
    if given[key] is None and os.environ.get(var):
      given[key] = os.environ[var]
  found = cluster_environment() or (
      'flags' if any(v is not None for v in given.values()) else None)
  if mode == 'no' or (mode == 'auto' and not found):
    return None
  address = given['coordinator_address']
  if address is not None and not re.fullmatch(r'\[?[\w.:-]+\]?:\d{1,5}', address):
    raise UserError(f'coordinator address {address!r} must be host:port, e.g. '
                    '10.0.0.2:8476.')
  if address is not None and not 0 < int(address.rsplit(':', 1)[1]) < 65536:
    raise UserError(f'coordinator address {address!r}: the port must be in '
                    '1..65535.')
  for key in ('num_processes', 'process_id'):
    value = given[key]
    if value is None:
      continue
    try:
      given[key] = int(value)
    except ValueError:
      raise UserError(f'{key}={value!r} ({_ENV[key]} or --{key}) must be an '
                      'integer.') from None
  n, i = given['num_processes'], given['process_id']
  if n is not None and n < 1:
    raise UserError(f'num_processes={n} must be >= 1.')
  if i is not None and n is not None and not 0 <= i < n:
    raise UserError(f'process_id={i} must be in [0, {n}) for num_processes={n}.')
  detected = cluster_environment() not in (None, 'JAX_COORDINATOR_ADDRESS')
  if not detected and None in (address, n, i):
    missing = [f'--{k} (or {_ENV[k]})' for k, v in (
        ('coordinator_address', address), ('num_processes', n),
        ('process_id', i)) if v is None]
    raise UserError(
        f'Multi-host start-up needs {", ".join(missing)}: no TPU pod, SLURM or '
        'MPI launcher was detected to supply them (--distributed=no runs a '
        'single process).')
  given['origin'] = found or 'requested by --distributed=yes'
  return given


def initialize_distributed(settings: Optional[dict]) -> None:
  """Starts jax.distributed (if `settings`) and logs who is who."""
  if settings is not None:
    logging.info('Multi-host start-up: jax.distributed.initialize() (%s).',
                 settings['origin'])
    jax.distributed.initialize(
        settings['coordinator_address'], settings['num_processes'],
        settings['process_id'])
  logging.info('Process %d/%d, %d local / %d global devices (%s).',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
