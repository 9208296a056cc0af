"""Training: one pure, jit-compiled, donated train step, data-parallel over a 'data' mesh axis.

Data parallelism is the pmap-style kind (one program per device, gradients and BatchNorm
statistics reduced across devices) written the modern way: the global batch is sharded over the
'data' axis of a ``jax.sharding.Mesh`` and ``jax.jit`` partitions the step. Means over the batch
(BatchNorm statistics, the loss) are global means, so BatchNorm is SyncBatchNorm and the result
does not depend on the number of devices. Multi-host: every process feeds its slice of the global
batch (``jax.make_array_from_process_local_data``).

Resuming is exact: the step's noise key is ``fold_in(seed_key, step)`` and the data stream is
step-indexed, so a run killed at step k and resumed ends where an uninterrupted run ends.

The loop around the step: one orbax manager (``srvp_jax.checkpoints``), clu writers, progress
report and profiler, one ``PeriodicActions`` that decides when to log, validate and checkpoint,
SIGINT/SIGTERM turned into "save and stop", and start-up checks that all pass before anything is
written in the workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from srvp_jax import checkpoints, objective
from srvp_jax import config as config_lib
from srvp_jax.model import SRVP, build_model


MEDIA_SAMPLES = 3  # Predicted samples per video in the validation GIF/PNG.


class NonFiniteError(FloatingPointError):
  """The loss or the gradients became NaN/inf; the last good checkpoint is left untouched."""


# --------------------------------------------------------------------------------------------------
# Optimisation.
def lr_schedule(lr: float, burnin: int, n_iter: int) -> Callable[[jax.Array], jax.Array]:
  """The official schedule: ``lr`` for ``burnin`` steps, then linear decay to 0 over ``n_iter``.

  The official loop steps its LambdaLR after every update from step ``burnin`` on, so update
  number c (0-based) uses lr * max(0, (n_iter - (c - burnin + 1)) / n_iter) once c >= burnin,
  and the last of the burnin + n_iter updates uses lr 0.
  """
  def schedule(count):
    decayed = lr * jnp.maximum(0.0, (n_iter - (count - burnin + 1)) / n_iter)
    return jnp.where(count < burnin, lr, decayed)
  return schedule


def make_optimizer(cfg: Mapping[str, Any]) -> optax.GradientTransformation:
  """Adam (betas 0.9, 0.999, eps 1e-8) with the official learning-rate schedule.

  The schedule is injected (``optax.inject_hyperparams``), so the optimizer state holds the learning
  rate its last update used: what training logs.
  """
  adam = optax.inject_hyperparams(optax.adam, static_args=('b1', 'b2', 'eps', 'eps_root'))
  return adam(learning_rate=make_lr(cfg), b1=0.9, b2=0.999, eps=1e-8)


def applied_lr(opt_state: Any) -> jax.Array | None:
  """The learning rate of the optimizer's last update (None for an optimizer without an injected one)."""
  for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, 'hyperparams')):
    if hasattr(s, 'hyperparams') and 'learning_rate' in s.hyperparams:
      return s.hyperparams['learning_rate']
  return None


def total_steps(cfg: Mapping[str, Any]) -> int:
  return int(cfg['lr_scheduling_burnin']) + int(cfg['lr_scheduling_n_iter'])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """Everything a step changes. ``bad_step`` is -1 until a non-finite loss/gradient appears."""
  step: jax.Array
  params: Any  # nnx.State of nnx.Param.
  batch_stats: Any  # nnx.State of the other variables (BatchNorm statistics).
  opt_state: Any
  bad_step: jax.Array


def init_state(model: SRVP, tx: optax.GradientTransformation) -> tuple[Any, TrainState]:
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, ...)
  return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                              opt_state=tx.init(params), bad_step=jnp.full((), -1, jnp.int32))


