"""The training loop: start-up checks, the steps, and the periodic log / validation / checkpoint actions.

``train_and_evaluate`` trains for ``burnin + n_iter`` steps in a workdir (the step: ``srvp_jax.train.step``),
resuming from its latest intact checkpoint. Resuming is exact: the step's noise key is
``fold_in(seed_key, step)`` and the data stream is step-indexed, so a run killed at step k and resumed
ends where an uninterrupted run ends. Around the steps: one orbax manager (``srvp_jax.checkpoints``),
clu writers, progress report and profiler (``srvp_jax.train.runtime``), one ``PeriodicActions`` that
decides when to log, validate (``srvp_jax.train.validation``) and checkpoint, SIGINT/SIGTERM turned
into "save and stop" (a validation under way is abandoned), the workdir's run lock held from start-up to
exit, and start-up checks that all pass before anything is written in the workdir (the config is written
with the first checkpoint). Multi-host: every process feeds its slice of the global batch (``srvp_jax.sharding``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import signal
import sys
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from srvp_jax import checkpoints, data, sharding
from srvp_jax.model import abstract_model, build_model
from srvp_jax.train import step as step_lib
from srvp_jax.train import validation
from srvp_jax.train.runtime import Console, Interrupted, StopRequest, clu_modules, make_writer


class NonFiniteError(FloatingPointError):
  """The loss, the gradients or the updated state became NaN/inf; the last good checkpoint is left untouched."""


@dataclasses.dataclass(frozen=True)
class PeriodicActions:
  """When to log, validate and checkpoint: the one place these intervals are read.

  Validation runs at the official times only (multiples of ``val_interval``, not at the last
  step); checkpoints every ``chkpt_interval`` steps (default: every validation), at every
  validation (the validation PSNR ranks the checkpoint) and at the last step.
  """
  n_steps: int
  log_interval: int
  val_interval: int
  chkpt_interval: int

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> 'PeriodicActions':
    return cls(step_lib.total_steps(cfg), int(cfg['log_interval']), int(cfg['val_interval']),
               int(cfg['chkpt_interval']) or int(cfg['val_interval']))

  def log_due(self, step: int) -> bool:
    return step % self.log_interval == 0 or step == self.n_steps

  def validation_due(self, step: int) -> bool:
    return step % self.val_interval == 0

  def checkpoint_due(self, step: int) -> bool:
    return step % self.chkpt_interval == 0 or self.validation_due(step) or step == self.n_steps



# --------------------------------------------------------------------------------------------------
# The loop.
def _check_finite(state: step_lib.TrainState, folder: checkpoints.RunFolder) -> None:
  """Raises NonFiniteError (with the step) once a step has met a non-finite loss, gradient or update.

  Called before every save: the step kept the state of a bad step's start, and the saved steps all hold
  finite states (``step_lib.make_train_step``).
  """
  bad = int(jax.device_get(state.bad_step))
  if bad >= 0:
    last = folder.latest_step()
    kept = (f'the last good checkpoint (step {last}) in {folder.directory} is kept' if last is not None
            else 'no checkpoint had been written yet')
    raise NonFiniteError(f'non-finite loss, gradient or update at step {bad}; training stopped, {kept} (lower lr, '
                         'check the data)')


def train_and_evaluate(cfg, workdir: str, *, train_batches: Callable[[int], Iterator[np.ndarray]] | None = None,
                       val_batches: Callable[[int], Iterator[np.ndarray]] | None = None, tx=None,
                       progress: bool = True) -> dict[str, float]:
  """Trains for ``burnin + n_iter`` steps in ``workdir``, resuming from its latest intact checkpoint.

  ``cfg`` is a ready config (validated, e.g. by ``launch.py``); multi-host runs have called
  ``jax.distributed.initialize`` before. ``train_batches(start_step)`` (this process's slice of
  each global batch) / ``val_batches(step)`` (the batches of the validation at ``step``) override
  the dataset pipelines and ``tx`` the optimizer (tests, benchmarks). The workdir's run lock is taken
  first (another run holding it: ``checkpoints.WorkdirBusyError``) and released on any exit; nothing
  else is written in ``workdir`` before every start-up check has passed. SIGINT/SIGTERM save the last
  finished step and raise ``Interrupted`` (before the first step: nothing is written). Returns the last
  training metrics and the last and best validation PSNR.
  """
  with StopRequest() as stop, checkpoints.RunFolder(workdir).lock() as lock:
    return _train(cfg, workdir, stop, lock, train_batches, val_batches, tx, progress)


def _train(cfg, workdir: str, stop: StopRequest, lock: checkpoints.RunLock, train_batches, val_batches, tx,
           progress: bool):
  """``train_and_evaluate`` with its signal handlers installed."""
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(cfg)
  sharding.check_batch_divisible(int(cfg.batch_size), mesh)
  actions = PeriodicActions.from_config(cfg)
  n_steps = actions.n_steps
  local_batch = int(cfg.batch_size) // jax.process_count()
  replicated = sharding.replicated(mesh)
  tx = tx or step_lib.make_optimizer(cfg)

  # Start-up: abstract model and state (no compilation), checkpoints, data; nothing written yet.
  structure = abstract_model(cfg)
  graphdef, abstract_params, abstract_stats = nnx.split(structure, nnx.Param, ...)
  abstract_tree = checkpoints.abstract(checkpoints.model_tree(structure), replicated)
  abstract_opt = checkpoints.abstract(jax.eval_shape(tx.init, abstract_params), replicated)
  folder = checkpoints.RunFolder.for_run(workdir, cfg)
  start = folder.resume(cfg, abstract_tree, abstract_opt)
  init_tree = None
  if start.model is None and cfg.init_from:
    init_tree, init_step = checkpoints.RunFolder(cfg.init_from).init_variables(abstract_tree)
    logging.info('initialised from %s (step %d)', cfg.init_from, init_step)
  if train_batches is None or val_batches is None:
    dataset = data.get_dataset(cfg)
  if train_batches is None:
    batches = dataset.train_batches(local_batch, seed=int(cfg.seed), start_step=start.step,
                                    process_index=jax.process_index(), process_count=jax.process_count())
  else:
    batches = train_batches(start.step)
  if val_batches is None:
    def val_batches(step: int):
      return dataset.val_batches(int(cfg.batch_size_test), seed=validation.validation_seed(cfg, step),
                                 n_batches=int(cfg.n_iter_test))

  if start.model is not None:
    model = structure
    checkpoints.set_model_tree(model, start.model)
    _, params, stats = nnx.split(model, nnx.Param, ...)
    counters = sharding.replicate((np.int32(start.step), np.int32(-1)), mesh)
    state = step_lib.TrainState(step=counters[0], params=params, batch_stats=stats, opt_state=start.opt,
                                bad_step=counters[1])
  else:
    model = build_model(cfg, jax.random.key(int(cfg.seed)))
    if init_tree is not None:
      checkpoints.set_model_tree(model, init_tree, f'init_from={cfg.init_from}')
    graphdef, state = step_lib.init_state(model, tx)
    state = sharding.replicate(state, mesh)
  del abstract_params, abstract_stats

  if stop.requested():
    name = signal.Signals(stop.signum).name
    message = f'{name}: stopped during start-up; nothing written in {workdir}'
    print(message, file=sys.stderr, flush=True)
    raise Interrupted(message, stop.signum)

  # The run starts: from here on the workdir is written.
  if is_main:
    folder.create()
    folder.drop_metrics_after(start.step)  # Rows of steps past the restored one are replayed: each step once.
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('srvp_workdir')
  writer = make_writer(workdir)
  _, periodic_actions = clu_modules()
  console = Console(n_steps, start.step, progress, is_main)
  stop.say = console.line
  if lock.stale:
    console.line(f"took over the lock of an earlier run that is gone (pid {lock.stale.get('pid')} on "
                 f"{lock.stale.get('host')}, since {lock.stale.get('since')})")
  for step, why in start.skipped:
    where = folder.quarantine(step)
    console.line(f'skipped step {step}: {why}; moved to {where}')
  n_dev = mesh.devices.size
  console.line(f"{'resuming at' if start.step else 'training from'} step {start.step} of {n_steps} on {n_dev} "
               f'{jax.devices()[0].platform} device(s) ({jax.process_count()} process(es)); workdir {workdir}')

  key = jax.random.wrap_key_data(sharding.replicate(jax.random.key_data(jax.random.key(int(cfg.seed) + 1)), mesh))
  step_fn = step_lib.jit_train_step(step_lib.make_train_step(graphdef, cfg, tx), mesh)
  batch_psnr = validation.make_batch_psnr(graphdef, cfg, int(cfg.n_samples_test), mesh)
  report = periodic_actions.ReportProgress(num_train_steps=n_steps, writer=writer, every_steps=actions.log_interval,
                                           every_secs=None)
  hooks = [report]
  if int(cfg.profile_steps) and is_main:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=int(cfg.profile_steps),
                                          profile_duration_ms=None, first_profile=start.step + 3, every_steps=None,
                                          every_secs=None))

  saved_step = start.step if start.model is not None else None
  val_psnr, config_saved = None, False

  def save(step: int, metrics: Mapping[str, float] | None = None) -> None:
    nonlocal saved_step, config_saved
    _check_finite(state, folder)
    if is_main and not config_saved:  # With the first checkpoint: a relaunch that fails before keeps the old one.
      folder.save_config(cfg)
      config_saved = True
    tree = checkpoints.model_tree(nnx.merge(graphdef, state.params, state.batch_stats))
    folder.save(step, tree, {'step': step, **(metrics or {})}, state.opt_state, metrics)
    saved_step = step

  metrics, last, step = {}, None, start.step
  try:
    for step in range(start.step + 1, n_steps + 1):
      batch = sharding.shard_local_batch(next(batches), mesh)
      previous = last
      state, last = step_fn(state, batch, key)
      if previous is not None:  # One step in flight: the bar counts finished steps, the host stays ahead.
        jax.block_until_ready(previous['loss'])
      for hook in hooks:
        hook(step)
      postfix, step_psnr = {}, None
      if actions.log_due(step):
        _check_finite(state, folder)
        metrics = {k: float(v) for k, v in jax.device_get(last).items()}
        writer.write_scalars(step, metrics)
        postfix = dict(loss=f"{metrics['loss']:.1f}", nll=f"{metrics['nll']:.1f}",
                       kl_y=f"{metrics['kl_y_0']:.2f}", kl_z=f"{metrics['kl_z']:.2f}")
      if actions.validation_due(step):
        if stop.requested():
          console.line(f'validation of step {step} not run (interrupted); the checkpoint of step {step} has no '
                       'validation PSNR and cannot be the best')
        else:
          _check_finite(state, folder)
          try:
            with report.timed('validation'):
              media = functools.partial(validation.write_validation_media, graphdef, state, cfg=cfg, workdir=workdir,
                                        step=step) if is_main else None
              step_psnr = validation.mean_validation_psnr(batch_psnr, state, val_batches(step), cfg, step, media,
                                                          stop=stop)
            val_psnr = step_psnr
            postfix['val_psnr'] = _describe_psnr(step_psnr)
          except validation.Abandoned:  # Not needed to resume: the checkpoint is saved at once without it.
            console.line(f'validation of step {step} abandoned ({signal.Signals(stop.signum).name}); the checkpoint '
                         f'of step {step} has no validation PSNR and cannot be the best')
      if actions.checkpoint_due(step):
        finite = step_psnr is not None and math.isfinite(step_psnr)
        save(step, {checkpoints.METRIC: step_psnr} if finite else None)
        if step_psnr is not None:
          _report_validation(console, writer, folder, step, step_psnr)
      console.update(1, **postfix)
      if stop.requested():
        break
  except KeyboardInterrupt:  # Raised by a data pipeline (signals only set the flag): the state is whole.
    stop.signum = stop.signum or signal.SIGINT
  finally:
    console.close()
    if stop.signum is None:
      folder.wait_until_finished()
      writer.flush()
  if stop.signum is not None:
    try:
      _stop_and_save(stop.signum, state, save, saved_step, folder, console)
    finally:
      folder.wait_until_finished()
      writer.flush()
  best, best_psnr = folder.best_step(), folder.best_metric()
  console.line(f'done: step {n_steps}; checkpoints {folder.steps()} in {folder.directory}'
               + (f'; best validation PSNR {best_psnr:.2f} (step {best})' if best_psnr is not None else ''))
  return dict(metrics, val_psnr=val_psnr if val_psnr is not None else math.nan,
              best_val_psnr=best_psnr if best_psnr is not None else math.nan)


def _describe_psnr(value: float) -> str:
  return f'{value:.2f}' if math.isfinite(value) else 'non-finite'


def _report_validation(console: Console, writer, folder: checkpoints.RunFolder, step: int, val_psnr: float) -> None:
  """Logs one validation: its PSNR, or that it is non-finite (never a best)."""
  if not math.isfinite(val_psnr):
    console.line(f'step {step}: validation PSNR is non-finite ({val_psnr}); this checkpoint never counts as best')
    return
  writer.write_scalars(step, {checkpoints.METRIC: val_psnr})
  best = ' (best so far)' if folder.best_step() == step else ''
  console.line(f'step {step}: validation PSNR {val_psnr:.2f}{best}')


def _stop_and_save(signum: int, state: step_lib.TrainState, save, saved_step: int | None,
                   folder: checkpoints.RunFolder, console) -> None:
  """After SIGINT/SIGTERM: saves the last finished step (valid, never a donated buffer) and raises Interrupted."""
  name = signal.Signals(signum).name
  if any(x.is_deleted() for x in jax.tree.leaves(state) if isinstance(x, jax.Array)):
    message = f'{name}: stopped; the state was lost mid-step, nothing saved (checkpoints: {folder.steps()})'
  else:
    step = int(jax.device_get(state.step))
    if step == 0:
      message = f'{name}: stopped before the first step; nothing to save'
    else:
      if saved_step != step:
        save(step)
      folder.wait_until_finished()
      message = f'{name}: saved step {step} in {folder.directory}; rerun the same command to resume'
  console.line(message)
  raise Interrupted(message, signum)
