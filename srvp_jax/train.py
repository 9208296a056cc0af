"""Training: one pure, jit-compiled, donated train step, data-parallel over a 'data' mesh axis.

Data parallelism is the pmap-style kind (one program per device, gradients and BatchNorm
statistics reduced across devices) written the modern way: the global batch is sharded over the
'data' axis of a ``jax.sharding.Mesh`` and ``jax.jit`` partitions the step. Means over the batch
(BatchNorm statistics, the loss) are global means, so BatchNorm is SyncBatchNorm and the result
does not depend on the number of devices. Multi-host: every process feeds its slice of the global
batch (``jax.make_array_from_process_local_data``).

Resuming is exact: the step's noise key is ``fold_in(seed_key, step)`` and the data stream is
step-indexed, so a run killed at step k and resumed ends where an uninterrupted run ends.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
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
  """Adam (betas 0.9, 0.999, eps 1e-8) with the official learning-rate schedule."""
  return optax.adam(make_lr(cfg), b1=0.9, b2=0.999, eps=1e-8)


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
    metrics = dict(terms, grad_norm=grad_norm, lr=make_lr(cfg)(state.step))
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
# Logging.
class MetricLog:
  """Scalars to ``metrics.jsonl`` and TensorBoard event files (when TensorFlow is available)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    if enabled:
      try:
        from srvp_jax.data import tf_utils  # pylint: disable=import-outside-toplevel
        tf_utils.import_tensorflow()
        from clu import metric_writers  # pylint: disable=import-outside-toplevel
        self.tb = metric_writers.SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError as e:
        logging.info('TensorBoard events disabled (%s); scalars still go to %s', e, self.path)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps({'step': int(step), **scalars}) + '\n')
    if self.tb is not None:
      self.tb.write_scalars(int(step), scalars)
      self.tb.flush()


# --------------------------------------------------------------------------------------------------
# The loop.
def _check_finite(state: TrainState, workdir: str) -> None:
  """Raises NonFiniteError (with the step) once a step has met a non-finite loss or gradient."""
  bad = int(jax.device_get(state.bad_step))
  if bad >= 0:
    raise NonFiniteError(f'non-finite loss or gradient at step {bad}; training stopped, the last good '
                         f'checkpoint in {workdir} is kept (lower lr, check the data)')


def _host_model_tree(graphdef, state: TrainState) -> dict:
  """The model variables of ``state`` as a pure dict of host arrays (what checkpoints store)."""
  return checkpoints.model_tree(jax.device_get(nnx.merge(graphdef, state.params, state.batch_stats, copy=True)))


def _load_init_from(model: SRVP, path: str) -> None:
  """Initialises ``model`` from a checkpoint folder (ours or converted) to fine-tune it."""
  src, _, step = checkpoints.load_model(path, 'best')
  checkpoints.set_model_tree(model, checkpoints.model_tree(src))
  logging.info('initialised from %s (step %d)', path, step)