def make_train_step(graphdef, cfg: Mapping[str, Any], tx: optax.GradientTransformation):
  """The pure train step ``(state, batch, key) -> (state, metrics)`` (not yet jitted).

  ``key`` is the run's base key; the step's noise key is ``fold_in(key, step)``. A non-finite
  loss or gradient leaves the state unchanged and records the step in ``bad_step``.
  """
  weights = objective.loss_weights(cfg)
  n_euler = int(cfg['n_euler_steps'])

  def train_step(state: TrainState, batch: jax.Array, key: jax.Array):
    step_key = jax.random.fold_in(key, state.step)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
      noise = model.sample_train_noise(step_key, batch.shape[0], batch.shape[1])
      out = model(batch, noise, n_euler_steps=n_euler, train=True)
      terms = objective.loss_terms(batch, out, **weights)
      return terms['loss'], (terms, nnx.state(model, nnx.Not(nnx.Param)))

    grads, (terms, new_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(terms['loss']) & jnp.isfinite(grad_norm) & (state.bad_step < 0)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(
        step=jnp.where(finite, state.step + 1, state.step),
        params=keep(new_params, state.params), batch_stats=keep(new_stats, state.batch_stats),
        opt_state=keep(new_opt, state.opt_state),
        bad_step=jnp.where(finite | (state.bad_step >= 0), state.bad_step, state.step + 1))
    metrics = dict(terms, grad_norm=grad_norm)
    lr = applied_lr(new_opt)
    if lr is not None:
      metrics['lr'] = lr
    return new_state, metrics

  return train_step


def make_lr(cfg: Mapping[str, Any]) -> Callable[[jax.Array], jax.Array]:
  """The config's learning-rate schedule."""
  return lr_schedule(float(cfg['lr']), int(cfg['lr_scheduling_burnin']), int(cfg['lr_scheduling_n_iter']))


# --------------------------------------------------------------------------------------------------
# Devices.
def make_mesh(cfg: Mapping[str, Any]) -> Mesh:
  """A 1-D mesh over the 'data' axis (all devices, or the first ``mesh_data_axis`` of them)."""
  devices = jax.devices()
  n = int(cfg.get('mesh_data_axis', -1))
  if n > 0:
    if n > len(devices):
      raise config_lib.ConfigError(f'mesh_data_axis={n} but only {len(devices)} devices are visible')
    devices = devices[:n]
  return Mesh(np.asarray(devices), ('data',))


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise config_lib.ConfigError(f'batch size {global_batch} is not divisible by the {n} devices of the data axis; '
                                 f'use a multiple of {n}')


def jit_train_step(train_step, mesh: Mesh):
  """``jax.jit`` with the state replicated (and donated) and the batch sharded over 'data'."""
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))
  return jax.jit(train_step, in_shardings=(replicated, batch_sharding, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host or local values (the same on every process) -> arrays replicated over ``mesh``."""
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(jax.device_get(x))),
                      tree)


def global_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """This process's slice of the batch -> a global array sharded over 'data'."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')), local)


# --------------------------------------------------------------------------------------------------
# Validation (official protocol).
def make_val_fn(graphdef, cfg: Mapping[str, Any], n_samples: int, mesh: Mesh | None = None):
  """``(params, stats, x, key) -> per-video PSNR`` of the best of ``n_samples`` samples (official validation).

  The one best-of-N core of the evaluation (``srvp_jax.evaluation.BestOfN``), with the official
  validation's selection: samples are predicted from the first nt_cond frames, the best sample of each
  video is chosen by its PSNR over all frames (reconstruction of the conditioning frames included), and
  the reported PSNR is its mean over the predicted frames. Exactly ``n_samples`` samples compete, by
  chunks of ``val_sample_chunk``; sample s of video v has its own key, so the result does not depend on
  the chunk. Videos are sharded over the mesh's 'data' axis like training batches.
  """
  from srvp_jax import evaluation  # pylint: disable=import-outside-toplevel
  nt_cond, n_euler = int(cfg['nt_cond']), int(cfg['n_euler_steps'])
  chunk = max(1, min(int(cfg['val_sample_chunk']), n_samples))

  @functools.lru_cache(maxsize=2)
  def scorer(nt: int):
    protocol = evaluation.Protocol(nt_cond=nt_cond, nt_pred=nt - nt_cond, n_euler_steps=n_euler,
                                   cond_euler_steps=n_euler, metrics=('psnr',), select_on='all', keep_videos=False)
    return evaluation.BestOfN(graphdef, protocol, mesh=mesh)

  def val_fn(params, stats, x, key):
    best_of_n = scorer(int(x.shape[1]))
    states = best_of_n.replicate((params, stats)) if mesh is None else (params, stats)
    return evaluation.validation_psnr(best_of_n, states, x, key, n_samples, chunk)

  return val_fn


