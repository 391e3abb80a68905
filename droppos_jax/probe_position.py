r"""Position probing of a frozen ViT (paper §4.3): train a linear position
head on PE-dropped tokens, report held-out accuracy and a per-position map.

  python probe_position.py --config configs/position_probe.py \
      --config.init=runs/demo --workdir runs/probe_demo

Writes position_probe.json (accuracy overall and per grid position, config)
and position_accuracy.png (the heat-map) to --workdir.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from droppos_jax import sharding
from droppos_jax.evaluators import position_probe

config_flags.DEFINE_config_file('config', None, 'Config file (path.py[:arg]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where the results and the heat-map go.')


def main(argv):
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config is None or not workdir:
    sys.exit('error: --config and --workdir are required.')
  start = time.perf_counter()
  try:
    results = position_probe.run_probe(
        config, workdir, sharding.make_mesh(num_devices=config.num_devices))
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  results['seconds'] = time.perf_counter() - start
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'position_probe.json'), 'w') as f:
      json.dump({'results': results, 'config': config.to_dict()}, f, indent=1)
  logging.info('%s: held-out position top-1 %.1f%% (train %.1f%%, chance '
               '%.1f%%), grid distance %.2f, %d/%d tokens, %.0f s.',
               results['init'], 100 * results['acc'], 100 * results['train_acc'],
               100 * results['chance'], results['dist_err'],
               results['num_train_tokens'], results['num_eval_tokens'],
               results['seconds'])
  print(f'position top-1 {100 * results["acc"]:.2f}% '
        f'({results["init"]}); {workdir}/position_accuracy.png')


def run():
  jax.config.update('jax_threefry_partitionable', True)
  app.run(main)


if __name__ == '__main__':
  run()