def train_and_evaluate(cfg, workdir: str, *, train_batches: Callable[[int], Iterator[np.ndarray]] | None = None,
                       val_batches: Callable[[], Iterator[np.ndarray]] | None = None, tx=None,
                       progress: bool = True) -> dict[str, float]:
  """Trains for ``burnin + n_iter`` steps in ``workdir``, resuming from its latest checkpoint.

  ``train_batches(start_step)`` / ``val_batches()`` override the dataset pipelines and ``tx`` the
  optimizer (tests, benchmarks). Returns the last training metrics and validation PSNR.
  """
  config_lib.validate(cfg)
  if cfg.distributed:
    jax.distributed.initialize()
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    checkpoints.save_config(workdir, cfg)
  mesh = make_mesh(cfg)
  check_batch_divisible(int(cfg.batch_size), mesh)
  n_steps = total_steps(cfg)
  local_batch = int(cfg.batch_size) // jax.process_count()

  model = build_model(cfg, jax.random.key(int(cfg.seed)))
  tx = tx or make_optimizer(cfg)
  graphdef, state = init_state(model, tx)
  latest = checkpoints.manager(workdir, checkpoints.LATEST_DIR, int(cfg.keep_checkpoints), int(cfg.keep_period))
  best = checkpoints.manager(workdir, checkpoints.BEST_DIR, 1)
  best_psnr, start = -math.inf, 0
  if latest.latest_step() is not None:
    start = int(latest.latest_step())
    tree, meta, opt_state = checkpoints.restore(latest, start, checkpoints.model_tree(model), state.opt_state)
    checkpoints.set_model_tree(model, tree)
    _, params, stats = nnx.split(model, nnx.Param, ...)
    state = TrainState(step=jnp.asarray(start, jnp.int32), params=params, batch_stats=stats, opt_state=opt_state,
                       bad_step=jnp.full((), -1, jnp.int32))
    best_psnr = float(meta.get('best_val_psnr', -math.inf))
    logging.info('resumed from %s at step %d', workdir, start)
  elif cfg.init_from:
    _load_init_from(model, cfg.init_from)
    graphdef, state = init_state(model, tx)

  replicated = NamedSharding(mesh, P())
  state = jax.device_put(state, replicated)
  key = jax.device_put(jax.random.key(int(cfg.seed) + 1), replicated)
  step_fn = jit_train_step(make_train_step(graphdef, cfg, tx), mesh)
  val_fn = make_val_fn(graphdef, cfg, int(cfg.n_samples_test), mesh)
  log = MetricLog(workdir, enabled=is_main)

  if train_batches is None or val_batches is None:
    from srvp_jax import data  # pylint: disable=import-outside-toplevel
    dataset = data.get_dataset(cfg)
  if train_batches is None:
    batches = dataset.train_batches(local_batch, seed=int(cfg.seed), start_step=start,
                                    process_index=jax.process_index(), process_count=jax.process_count())
  else:
    batches = train_batches(start)
  if val_batches is None:
    def val_batches():
      return dataset.val_batches(int(cfg.batch_size_test), seed=int(cfg.seed), n_batches=int(cfg.n_iter_test))

  def save_latest(step: int) -> None:
    _check_finite(state, workdir)
    checkpoints.save(latest, step, _host_model_tree(graphdef, state), {'step': step, 'best_val_psnr': best_psnr},
                     jax.device_get(state.opt_state))

  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(total=n_steps, initial=start, disable=not (progress and is_main), dynamic_ncols=True, unit='step')
  metrics, val_psnr, last = {}, float('nan'), None
  step = start
  t0 = time.time()
  ckpt_every = int(cfg.chkpt_interval) or int(cfg.val_interval)
  try:
    for step in range(start + 1, n_steps + 1):
      batch = global_batch(next(batches), mesh)
      previous = last
      state, last = step_fn(state, batch, key)
      if previous is not None:  # One step in flight: the bar counts finished steps, the host stays ahead.
        jax.block_until_ready(previous['loss'])
      if step % int(cfg.log_interval) == 0 or step == n_steps:
        metrics = {k: float(v) for k, v in jax.device_get(last).items()}
        _check_finite(state, workdir)
        metrics['steps_per_s'] = int(cfg.log_interval) / max(time.time() - t0, 1e-9)
        t0 = time.time()
        log.write(step, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.1f}", nll=f"{metrics['nll']:.1f}", kl_y=f"{metrics['kl_y_0']:.2f}",
                        kl_z=f"{metrics['kl_z']:.2f}", val_psnr=f'{val_psnr:.2f}', refresh=False)
      if step % int(cfg.val_interval) == 0 or step == n_steps:
        val_psnr = validate(val_fn, state, val_batches(), key, mesh, workdir, step, cfg, graphdef, is_main)
        log.write(step, {'val_psnr': val_psnr})
        if val_psnr > best_psnr:
          best_psnr = val_psnr
          if int(jax.device_get(state.bad_step)) < 0:
            checkpoints.save(best, step, _host_model_tree(graphdef, state), {'step': step, 'val_psnr': val_psnr})
      if step % ckpt_every == 0 or step == n_steps:
        save_latest(step)
      bar.update(1)
  except KeyboardInterrupt:
    logging.warning('interrupted at step %d; saving', step)
    save_latest(int(jax.device_get(state.step)))
    raise
  finally:
    latest.wait_until_finished()
    best.wait_until_finished()
    bar.close()
  return dict(metrics, val_psnr=val_psnr, best_val_psnr=best_psnr)


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