# --------------------------------------------------------------------------------------------------
# Logging and periodic actions.
def _clu():
  """clu's ``metric_writers`` and ``periodic_actions`` (they import TensorFlow: lazily, GPUs hidden from it)."""
  from srvp_jax import import_order  # pylint: disable=import-outside-toplevel
  quiet = 'tensorflow' not in sys.modules and logging.get_verbosity() < logging.INFO
  with _stderr_silenced(quiet):  # TensorFlow's C++ start-up notes (oneDNN, absl) bypass every log level.
    try:
      import_order.import_tensorflow()
    except ImportError as e:
      logging.info('TensorBoard events disabled (%s)', e)
    from clu import metric_writers, periodic_actions  # pylint: disable=import-outside-toplevel
  return metric_writers, periodic_actions


@contextlib.contextmanager
def _stderr_silenced(active: bool):
  """Points file descriptor 2 at /dev/null while active (C++ libraries write there directly)."""
  if not active:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


class JsonlWriter:
  """clu's ``MetricWriter`` interface for ``metrics.jsonl``: scalars, one JSON object per line (no TensorBoard needed)."""

  def __init__(self, path: str):
    self.path = path

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    pass

  def close(self):
    pass


def make_writer(workdir: str):
  """clu's default writer (TensorBoard + absl logging; logging only off process 0) and ``metrics.jsonl``."""
  metric_writers, _ = _clu()
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(just_logging=True)
  return metric_writers.MultiWriter([metric_writers.create_default_writer(os.path.join(workdir, 'tensorboard')),
                                     JsonlWriter(os.path.join(workdir, 'metrics.jsonl'))])


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
    return cls(total_steps(cfg), int(cfg['log_interval']), int(cfg['val_interval']),
               int(cfg['chkpt_interval']) or int(cfg['val_interval']))

  def log(self, step: int) -> bool:
    return step % self.log_interval == 0 or step == self.n_steps

  def validate(self, step: int) -> bool:
    return step % self.val_interval == 0

  def checkpoint(self, step: int) -> bool:
    return step % self.chkpt_interval == 0 or self.validate(step) or step == self.n_steps


class Console:
  """The progress bar (interactive runs, process 0) and the few lines a run prints."""

  def __init__(self, total: int, initial: int, show_bar: bool, is_main: bool):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    self.is_main = is_main
    self.bar = tqdm(total=total, initial=initial, disable=not (show_bar and is_main), dynamic_ncols=True,
                    unit='step', leave=True)
    self.postfix = {}

  def line(self, text: str) -> None:
    if self.is_main:
      if self.bar.disable:
        print(text, file=sys.stderr, flush=True)
      else:
        self.bar.write(text, file=sys.stderr)

  def update(self, n: int = 1, **postfix: str) -> None:
    self.postfix.update(postfix)
    if postfix:
      self.bar.set_postfix(self.postfix, refresh=False)
    self.bar.update(n)

  def close(self) -> None:
    self.bar.close()


