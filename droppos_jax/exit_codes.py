"""Every command's exit statuses, and the SIGTERM handler that keeps a
preemption notice before a run starts from killing the process.

  0    done (or the run was already complete)
  1    a mistake in the input, printed as one line `error: ...`
  75   stopped by a preemption notice (SIGTERM, or the pod's own) after every
       host saved the same step (a notice during restore or compilation:
       after the first step), or at once if it came before the run started
       (nothing to save): requeue and rerun the same command to resume
       (EX_TEMPFAIL; e.g. SLURM `--requeue`, or a retry loop on status 75)
  130  stopped by Ctrl-C (SIGINT) after saving, or before training started;
       rerun to resume

Stdlib only: the entry points (droppos_jax/cli.py) install the handler
before importing TensorFlow and JAX, which take seconds.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130
# How a run that stopped early reports it (the 'stopped' entry of its result).
STOP_STATUSES = {'preempted': EXIT_PREEMPTED, 'interrupted': EXIT_INTERRUPTED}
_STOPPED_BEFORE_TRAINING = ('stopped: preemption notice (SIGTERM) before the '
                            'first step; nothing to save: rerun the same '
                            'command.')


def stop_before_training() -> None:
  """Ends the program with status 75 for a preemption notice that came
  before the run started: nothing was trained, so there is nothing to save."""
  print(_STOPPED_BEFORE_TRAINING, file=sys.stderr, flush=True)
  sys.exit(EXIT_PREEMPTED)


def exit_on_preemption_notice() -> None:
  """SIGTERM ends the program with status 75 (not killed by the signal, which
  a requeue on status 75 would miss) until a run takes it over: the run
  policy saves first, and hands it back when the run ends."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_before_training())


def _stop_now(signum, frame) -> None:
  del signum, frame
  print(_STOPPED_BEFORE_TRAINING, file=sys.stderr, flush=True)
  os._exit(EXIT_PREEMPTED)  # pylint: disable=protected-access


def exit_at_once_on_preemption_notice() -> None:
  """SIGTERM during a command's imports exits 75 without unwinding: nothing
  is open yet, and an exception raised from the handler there can be
  swallowed (it may run inside a garbage-collection callback, as JAX's
  import installs one), leaving the notice unheard."""
  signal.signal(signal.SIGTERM, _stop_now)
