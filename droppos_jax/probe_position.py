r"""Position probing of a frozen ViT (paper §4.3): train a linear position
head on PE-dropped tokens, report held-out accuracy and a per-position map.

  python probe_position.py --config configs/position_probe.py \
      --config.init.path=runs/demo --workdir runs/probe_demo

Writes position_probe.json (accuracy overall and per grid position, config)
and position_accuracy.png (the heat-map) to --workdir (local or gs://).
"""
from __future__ import annotations

import json
import time

from absl import logging
from etils import epath
import jax

from droppos_jax import launch, sharding
from droppos_jax.errors import writing
from droppos_jax.evaluators import position_probe


def probe(config, workdir: str) -> dict:
  start = time.perf_counter()
  results = position_probe.run_probe(
      config, workdir, sharding.make_mesh(num_devices=config.num_devices))
  results['seconds'] = time.perf_counter() - start
  if jax.process_index() == 0:
    path = epath.Path(workdir) / 'position_probe.json'
    with writing(path):
      path.write_text(json.dumps({'results': results,
                                  'config': config.to_dict()}, indent=1))
  logging.info('%s: held-out position top-1 %.1f%% (train %.1f%%, chance '
               '%.1f%%), grid distance %.2f, %d/%d tokens, %.0f s.',
               results['init'], 100 * results['acc'], 100 * results['train_acc'],
               100 * results['chance'], results['dist_err'],
               results['num_train_tokens'], results['num_eval_tokens'],
               results['seconds'])
  print(f'position top-1 {100 * results["acc"]:.2f}% (chance '
        f'{100 * results["chance"]:.2f}%; {results["init"]}); '
        f'{workdir}/position_accuracy.png')
  return results


def main():
  launch.run(probe, config_kind='position_probe', output_help='Folder for '
             'the results and the heat-map (local or gs://).')


if __name__ == '__main__':
  main()
