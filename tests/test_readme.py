"""Every command the README shows in a ```bash block runs, verbatim, from a
fresh folder holding only the entry scripts (configs come from the installed
package, as for a new user), and prints what the README says it prints.

Long runs are shortened by config overrides appended to the verbatim command
(SHORTER); `pip install` and the test command itself are what CI runs around
this test, so they are skipped here. Blocks fenced as ```sh are examples for
clusters and clouds (gs://, ImageNet, pods) that cannot run offline, or runs
longer than the suite allows whose figures the README gives as measured.
"""
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ('train.py', 'finetune.py', 'probe_position.py', 'visualize.py',
           'export.py')
# Appended to a command that starts with the key: same command, less work.
SHORTER = {
    'python train.py --config configs/demo.py': [
        '--config.num_train_steps=30', '--config.warmup_epochs=0',
        '--config.eval.every_steps=15',
        '--config.log_every=10'],
    'python finetune.py': ['--config.num_train_steps=6',
                           '--config.warmup_epochs=0',
                           '--config.eval_every_epochs=1'],
    'python probe_position.py': ['--config.head.steps=20',
                                 '--config.mask_draws=1',
                                 '--config.train_data.num_images=256',
                                 '--config.eval_data.num_images=64'],
    'python -m droppos_jax.plan': ['--config.model.variant=mu/16',
                                   '--config.model.projector=tiny'],
    'python benchmarks/input_throughput.py': ['--num_files', '64', '--seconds',
                                              '1', '--warmup', '1',
                                              '--sources',
                                              'folder,folder_device_resize'],
    'python benchmarks/input_latency.py': ['--num_files', '64', '--batch', '8',
                                           '--seconds', '0.3', '--warmup', '1',
                                           '--latency_ms', '30',
                                           '--shard_records', '8'],
    'python benchmarks/step_time.py': ['--variants', 'mu/16', '--image_size',
                                       '64', '--steps', '2', '--alternations',
                                       '1', '--skip_torch'],
}
# What each command prints when it works (stdout + stderr).
PRINTS = {
    'train.py': re.compile(r'Run done: \d+/\d+ steps|Already complete'),
    'finetune.py': re.compile(r'Run done: \d+/\d+ steps.*acc1'),
    'probe_position.py': re.compile(r'position top-1 [\d.]+% \(chance'),
    'visualize.py': re.compile(r'wrote \S+\.png \(step \d+'),
    'export.py': re.compile(r'wrote \d+ tensors \(droppos\) to'),
    'droppos_jax.plan': re.compile(r'GFLOP'),
    'input_throughput.py': re.compile(r'\| ours, folder \| \d+[\s\S]*'
                                      r'\(host part\) \| \d+[\s\S]*'
                                      r'GFLOP per image'),
    'input_latency.py': re.compile(r'\| array_record \| \d+ in flight \| 30 \| '
                                   r'[\d,]+ \|[\s\S]*\| tfrecord \|'),
    'step_time.py': re.compile(r'img/s'),
}


def readme_commands() -> list[str]:
  """The shell commands of the README's ```bash blocks, continuation lines
  joined, in order."""
  text = (ROOT / 'README.md').read_text()
  commands = []
  for block in re.findall(r'```bash\n(.*?)```', text, re.S):
    for line in block.replace('\\\n', ' ').splitlines():
      line = line.split(' #')[0].strip()
      if line and not line.startswith('#'):
        commands.append(line)
  return commands


def runnable(command: str) -> list[str]:
  """The parts of `command` (split at &&) this test runs: python commands
  other than the test suite itself."""
  parts = [p.strip() for p in command.split('&&')]
  return [p for p in parts if p.startswith('python ')
          and not p.startswith('python -m pytest')]


def test_readme_shows_the_two_commands():
  commands = readme_commands()
  demo = ('pip install -r requirements.txt -e . && '
          'python train.py --config configs/demo.py --workdir runs/demo')
  assert commands[0] == demo
  assert commands[1] == 'pip install -q -r requirements.txt -e ".[test]" && python -m pytest -q'
  assert (ROOT / '.ci' / 'run').read_text().strip().endswith(
      commands[1])


@pytest.mark.slow
@pytest.mark.timeout(1500)   # every command in turn: longer than one test
def test_every_readme_command_runs_as_documented(tmp_path):
  for script in SCRIPTS:
    shutil.copy(ROOT / script, tmp_path / script)
  shutil.copytree(ROOT / 'benchmarks', tmp_path / 'benchmarks')
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  ran = 0
  for command in readme_commands():
    for part in runnable(command):
      extra = next((v for k, v in SHORTER.items() if part.startswith(k)), [])
      argv = [sys.executable] + shlex.split(part)[1:] + extra
      out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=900)
      log = out.stdout + out.stderr
      assert out.returncode == 0, f'{part}\n{log[-3000:]}'
      assert 'Traceback' not in log, f'{part}\n{log[-3000:]}'
      words = shlex.split(part)
      program = words[2] if words[1] == '-m' else words[1]
      key = next(k for k in PRINTS if program.endswith(k))
      assert PRINTS[key].search(log), f'{part} printed:\n{log[-2000:]}'
      ran += 1
  assert ran >= 10, ran
