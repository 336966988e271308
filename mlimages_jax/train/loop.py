"""The training loop: `train_and_evaluate(config, workdir)`.

Trains the recipe of a config (ML_IMAGES.md §7 pre-training, §8
fine-tuning) on every device of every process, evaluates, writes logs and
Orbax checkpoints, and resumes exactly from the workdir. It reads top-down
like flax ``examples/imagenet``: validate, build the input, the state and the
compiled steps, then loop. Everything a run needs is validated before the
first compilation (config, batch divisibility, workdir, the dataset's
presence, features and splits, checkpoint compatibility), so mistakes cost
seconds, not a compile.

The host runs ahead of the devices and waits for them only where it must:
a logging interval's metrics are fetched (and NaN checked) once the next
step is queued, a checkpoint is handed to Orbax after the next step is
queued (its copy is taken first: the step donates the state's memory) or,
at an evaluation step, before the evaluation (which then cannot cost it), and
the learning rate is logged from the step's own metrics. It runs at most
`MAX_STEPS_IN_FLIGHT` steps ahead (step N is queued once step N - 2 is
done), so a stop or a save never waits for a long queue of steps. The
times it blocks on the input and on the devices are logged as shares of
each interval (run_log.py); `config.profile` traces a few steps. The
cross-process collectives are the ``pmean`` calls inside the compiled step
(steps.py) and, on the host, the sum of decode failures at each report and
those of the evaluation (evaluation/evaluator.py, the same path as
``mlimages evaluate``).

SIGTERM or SIGINT stops the run at the first step boundary that every
process reaches after the signal (preemption.py): that step is saved with
its input positions, the save is awaited and `preemption.Preempted` raised;
rerunning the same command resumes from it exactly. Resuming takes the
newest checkpoint that restores (store.py moves damaged ones aside).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from mlimages_jax import fileio
from mlimages_jax.checkpoints import store
from mlimages_jax.inputs import pipeline
from mlimages_jax.train import distributed
from mlimages_jax.train import finetune
from mlimages_jax.train import inputs
from mlimages_jax.train import optimizer
from mlimages_jax.train import probes as probes_lib
from mlimages_jax.train import preemption
from mlimages_jax.train import run_log
from mlimages_jax.train import schedule
from mlimages_jax.train import steps
from mlimages_jax.train.config_validation import validate_config
from mlimages_jax.train.config_validation import validate_dataset
from mlimages_jax.train.evaluator import Evaluator
from mlimages_jax.train.state import TrainState
from mlimages_jax.train.state import create_model
from mlimages_jax.train.state import create_train_state

Records = list[tuple[int, dict[str, jax.Array]]]

# Steps dispatched to the devices and not yet done: before step N is queued
# the host waits for step N - 2's metrics. One step runs while the next is
# queued, so the devices never idle on the host (benchmarks/
# train_step_bench.py), and a signal's save waits for 2 steps, not for the
# up to `log_every_steps` an unbounded host queues on a slow or busy device.
MAX_STEPS_IN_FLIGHT = 2


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike,
                       stop: threading.Event | None = None) -> TrainState:
  """Trains (resuming from `workdir` if it holds checkpoints) and evaluates.

  Returns the final, unreplicated train state. The run holds its workdir
  (`fileio.exclusive_use`, process 0): a second run into it fails at once.
  Setting `stop` from another thread (a notebook training in the background,
  interrupted) ends a one-process run as a signal does: at the next step,
  with its checkpoint, raising `preemption.Preempted`.
  """
  validate_config(config)
  if stop is not None and jax.process_count() > 1:
    # Each process would see the event at another step: SIGTERM instead
    # (the preemption service agrees on one).
    raise ValueError("a stop event ends a one-process run; with several "
                     "processes send SIGTERM")
  workdir = fileio.as_path(workdir)  # Local or remote (gs://...).
  is_chief = jax.process_index() == 0
  if not is_chief:
    return _train_and_evaluate(config, workdir, is_chief, stop)
  fileio.writable_directory(workdir, "workdir")
  with fileio.exclusive_use(workdir, "workdir"):
    return _train_and_evaluate(config, workdir, is_chief, stop)


def _train_and_evaluate(config: ml_collections.ConfigDict,
                        workdir: epath.Path, is_chief: bool,
                        stop: threading.Event | None) -> TrainState:
  total_steps = schedule.num_train_steps(config)

  # Input first: a missing dataset, split or feature fails here, in seconds.
  info = validate_dataset(config)
  train_iter = inputs.create_train_iterator(config)
  metadata = store.make_metadata(
      depth=config.model.depth, num_classes=info.num_classes,
      width_multiplier=config.model.width_multiplier,
      image_size=schedule.image_size_at(config, total_steps),
      label_mode=config.label_mode, class_ids=info.class_ids,
      class_names=info.class_names, label_closure=info.label_closure,
      optimization=optimizer.optimization_record(config))
  checkpointer = store.TrainCheckpointer(
      workdir, keep=config.keep_checkpoints,
      async_save=config.async_checkpoints)
  model = create_model(config, info.num_classes)
  learning_rate_fn = schedule.create_learning_rate_fn(config)
  tx = optimizer.create_optimizer(config, learning_rate_fn)

  def fresh_state() -> TrainState:
    return create_train_state(jax.random.PRNGKey(config.seed), model,
                              config.image_size, tx)

  # The newest checkpoint that restores (damaged ones are moved aside; one
  # of another model stops the run here, before any compilation).
  resumed = checkpointer.restore_newest(jax.eval_shape(fresh_state), metadata)
  start_step = resumed[0] if resumed else 0
  if (schedule.image_size_at(config, start_step + 1)
      != schedule.image_size_at(config, 1)):
    train_iter = inputs.create_train_iterator(config, start_step + 1)
  log = run_log.RunLog(workdir, config, total_steps, is_chief)
  if schedule.schedule_scale(config) != 1:
    logging.info("Global batch %d vs reference %d: learning rates x%.4g, "
                 "schedule steps x%.4g -> %d steps.", config.batch_size,
                 config.schedule.reference_batch_size,
                 schedule.schedule_scale(config),
                 1 / schedule.schedule_scale(config), total_steps)

  # The train state: restored, fine-tuned from a backbone, or fresh. A
  # backbone is checked against the model before anything compiles.
  if resumed:
    _, state, position = resumed
    if position is not None:
      train_iter.set_state(position)
    logging.info("Resumed from step %d of %d.", start_step, total_steps)
    log.resumed(start_step)
  else:
    backbone = None
    if config.init_checkpoint:
      backbone = finetune.load_backbone(config.init_checkpoint, config,
                                        _abstract_variables(model, config))
    state = fresh_state()
    if backbone is not None:
      state = finetune.with_backbone(state, *backbone)
      logging.info("Initialised all but the %r head from %s.", finetune.HEAD,
                   config.init_checkpoint)

  p_train_step = steps.pmap_train_step(
      model, tx, config, optimizer.batch_norm_modules(state.batch_stats),
      learning_rate_fn)
  evaluator = Evaluator(config, metadata, workdir)
  probes = probes_lib.Probes(config, model)
  state = distributed.replicate(state)
  log.mark(start_step)
  profile = run_log.Profile(workdir, config, start_step, is_chief)
  stopped = None
  try:
    with preemption.watch(start_step, stop) as watcher:
      if config.eval_at_start and start_step == 0:
        _evaluate(evaluator, state, log, 0)
        probes.run(state, log, 0)
      state, stopped = _train(config, state, p_train_step, train_iter,
                              checkpointer, evaluator, probes, log, profile,
                              metadata, start_step, total_steps, watcher)
      if stopped is None and total_steps > start_step:
        _evaluate(evaluator, state, log, total_steps)
        probes.run(state, log, total_steps)
  finally:
    profile.stop()
    checkpointer.wait_until_finished()
    checkpointer.close()
    log.flush()
  if stopped is not None:
    raise preemption.Preempted(stopped, watcher.seconds_since_signal())
  return distributed.unreplicate(state)


def _train(config: ml_collections.ConfigDict, state: TrainState,
           p_train_step: Callable, train_iter: pipeline.InputIterator,
           checkpointer: store.TrainCheckpointer, evaluator: Evaluator,
           probes: probes_lib.Probes, log: run_log.RunLog,
           profile: run_log.Profile, metadata: dict[str, Any],
           start_step: int, total_steps: int,
           watcher: preemption.Watcher) -> tuple[TrainState, int | None]:
  """Steps `start_step + 1 .. total_steps`; returns the replicated state and
  the step where a signal stopped the run (None if none did).

  A logging interval's metrics are reported, and a checkpoint handed to
  Orbax, only once the next step has been dispatched: the devices never
  idle while the host logs or starts a save. A preempted run saves the step
  it stops at like a periodic checkpoint.
  """
  batches = pipeline.prefetch_to_device(train_iter, config.prefetch_to_device)
  image_size = schedule.image_size_at(config, start_step + 1)
  last_checkpoint = start_step or None
  history: Records = []  # Steps not yet reported.
  pending: Records = []  # A finished interval, reported after the next step.
  in_flight: collections.deque = collections.deque()  # Queued steps' metrics.
  to_save, stop = None, False
  for step in range(start_step + 1, total_steps + 1):
    if schedule.image_size_at(config, step) != image_size:
      # Progressive resizing: the same data position at the new size.
      image_size = schedule.image_size_at(config, step)
      position = batches.get_state()
      train_iter = inputs.create_train_iterator(config, step)
      train_iter.set_state(position)
      batches = pipeline.prefetch_to_device(train_iter,
                                            config.prefetch_to_device)
      logging.info("step %d: training images now %d px.", step, image_size)
    with log.waiting("input"):
      batch = next(batches)
    if len(in_flight) == MAX_STEPS_IN_FLIGHT:
      with log.waiting("device"):
        jax.block_until_ready(in_flight.popleft())
    profile.start_at(step)
    state, step_metrics = p_train_step(state, batch)
    in_flight.append(step_metrics)
    history.append((step, step_metrics))
    if profile.ends_at(step):
      with log.waiting("device"):  # The trace holds the step's device work.
        jax.block_until_ready(step_metrics)
      profile.stop()
    if pending:
      _report(pending, batches, log, last_checkpoint)
      pending = []
    if to_save:
      _save(checkpointer, to_save)
      last_checkpoint, to_save = to_save[0], None
    # The last step is saved anyway; the run then ends with its evaluation.
    stop = watcher.reached(step) and step < total_steps
    is_save = (stop or step % config.checkpoint_every_steps == 0
               or step == total_steps)
    is_eval = config.eval_every_steps > 0 and (
        step % config.eval_every_steps == 0)
    is_probe = probes.due(step)
    if is_save or is_eval or is_probe:
      # Both wait for this step anyway (its state), so report it now; a NaN
      # stops the run before its state is saved or evaluated.
      _report(history, batches, log, last_checkpoint)
      history = []
    elif step % config.log_every_steps == 0:
      pending, history = history, []
    if is_save:
      # Copied now: the next step reuses (donates) the state's memory.
      to_save = (step, distributed.unreplicate(state), metadata,
                 batches.get_state())
    if stop:
      logging.warning("step %d: stopping (signal); saving its checkpoint.",
                      step)
    if to_save and (stop or is_eval or is_probe):
      # No next step, or an evaluation first: the save starts now. Before an
      # evaluation it is also awaited: whatever the evaluation does (fail,
      # be killed), the step's checkpoint is on disk.
      _save(checkpointer, to_save)
      last_checkpoint, to_save = to_save[0], None
      if not stop:
        checkpointer.wait_until_finished()
    if is_eval and step != total_steps:
      _evaluate(evaluator, state, log, step)
    if is_probe and step != total_steps:
      probes.run(state, log, step)
    if stop:
      break
  if to_save:
    _save(checkpointer, to_save)
  return state, step if stop else None


def _save(checkpointer: store.TrainCheckpointer, item: tuple) -> None:
  logging.info("step %d: saving a checkpoint.", item[0])
  checkpointer.save(*item)


def _report(records: Records, batches: pipeline.DevicePrefetchIterator,
            log: run_log.RunLog, last_checkpoint: int | None) -> None:
  """Fetches `records` (waiting for their last step), stops on a NaN, logs."""
  with log.waiting("device"):
    host = list(zip([s for s, _ in records],
                    distributed.unreplicate([m for _, m in records])))
  steps.check_finite(host, last_checkpoint)
  # Every process reaches this point at the same step: a host collective.
  failures = distributed.sum_over_processes(batches.decode_failures)
  log.train(host, failures)


def _evaluate(evaluator: Evaluator, state: TrainState, log: run_log.RunLog,
              step: int) -> None:
  t0 = time.perf_counter()
  image_size = schedule.image_size_at(evaluator.config, max(step, 1))
  logging.info("step %d: evaluating on %s.", step, evaluator.config.eval_split)
  results = evaluator.run(state, image_size, step)
  log.evaluation(step, image_size, results, time.perf_counter() - t0)
  log.mark(step)  # The training rate excludes evaluation.


def _abstract_variables(model: Any, config: ml_collections.ConfigDict
                        ) -> dict[str, Any]:
  """The model's variable shapes, without computing them (for checks)."""
  shape = (1, config.image_size, config.image_size, 3)
  return jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros(shape), train=False))
