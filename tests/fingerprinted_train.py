"""train.py whose every training batch leaves a digest of each global row:
the multi-host tests compare host counts with it, and the product's step
carries no test probe.

  DROPPOS_FINGERPRINTS=<prefix> python tests/fingerprinted_train.py <train.py flags>

Process i appends one JSON line per batch it hands the step to
<prefix>.<i>.jsonl: {"step": s, "rows": {global row: digest of its bytes}}
for the rows its devices hold (a resumed run writes its steps again).
"""
import hashlib
import json
import os
import sys

# This checkout's package, whatever an editable install points at.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from droppos_jax import train
from droppos_jax.data import device

_train_batches = device.train_batches


def _digested(*args, start_step, **kwargs):
  path = f'{os.environ["DROPPOS_FINGERPRINTS"]}.{jax.process_index()}.jsonl'
  batches = _train_batches(*args, start_step=start_step, **kwargs)
  for step, batch in enumerate(batches, start=start_step + 1):
    rows = {}
    for shard in batch['image'].addressable_shards:
      first = shard.index[0].start or 0
      for i, row in enumerate(np.asarray(shard.data)):
        rows[first + i] = hashlib.sha1(row.tobytes()).hexdigest()[:16]
    with open(path, 'a') as f:
      f.write(json.dumps({'step': step, 'rows': rows}) + '\n')
    yield batch


if __name__ == '__main__':
  device.train_batches = _digested
  train.main()
