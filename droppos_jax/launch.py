r"""The command line every command shares: its flags, its config file, and
the runner that turns its outcome into an exit status (exit_codes.py).

  python train.py --config configs/demo.py --workdir runs/demo
  droppos-train --config demo --workdir runs/demo      # after `pip install .`

Every command takes `--config` (a config file `path.py[:arg]`, or the name of
a packaged config such as `demo`), `--config.<field>=<value>` overrides, its
output location, and the multi-host flags (multihost.py):

  --distributed=auto|yes|no   auto: start jax.distributed when a cluster is
                              detected (coordinator address set, Cloud TPU pod,
                              SLURM, Open MPI)
  --coordinator_address=host:port   (or JAX_COORDINATOR_ADDRESS)
  --num_processes=N                 (or JAX_NUM_PROCESSES)
  --process_id=i                    (or JAX_PROCESS_ID)
"""
from __future__ import annotations

import difflib
import importlib.resources
import importlib.util
import logging as std_logging
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from droppos_jax import multihost
from droppos_jax.errors import UserError
from droppos_jax.exit_codes import (EXIT_INTERRUPTED, STOP_STATUSES,
                                    exit_on_preemption_notice)
from droppos_jax.formatting import first_line
from droppos_jax.output_path import check_output_path


# ------------------------------------------------------------------ configs ---

def packaged_configs() -> dict[str, str]:
  """name -> file of the configs that ship with the package."""
  root = importlib.resources.files('droppos_jax.configs')
  return {f.name[:-3]: str(f) for f in root.iterdir()
          if f.name.endswith('.py') and not f.name.startswith('_')
          and f.name != 'common.py'}


def resolve_config(value: str) -> str:
  """`path.py[:arg]` or `name[:arg]` -> an existing config file [:arg].

  A path that does not exist here falls back to the packaged config of the
  same name, so `--config configs/demo.py` works from any folder once the
  package is installed.
  """
  path, sep, arg = value.partition(':')
  if os.path.isfile(path):
    return value
  name = os.path.basename(path)
  name = name[:-3] if name.endswith('.py') else name
  packaged = packaged_configs()
  if name in packaged:
    return packaged[name] + sep + arg
  raise UserError(f'--config {value!r}: no such file, and no packaged config '
                  f'named {name!r}; packaged configs: {", ".join(sorted(packaged))}.')


def _resolve_config_argv(argv: Sequence[str]) -> list[str]:
  out, it = [], iter(argv)
  for a in it:
    if a.startswith('--config='):
      a = '--config=' + _checked_config(a[len('--config='):])
    elif a == '--config':
      out.append(a)
      a = _checked_config(next(it, ''))
    out.append(a)
  return out


def _checked_config(value: str) -> str:
  """resolve_config(value), whose get_config(arg) ran: a bad `:arg` fails
  here as one line (the flag parser would wrap it in a traceback)."""
  resolved = resolve_config(value)
  try:
    _load_config_file(resolved)
  except UserError as e:
    raise UserError(f'--config {value}: {e}') from None
  return resolved


