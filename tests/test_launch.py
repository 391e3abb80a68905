"""The entry points take SIGTERM over before any heavy import, and the short
texts every command prints (errors, durations, sizes) are made one way."""
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

from droppos_jax import cli, formatting

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_the_entry_points_import_only_the_stdlib_before_the_command():
  loaded = subprocess.run(
      [sys.executable, '-c', 'import sys, droppos_jax.cli; print(*sys.modules)'],
      capture_output=True, text=True, check=True).stdout.split()
  heavy = {'jax', 'tensorflow', 'absl', 'numpy', 'clu', 'etils', 'orbax'}
  assert not heavy & {name.split('.')[0] for name in loaded}


def test_console_scripts_and_top_level_scripts_go_through_cli():
  scripts = tomllib.loads((REPO / 'pyproject.toml').read_text())[
      'project']['scripts']
  for target in scripts.values():
    module, function = target.split(':')
    assert module == 'droppos_jax.cli' and callable(getattr(cli, function))
  for name in ('train', 'finetune', 'probe_position', 'position_awareness',
               'visualize', 'export'):
    assert f'cli.{name}()' in (REPO / f'{name}.py').read_text()


def test_one_line_keeps_the_first_line_named_by_type():
  assert formatting.one_line(OSError(28, 'No space left on device')) == (
      'OSError: [Errno 28] No space left on device')
  assert formatting.one_line(ValueError('\n first\nsecond')) == (
      'ValueError: first')
  assert formatting.one_line(KeyError()) == 'KeyError'
  spec = ValueError('DATA_LOSS: bad chunk [tensorstore_spec={"driver": 1}]')
  assert formatting.one_line(spec) == 'ValueError: DATA_LOSS: bad chunk'
  long = formatting.one_line(ValueError('x' * 500))
  assert long == 'ValueError: ' + 'x' * formatting.MAX_MESSAGE + '...'


@pytest.mark.parametrize('seconds, clock, duration', [
    (0.0125, '0:00:00', '12.5 ms'), (3.4, '0:00:03', '3.4 s'),
    (2400, '0:40:00', '40 min'), (5400, '1:30:00', '90 min'),
    (7200, '2:00:00', '2.0 h'), (3 * 86400, '72:00:00', '3.0 days')])
def test_clock_and_duration(seconds, clock, duration):
  assert formatting.clock(seconds) == clock
  assert formatting.duration(seconds) == duration


def test_an_unknown_eta_is_a_question_mark():
  assert formatting.clock(float('nan')) == '?'


def test_size():
  assert formatting.size(5 * 2**20) == '5.0 MiB'
  assert formatting.size(2**30 / 10) == '0.10 GiB'
  assert formatting.size(20 * 2**30) == '20.00 GiB'


COMMAND_WITH_EXTRA_FLAGS = '''
from absl import flags
from droppos_jax import launch

def command(config, workdir, **extra):
  print(workdir, sorted(extra.items()))

launch.run(command, default_config=launch.packaged_configs()['export'],
           extra_flags=[lambda: flags.DEFINE_integer('copies', 1, 'How many.'),
                        launch.allow_config_change_flag])
'''


@pytest.mark.slow
def test_the_command_gets_its_extra_flags_by_name(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-c', COMMAND_WITH_EXTRA_FLAGS, '--copies=3',
       '--allow_config_change', f'--workdir={tmp_path}'],
      capture_output=True, text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == (
      f"{tmp_path} [('allow_config_change', True), ('copies', 3)]")
