"""The one training loop of every trainer (pre-training, fine-tuning, linear
probing), in one order:

  restore -> already complete? -> batches -> compile -> for each step:
  step -> log -> evaluate (when due) -> save (cadence, last step,
  preemption) -> stop (when asked) -> report.

A trainer builds a `Setup` from its config alone (what the step needs; the
planner compiles the same object for a pod) and hands `run` its batches, its
evaluation and what a checkpoint's meta keeps beside the state.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Optional

from absl import logging
from clu import periodic_actions
from etils import epath
import jax

from droppos_jax import compiled as compiled_lib
from droppos_jax import hardware, metric_logging, run_policy


@dataclasses.dataclass
class Setup:
  """Everything a trainer's step needs, built from the config alone (no
  data read, nothing compiled): the trainer runs it, the planner compiles
  it for a pod."""
  mesh: jax.sharding.Mesh
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  lr_fn: Callable
  init_state: Callable[[], Any]
  abstract_state: Any             # ShapeDtypeStructs carrying the shardings
  batch_spec: Any                 # the step's input, ShapeDtypeStructs
  train_step: Any                 # jitted, donating the state
  flops_per_example: int          # analytic matmul FLOPs of one example
  description: str                # e.g. 'DropPos B/16' (the planner's title)
  architecture: Any               # models.architecture.Architecture

  def compile(self):
    return self.train_step.lower(self.abstract_state, self.batch_spec).compile()


@dataclasses.dataclass
class Evaluation:
  """A trainer's evaluation inside the loop: `due(step)` after which steps,
  `run(state, step)` -> metrics, logged to <prefix>_metrics.jsonl but for
  `unlogged` (e.g. the count of examples, kept in the results)."""
  due: Callable[[int], bool]
  run: Callable[[Any, int], dict[str, float]]
  prefix: str
  fields: tuple
  unlogged: tuple[str, ...] = ()


@dataclasses.dataclass
class Hooks:
  """What differs between trainers around the one loop.

  step_input: global batch -> the step's input (its `batch_spec` tree).
  fields: the console fields of the training log.
  meta: (logged train metrics, last evaluation or {}, last step's metrics)
    -> what a checkpoint keeps beside the state.
  summary: a checkpoint's meta -> the metrics a finished run reports.
  """
  step_input: Callable[[dict], Any]
  fields: tuple
  meta: Callable[[dict, dict, dict], dict]
  summary: Callable[[dict], dict]
  evaluation: Optional[Evaluation] = None
  drop_keys: tuple[str, ...] = ()


def _profiler(config, workdir: str):
  first, stop = config.get('profile_steps', (0, 0))
  if not stop:
    return None
  return periodic_actions.Profile(
      logdir=str(epath.Path(workdir) / 'profile'),
      num_profile_steps=stop - first, profile_duration_ms=None,
      first_profile=first, every_steps=None, every_secs=None)


def _report_fields(hooks: Hooks) -> tuple:
  extra = hooks.evaluation.fields if hooks.evaluation else ()
  return hooks.fields + tuple(f for f in extra if f not in hooks.fields)


def _loggers(config, workdir: str, run_: run_policy.Run, s: Setup,
             hooks: Hooks, flops: float):
  """The training log (with MFU where the chip's peak is known) and the
  evaluation's (or None), both closed when the run ends."""
  chip = hardware.chip(jax.devices()[0].device_kind)
  make = lambda **kwargs: run_.enter_context(metric_logging.MetricLogger(
      workdir, total_steps=s.total_steps, steps_per_epoch=s.steps_per_epoch,
      global_batch=config.batch_size, is_main=run_.is_main, **kwargs))
  ev = hooks.evaluation
  return (make(fields=hooks.fields, flops_per_device=flops,
               peak_tflops=chip and chip.peak_tflops),
          ev and make(prefix=ev.prefix, fields=ev.fields))


def run(config, workdir: str, run_: run_policy.Run, s: Setup,
        batches: Callable[[int], Iterator[dict]], hooks: Hooks
        ) -> dict[str, Any]:
  """Runs (or resumes) the loop; returns {'losses': {step: loss}, 'evals':
  {step: metrics}, 'last_step', 'total_steps', 'stopped' (None, 'preempted'
  or 'interrupted'), 'complete', 'metrics' (the run's summary)}.

  `batches(start_step)` gives the global batches from a step on.
  """
  profile = _profiler(config, workdir)
  ev = hooks.evaluation
  with run_:
    # --------------------------------------------------------------- restore
    state, start = run_.restore_or_init(s.init_state, s.abstract_state)
    if start >= s.total_steps:
      meta = run_.final_meta or {}
      summary = hooks.summary(meta)
      run_.report_complete(metric_logging.brief(summary,
                                                _report_fields(hooks)))
      return {'losses': {}, 'evals': {start: meta['eval']} if meta.get('eval')
              else {}, 'last_step': start,
              'total_steps': s.total_steps, 'stopped': None,
              'complete': True, 'metrics': summary}

    # ------------------------------------------------------- data, compile
    stream = batches(start)
    t0 = time.perf_counter()
    train_step = s.compile()
    flops, described = compiled_lib.describe(
        train_step, loop_count=config.get('grad_accum_steps', 1))
    logging.info('Compiled the train step in %.0f s: %s.',
                 time.perf_counter() - t0, described)
    logger, eval_logger = _loggers(config, workdir, run_, s, hooks, flops)
    recorder = metric_logging.LaggedRecorder(
        logger, start=start, log_every=config.log_every,
        last_good=run_.last_good, drop_keys=hooks.drop_keys)

    # ------------------------------------------------------------------ loop
    evals: dict[int, dict[str, float]] = {}
    started = time.perf_counter()
    logger.resume()
    step = start
    for step in range(start + 1, s.total_steps + 1):
      t = time.perf_counter()
      batch = next(stream)
      logger.add_data_wait(time.perf_counter() - t)
      state, metrics = train_step(state, hooks.step_input(batch))
      recorder.push(step, metrics)
      if profile:
        profile(step)
      save = run_.should_save(step)  # also learns of a preemption
      # Before the next step donates the state.
      if ev and not run_.stopped and (ev.due(step) or step == s.total_steps):
        recorder.flush()
        logger.pause()
        evals[step] = ev.run(state, step)
        eval_logger.add({k: v for k, v in evals[step].items()
                         if k not in ev.unlogged})
        eval_logger.flush(step)
        logger.resume()
      if save:
        recorder.flush()
        last_eval = evals[max(evals)] if evals else {}
        run_.save(step, state, {
            'architecture': s.architecture.to_dict(),
            **hooks.meta(logger.last, last_eval, metrics)})
      if run_.stopped:
        break
    recorder.flush()

  summary = hooks.summary({'metrics': logger.last,
                           'eval': evals[max(evals)] if evals else {}})
  run_.report_end(step, time.perf_counter() - started, metric_logging.brief(
      summary, _report_fields(hooks)))
  return {'losses': recorder.losses, 'evals': evals, 'last_step': step,
          'total_steps': s.total_steps, 'stopped': run_.stopped,
          'complete': step == s.total_steps, 'metrics': summary}