def _config_value(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of --<name> in (resolved) `argv`, if given."""
  for i, a in enumerate(argv):
    if a.startswith(f'--{name}='):
      return a.split('=', 1)[1]
    if a == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config_file(value: str) -> Any:
  """get_config(arg) of a config file `path.py[:arg]`, without overrides."""
  path, _, arg = value.partition(':')
  spec = importlib.util.spec_from_file_location('_config_for_help', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def load_config(value: str) -> Any:
  """The config a `--config` value names (a file `path.py[:arg]` or a
  packaged config's name), as the commands read it."""
  return _load_config_file(_checked_config(value))


def check_config_kind(config: Any, reference: str, command: str) -> None:
  """Refuses a config made for another command: it must have every
  top-level field of the packaged config `reference`."""
  packaged = packaged_configs()
  wanted = set(_load_config_file(packaged[reference]).keys())
  missing = sorted(wanted - set(config.keys()))
  if missing:
    fitting = sorted(name for name, path in packaged.items()
                     if wanted <= set(_load_config_file(path).keys()))
    raise UserError(
        f'This config is not one for {command}: it lacks {", ".join(missing)}. '
        f'Configs for {command}: {", ".join(fitting)} (configs/<name>.py).')


def _unknown_field_message(name: str, argv: Sequence[str],
                           default: Optional[str] = None) -> str:
  """Names the first `--<name>.<field>` override of `argv` that reaches a
  field the config (--<name>, else `default`) lacks, and the fields valid
  at that level."""
  config = _load_config_file(_config_value(argv, name) or default)
  for arg in argv:
    match = re.match(rf'--{name}\.([\w.]+)(=|$)', arg)
    if not match:
      continue
    node, where = config, name
    for part in match.group(1).split('.'):
      fields = sorted(node.keys()) if hasattr(node, 'keys') else []
      if part not in fields:
        close = difflib.get_close_matches(part, fields, n=1)
        hint = f' (did you mean {close[0]!r}?)' if close else ''
        return (f'Unknown config field {part!r} in {arg}{hint}; fields of '
                f'{where}: {", ".join(fields) or "none"}.')
      node, where = node[part], f'{where}.{part}'
  return f'An override --{name}.… names a field the config lacks.'


def _read_config(name: str, default: Optional[str] = None) -> Any:
  """The parsed config flag; its lazy errors become one-line UserErrors."""
  try:
    return getattr(flags.FLAGS, name)
  except (AttributeError, KeyError):  # An override of a field the config lacks.
    raise UserError(_unknown_field_message(
        name, _resolve_config_argv(sys.argv[1:]), default)) from None
  except (OSError, ImportError, SyntaxError) as e:
    raise UserError(f'Could not load --{name}: {first_line(e)}') from None


# ------------------------------------------------------------------- flags ---

def _define_flags(output: Optional[str], output_help: str,
                  default_config: Optional[str],
                  extra: Sequence[Callable[[], Any]]
                  ) -> tuple[list[str], list[str]]:
  """Defines the command's flags (once per process). Returns the names of
  the common ones (config, the output flag if any, the multi-host flags) and
  those of `extra`, which the command takes as keyword arguments."""
  if 'config' in flags.FLAGS:  # Tests import several commands in one process.
    return [], []
  config_flags.DEFINE_config_file(
      'config', default_config,
      'Config file path.py[:arg] or a packaged config name (e.g. demo); '
      'override fields with --config.<field>=<value>.', lock_config=True)
  if output:
    flags.DEFINE_string(output, None, output_help)
  flags.DEFINE_enum('distributed', 'auto', multihost.MODES,
                    'jax.distributed start-up: auto = when a cluster launcher '
                    'is detected or the flags below are given.')
  flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of '
                      'process 0 (or JAX_COORDINATOR_ADDRESS).')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes '
                       '(or JAX_NUM_PROCESSES).')
  flags.DEFINE_integer('process_id', None, 'Multi-host: this process, 0-based '
                       '(or JAX_PROCESS_ID).')
  common = ['config', *([output] if output else []), 'distributed',
            'coordinator_address', 'num_processes', 'process_id']
  return common, [define().name for define in extra]


def allow_config_change_flag():
  """--allow_config_change, for the trainers."""
  return flags.DEFINE_bool(
      'allow_config_change', False, 'Continue the run in --workdir although '
      'the config differs in fields that change the run (listed when refused).')


class _QuietOrbax(std_logging.Filter):
  """Orbax logs every save step at INFO; keep its warnings and errors only,
  each on one line: a failed asynchronous save also logs the exception with
  its traceback, and the exception itself reaches the run policy, which
  reports a write failure in one line (any other error keeps its traceback
  where it is raised)."""

  def filter(self, record):
    if 'orbax' not in record.pathname:
      return True
    if record.exc_info:
      record.msg = f'{record.getMessage()} ({record.exc_info[1]!r})'
      record.args, record.exc_info, record.exc_text = (), None, None
    return record.levelno >= std_logging.WARNING