# --------------------------------------------------------------------------------------------------
# Signals.
class Interrupted(KeyboardInterrupt):
  """Training stopped by SIGINT/SIGTERM (or Ctrl-C) after saving ``step``; ``exit_code`` is 128 + signal."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + int(signum)


class StopRequest:
  """SIGINT/SIGTERM set a flag the loop reads between steps (a donated step is never cut in half).

  A second signal exits at once without saving. Multi-process runs agree on the flag every step,
  so all processes save the same step together.
  """

  def __init__(self):
    self.signum, self._previous = None, {}
    self.say = lambda text: print(text, file=sys.stderr, flush=True)  # The console's, once there is one.

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      print(f'\n{signal.Signals(signum).name} again: exiting without saving', file=sys.stderr, flush=True)
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signum = signum
    self.say(f'{signal.Signals(signum).name} received: finishing the current step, then saving '
             '(send it again to exit without saving)')

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGINT, signal.SIGTERM):
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)

  def requested(self) -> bool:
    flag = self.signum is not None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
      if self.signum is None and np.max(signums):
        self.signum = int(np.max(signums))
      flag = bool(np.max(signums))
    return flag


# --------------------------------------------------------------------------------------------------
# The loop.
def _check_finite(state: TrainState, mngr) -> None:
  """Raises NonFiniteError (with the step) once a step has met a non-finite loss or gradient."""
  bad = int(jax.device_get(state.bad_step))
  if bad >= 0:
    last = mngr.latest_step()
    kept = (f'the last good checkpoint (step {last}) in {mngr.directory} is kept' if last is not None
            else 'no checkpoint had been written yet')
    raise NonFiniteError(f'non-finite loss or gradient at step {bad}; training stopped, {kept} (lower lr, check '
                         'the data)')


def _load_init_from(path: str, template: dict) -> dict:
  """The model variables of a checkpoint folder (ours or converted) to fine-tune from."""
  try:
    src, _, step = checkpoints.load_model(path, 'best')
  except checkpoints.CheckpointNotFoundError:
    src, _, step = checkpoints.load_model(path, 'latest')
  tree = checkpoints.model_tree(src)
  want = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(template)[0]}
  have = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  if want != have:
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))[:3]
    raise config_lib.ConfigError(f'init_from={path} holds another model than the config describes (e.g. {diff})')
  logging.info('initialised from %s (step %d)', path, step)
  return tree


@dataclasses.dataclass
class _Start:
  """What the start-up checks found: the step to resume from, its restored arrays, the skipped steps."""
  step: int = 0
  model: Any = None
  opt: Any = None
  skipped: list = dataclasses.field(default_factory=list)
  init_tree: Any = None


def _startup(cfg, workdir: str, mngr, abstract_model: dict, abstract_opt: Any) -> _Start:
  """Every check that can refuse the run, before anything is written in ``workdir``."""
  if checkpoints.is_legacy_layout(workdir):
    raise config_lib.ConfigError(checkpoints.legacy_hint(workdir))
  steps = sorted(mngr.all_steps(), reverse=True)
  if steps:
    conflicts = checkpoints.config_conflicts(workdir, cfg)
    if conflicts:
      raise config_lib.ConfigError(f"{workdir} holds checkpoints of another model ({'; '.join(conflicts)}); "
                                   'drop these overrides to resume, or use another --workdir')
  start = _Start()
  for step in steps:
    try:
      start.model, _, start.opt = checkpoints.restore(mngr, step, abstract_model, abstract_opt)
      start.step = int(step)
      return start
    except checkpoints.CorruptCheckpointError as e:
      start.skipped.append((int(step), str(e)))
  if start.skipped:
    raise checkpoints.CorruptCheckpointError(f'no intact checkpoint in {mngr.directory}: '
                                             f'{start.skipped[0][1]}; move the folder aside to start afresh')
  if cfg.init_from:
    start.init_tree = _load_init_from(cfg.init_from, abstract_model)
  return start


def train_and_evaluate(cfg, workdir: str, *, train_batches: Callable[[int], Iterator[np.ndarray]] | None = None,
                       val_batches: Callable[[], Iterator[np.ndarray]] | None = None, tx=None,
                       progress: bool = True) -> dict[str, float]:
  """Trains for ``burnin + n_iter`` steps in ``workdir``, resuming from its latest intact checkpoint.

  ``cfg`` is a ready config (validated, e.g. by ``launch.py``); multi-host runs have called
  ``jax.distributed.initialize`` before. ``train_batches(start_step)`` (this process's slice of
  each global batch) / ``val_batches()`` override the dataset pipelines and ``tx`` the optimizer
  (tests, benchmarks). Nothing is written in ``workdir`` before every start-up check has passed.
  SIGINT/SIGTERM save the last finished step and raise ``Interrupted`` (before the first step:
  nothing is written). Returns the last training metrics and the last and best validation PSNR.
  """
  with StopRequest() as stop:
    return _train(cfg, workdir, stop, train_batches, val_batches, tx, progress)


def _train(cfg, workdir: str, stop: StopRequest, train_batches, val_batches, tx, progress: bool):
  """``train_and_evaluate`` with its signal handlers installed."""
  is_main = jax.process_index() == 0
  mesh = make_mesh(cfg)
  check_batch_divisible(int(cfg.batch_size), mesh)
  actions = PeriodicActions.from_config(cfg)
  n_steps = actions.n_steps
  local_batch = int(cfg.batch_size) // jax.process_count()
  replicated = NamedSharding(mesh, P())
  tx = tx or make_optimizer(cfg)

  # Start-up: abstract model and state (no compilation), checkpoints, data; nothing written yet.
  abstract_model = nnx.eval_shape(lambda: build_model(cfg, jax.random.key(int(cfg.seed))))
  graphdef, abstract_params, abstract_stats = nnx.split(abstract_model, nnx.Param, ...)
  abstract_tree = checkpoints.abstract(checkpoints.model_tree(abstract_model), replicated)
  abstract_opt = checkpoints.abstract(jax.eval_shape(tx.init, abstract_params), replicated)
  mngr = checkpoints.manager(workdir, checkpoints.LATEST_DIR, int(cfg.keep_checkpoints), int(cfg.keep_period))
  start = _startup(cfg, workdir, mngr, abstract_tree, abstract_opt)
  if train_batches is None or val_batches is None:
    from srvp_jax import data  # pylint: disable=import-outside-toplevel
    dataset = data.get_dataset(cfg)
  if train_batches is None:
    batches = dataset.train_batches(local_batch, seed=int(cfg.seed), start_step=start.step,
                                    process_index=jax.process_index(), process_count=jax.process_count())
  else:
    batches = train_batches(start.step)
  if val_batches is None:
    def val_batches():
      return dataset.val_batches(int(cfg.batch_size_test), seed=int(cfg.seed), n_batches=int(cfg.n_iter_test))

  if start.model is not None:
    model = abstract_model
    checkpoints.set_model_tree(model, start.model)
    _, params, stats = nnx.split(model, nnx.Param, ...)
    counters = replicate((np.int32(start.step), np.int32(-1)), mesh)
    state = TrainState(step=counters[0], params=params, batch_stats=stats, opt_state=start.opt,
                       bad_step=counters[1])
  else:
    model = build_model(cfg, jax.random.key(int(cfg.seed)))
    if start.init_tree is not None:
      checkpoints.set_model_tree(model, start.init_tree)
    graphdef, state = init_state(model, tx)
    state = replicate(state, mesh)
  del abstract_params, abstract_stats

  if stop.requested():
    name = signal.Signals(stop.signum).name
    message = f'{name}: stopped during start-up; nothing written in {workdir}'
    print(message, file=sys.stderr, flush=True)
    raise Interrupted(message, stop.signum)

  # The run starts: from here on the workdir is written.
  if is_main:
    os.makedirs(os.path.join(workdir, checkpoints.LATEST_DIR), exist_ok=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices('srvp_workdir')
  writer = make_writer(workdir)
  _, periodic_actions = _clu()
  console = Console(n_steps, start.step, progress, is_main)
  stop.say = console.line
  for step, why in start.skipped:
    where = checkpoints.quarantine(mngr, step)
    console.line(f'skipped step {step}: {why}; moved to {where}')
  if is_main:
    checkpoints.save_config(workdir, cfg)
  n_dev = mesh.devices.size
  console.line(f"{'resuming at' if start.step else 'training from'} step {start.step} of {n_steps} on {n_dev} "
               f'{jax.devices()[0].platform} device(s) ({jax.process_count()} process(es)); workdir {workdir}')

  key = jax.random.wrap_key_data(replicate(jax.random.key_data(jax.random.key(int(cfg.seed) + 1)), mesh))
  step_fn = jit_train_step(make_train_step(graphdef, cfg, tx), mesh)
  val_fn = make_val_fn(graphdef, cfg, int(cfg.n_samples_test), mesh)
  report = periodic_actions.ReportProgress(num_train_steps=n_steps, writer=writer, every_steps=actions.log_interval,
                                           every_secs=None)
  hooks = [report]
  if int(cfg.profile_steps) and is_main:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=int(cfg.profile_steps),
                                          profile_duration_ms=None, first_profile=start.step + 3, every_steps=None,
                                          every_secs=None))

  saved_step = start.step if start.model is not None else None
  val_psnr = None

  def save(step: int, metrics: Mapping[str, float] | None = None) -> None:
    nonlocal saved_step
    _check_finite(state, mngr)
    tree = checkpoints.model_tree(nnx.merge(graphdef, state.params, state.batch_stats))
    checkpoints.save(mngr, step, tree, {'step': step, **(metrics or {})}, state.opt_state, metrics)
    saved_step = step

  metrics, last, step = {}, None, start.step
  try:
    for step in range(start.step + 1, n_steps + 1):
      batch = global_batch(next(batches), mesh)
      previous = last
      state, last = step_fn(state, batch, key)
      if previous is not None:  # One step in flight: the bar counts finished steps, the host stays ahead.
        jax.block_until_ready(previous['loss'])
      for hook in hooks:
        hook(step)
      postfix, step_psnr = {}, None
      if actions.log(step):
        _check_finite(state, mngr)
        metrics = {k: float(v) for k, v in jax.device_get(last).items()}
        writer.write_scalars(step, metrics)
        postfix = dict(loss=f"{metrics['loss']:.1f}", nll=f"{metrics['nll']:.1f}",
                       kl_y=f"{metrics['kl_y_0']:.2f}", kl_z=f"{metrics['kl_z']:.2f}")
      if actions.validate(step):
        if stop.requested():
          console.line(f'validation of step {step} not run (interrupted); the checkpoint of step {step} has no '
                       'validation PSNR and cannot be the best')
        else:
          _check_finite(state, mngr)
          with report.timed('validation'):
            step_psnr = validate(val_fn, state, val_batches(), key, mesh, workdir, step, cfg, graphdef, is_main)
          val_psnr = step_psnr
          postfix['val_psnr'] = _describe_psnr(step_psnr)
      if actions.checkpoint(step):
        finite = step_psnr is not None and math.isfinite(step_psnr)
        save(step, {checkpoints.METRIC: step_psnr} if finite else None)
        if step_psnr is not None:
          _report_validation(console, writer, mngr, step, step_psnr)
      console.update(1, **postfix)
      if stop.requested():
        break
  except KeyboardInterrupt:  # Raised by a data pipeline (signals only set the flag): the state is whole.
    stop.signum = stop.signum or signal.SIGINT
  finally:
    console.close()
    if stop.signum is None:
      mngr.wait_until_finished()
      writer.flush()
  if stop.signum is not None:
    try:
      _stop_and_save(stop.signum, state, save, saved_step, mngr, console)
    finally:
      mngr.wait_until_finished()
      writer.flush()
  best = mngr.best_step()
  best_psnr = (mngr.metrics(best) or {}).get(checkpoints.METRIC) if best is not None else None
  console.line(f'done: step {n_steps}; checkpoints {sorted(mngr.all_steps())} in {mngr.directory}'
               + (f'; best validation PSNR {best_psnr:.2f} (step {best})' if best_psnr is not None else ''))
  return dict(metrics, val_psnr=val_psnr if val_psnr is not None else math.nan,
              best_val_psnr=best_psnr if best_psnr is not None else math.nan)


def _describe_psnr(value: float) -> str:
  return f'{value:.2f}' if math.isfinite(value) else 'non-finite'


def _report_validation(console: Console, writer, mngr, step: int, val_psnr: float) -> None:
  """Logs one validation: its PSNR, or that it is non-finite (never a best)."""
  if not math.isfinite(val_psnr):
    console.line(f'step {step}: validation PSNR is non-finite ({val_psnr}); this checkpoint never counts as best')
    return
  writer.write_scalars(step, {checkpoints.METRIC: val_psnr})
  best = ' (best so far)' if mngr.best_step() == step else ''
  console.line(f'step {step}: validation PSNR {val_psnr:.2f}{best}')


def _stop_and_save(signum: int, state: TrainState, save, saved_step: int | None, mngr, console) -> None:
  """After SIGINT/SIGTERM: saves the last finished step (valid, never a donated buffer) and raises Interrupted."""
  name = signal.Signals(signum).name
  if any(x.is_deleted() for x in jax.tree.leaves(state) if isinstance(x, jax.Array)):
    message = f'{name}: stopped; the state was lost mid-step, nothing saved (checkpoints: {mngr.all_steps()})'
  else:
    step = int(jax.device_get(state.step))
    if step == 0:
      message = f'{name}: stopped before the first step; nothing to save'
    else:
      if saved_step != step:
        save(step)
      mngr.wait_until_finished()
      message = f'{name}: saved step {step} in {mngr.directory}; rerun the same command to resume'
  console.line(message)
  raise Interrupted(message, signum)


def validate(val_fn, state: TrainState, batches: Iterator[np.ndarray], key, mesh: Mesh, workdir: str, step: int,
             cfg, graphdef, write_media: bool) -> float:
  """Mean over validation videos of the best-sample PSNR; writes a GIF/PNG of the first batch."""
  total, n = 0.0, 0
  vkey = jax.random.fold_in(jax.random.key(int(cfg.seed) + 2), 0)  # Same samples at every validation.
  for i, x in enumerate(batches):
    psnr = np.asarray(val_fn(state.params, state.batch_stats, np.asarray(x, np.float32), jax.random.fold_in(vkey, i)))
    total += float(psnr.sum())
    n += len(psnr)
    if i == 0 and write_media:
      write_validation_media(graphdef, state, np.asarray(x), cfg, workdir, step)
  return total / max(n, 1)


@functools.partial(jax.jit, static_argnames=('nt_pred', 'n_euler_steps'))
def _media_predict(model: SRVP, x_cond: jax.Array, key: jax.Array, *, nt_pred: int, n_euler_steps: int):
  """MEDIA_SAMPLES predictions of every video (compiled once per run, not once per validation)."""
  noise = model.sample_pred_noise(key, MEDIA_SAMPLES, x_cond.shape[0], x_cond.shape[1], nt_pred)
  return model.predict(x_cond, noise, n_euler_steps=n_euler_steps)


def write_validation_media(graphdef, state: TrainState, x: np.ndarray, cfg, workdir: str, step: int) -> None:
  """A GIF/PNG of conditioning frames, ground truth and a few predicted samples."""
  from srvp_jax import visualize  # pylint: disable=import-outside-toplevel
  nt_cond = int(cfg.nt_cond)
  n_videos = min(int(cfg.n_val_videos_gif), len(x))
  model = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.batch_stats), copy=True)
  x = x[:n_videos]
  pred = _media_predict(model, x[:, :nt_cond], jax.random.key(step), nt_pred=x.shape[1] - nt_cond,
                        n_euler_steps=int(cfg.n_euler_steps))
  to_uint8 = lambda a: (np.clip(np.asarray(a, np.float32), 0., 1.) * 255.).astype(np.uint8)
  samples, videos = to_uint8(pred.x_pred), to_uint8(x)  # (S, B, nt_pred, H, W, C), (B, T, H, W, C)
  out = os.path.join(workdir, 'samples')
  os.makedirs(out, exist_ok=True)
  preds = {f'sample {i + 1}': samples[i] for i in range(len(samples))}
  visualize.save_comparison(os.path.join(out, f'val_{step:08d}.png'), os.path.join(out, f'val_{step:08d}.gif'),
                            videos[:, :nt_cond], videos[:, nt_cond:], preds, n_videos)
