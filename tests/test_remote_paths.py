"""Every user path goes through one path layer (etils epath): a whole run on a
non-local scheme -- pre-training, resume after a preemption, fine-tuning
from its workdir -- works offline on the test file system fake://, and
nothing of it lands on the local disk under its literal name."""
import json
import os
import signal

import numpy as np
import pytest

import fakefs
from droppos_jax import finetune, train
from droppos_jax.data import device
from droppos_jax.configs import finetune as finetune_config
from droppos_jax.configs import pretrain as pretrain_config


@pytest.fixture
def store(tmp_path, monkeypatch):
  root = tmp_path / 'store'
  root.mkdir()
  monkeypatch.chdir(tmp_path)  # a stray os.path/open would write ./fake:/...
  with fakefs.fake_filesystem(str(root), monkeypatch):
    yield root
  assert not (tmp_path / 'fake:').exists(), 'a user path bypassed epath'


def pretrain_config_(steps):
  c = pretrain_config.get_config('runlocal')
  c.num_train_steps = steps
  c.ckpt_every = 2
  return c


@pytest.mark.slow
def test_pretrain_resume_and_finetune_on_a_remote_scheme(store, monkeypatch,
                                                         caplog):
  workdir = 'fake://bucket/pre'
  original = device.global_batches

  def preempted_after_3(iterator, sharding, **kwargs):
    for i, batch in enumerate(original(iterator, sharding, **kwargs)):
      if i == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  with monkeypatch.context() as m:
    m.setattr(device, 'global_batches', preempted_after_3)
    first = train.train(pretrain_config_(6), workdir)
  assert first['stopped'] == 'preempted' and first['last_step'] == 4
  assert 'No TensorBoard events in fake://bucket/pre' in caplog.text
  resumed = train.train(pretrain_config_(6), workdir)
  assert sorted(resumed['losses']) == [5, 6] and resumed['complete']

  run_dir = store / 'bucket' / 'pre'
  assert json.loads((run_dir / 'config.json').read_text())['num_train_steps'] == 6
  logged = [json.loads(l)['step'] for l in
            (run_dir / 'train_metrics.jsonl').read_text().splitlines()]
  assert logged == [1, 2, 3, 4, 5, 6]
  assert sorted(d.name for d in (run_dir / 'checkpoints').iterdir()
                if d.name.isdigit()) == ['2', '4', '6']
  assert not (run_dir / 'lock.json').exists()

  c = finetune_config.get_config('runlocal')
  c.model.variant = 'mu/16'
  c.image_size = 32
  c.init.path = workdir
  out = finetune.train(c, 'fake://bucket/ft')
  assert out['complete'] and np.isfinite(list(out['losses'].values())).all()
  assert (store / 'bucket' / 'ft' / 'checkpoints').is_dir()