def _exit_on_flag_error(parse: Callable[[], Any],
                        default_config: Optional[str]) -> Any:
  """Runs `parse` (defining or parsing the flags); a mistake in the flags
  exits with one line naming it."""
  try:
    return parse()
  except UserError as e:
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError):  # --config.<field> the config lacks
    sys.exit('error: ' + _unknown_field_message(
        'config', _resolve_config_argv(sys.argv[1:]), default_config))
  except flags.Error as e:
    sys.exit(f'error: {first_line(e)} (see --help).')


def _exit_on_user_error(what: Callable[[], Any]) -> Any:
  try:
    return what()
  except UserError as e:
    sys.exit(f'error: {e}')


def run(command: Callable[..., Any], *, output: Optional[str] = 'workdir',
        output_help: str = 'Folder for checkpoints and logs (local or gs://); '
        'rerunning resumes it.',
        default_config: Optional[str] = None,
        config_kind: Optional[str] = None,
        extra_flags: Sequence[Callable[[], Any]] = ()) -> None:
  """Runs `command(config, <output>, **extra flag values)` as the program
  (`command(config, **extra)` if `output` is None).

  `config_kind` names a packaged config whose top-level fields the given
  config must have (a pre-training config passed to fine-tuning is refused
  with the configs that fit).

  A UserError anywhere becomes `error: <message>` and exit status 1; a run
  that returns {'stopped': 'preempted'|'interrupted'} exits with 75 or 130,
  as does SIGTERM or Ctrl-C at any moment before a run takes them over.
  """
  exit_on_preemption_notice()  # before the flags, jax.distributed, the data
  # A default config is parsed, overrides included, when it is defined.
  common, extra = _exit_on_flag_error(lambda: _define_flags(
      output, output_help, default_config, extra_flags), default_config)
  for name in common + extra:  # So that --help lists them, one line each.
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])

  def parse(argv):
    return _exit_on_flag_error(
        lambda: flags.FLAGS(_resolve_config_argv(argv)), default_config)

  def main(argv):
    if len(argv) > 1:
      sys.exit(f'error: unexpected arguments {argv[1:]}; flags look like '
               '--name=value (see --help).')
    f = flags.FLAGS
    logging.get_absl_logger().addFilter(_QuietOrbax())
    config = _exit_on_user_error(lambda: _read_config('config', default_config))
    if config is None or (output and not f[output].value):
      required = '--config' + (f' and --{output} are' if output else ' is')
      sys.exit(f'error: {required} required (see --help).')
    if output:
      _exit_on_user_error(lambda: check_output_path(
          f[output].value, folder=output == 'workdir', flag=output))
    if config_kind:
      _exit_on_user_error(lambda: check_config_kind(
          config, config_kind, os.path.basename(sys.argv[0])))
    settings = _exit_on_user_error(lambda: multihost.distributed_settings(
        f.distributed, f.coordinator_address, f.num_processes, f.process_id))
    jax.config.update('jax_threefry_partitionable', True)
    multihost.initialize_distributed(settings)
    kwargs = {name: f[name].value for name in extra}
    args = (config, f[output].value) if output else (config,)
    try:
      result = command(*args, **kwargs)
    except UserError as e:
      sys.exit(f'error: {e}')
    except KeyboardInterrupt:
      print('error: interrupted (Ctrl-C) before training started; nothing '
            'was saved.', file=sys.stderr)
      sys.exit(EXIT_INTERRUPTED)
    stopped = result.get('stopped') if isinstance(result, dict) else None
    if stopped:
      sys.exit(STOP_STATUSES[stopped])

  app.run(main, flags_parser=parse)
