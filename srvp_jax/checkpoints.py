"""A run's folder as one object (``RunFolder``): what training writes and what evaluation, fine-tuning and export read.

Layout of a run (or converted) folder::

    DIR/srvp_config.json     our full config (ml_collections keys), written with a run's first checkpoint
    DIR/config.json          the same config in the official flat form (for PyTorch export)
    DIR/metrics.jsonl        the logged scalars, one row per line (trimmed to the restored step on resume)
    DIR/run.lock             held by a training run for its life (``RunLock``): one run per workdir
    DIR/checkpoints/<step>/  one orbax CheckpointManager: 'model' (all model variables), 'opt' (the
                             optimizer state; training only), 'meta' (step, validation PSNR) and,
                             for validated steps, orbax 'metrics' ({'val_psnr': ...})

``RunFolder`` owns all of it: the run lock, resuming (the newest intact step, damaged steps moved aside), saving
a step with its metrics, the best step, restoring the model part alone, and the readers of official
experiment folders (``config.json`` + ``model.pt``, converted in memory) and of the earlier layout.
Every tree read back is checked against the config's model by one function (``check_tree``).

Failures are one exception each, never library noise: a damaged step is a ``CorruptCheckpointError``
(any damage: a missing item or file, a truncated array, unreadable metadata, non-finite values), a
failed write a ``CheckpointWriteError`` naming the step (disk full: "no space left on device"). orbax
and TensorStore leave asyncio work behind when a read or write fails (reads still in flight when
orbax closes its event loop); what that work raises later, "Event loop is closed", the abandoned
coroutines' own errors and asyncio's "Task exception was never retrieved", is dropped by filters on
``sys.unraisablehook`` and asyncio's logger that let everything else through (``silence_async_noise``).

One manager keeps, by its preservation policy, the ``keep_checkpoints`` newest steps, every
``keep_period``-th step (when set) and the step with the best finite validation PSNR. ``best``
is the manager's best step; ``latest`` its newest. Model variables are stored as a pure nested dict
(``nnx.to_pure_dict``) of the arrays as they live on the devices (sharded ``jax.Array``), and
are restored into an abstract tree that carries the target shardings. Folders of the earlier layout
(``checkpoints/<step>`` beside ``best/<step>``) still load for evaluation and export.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import math
import os
import socket
import sys
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from srvp_jax import config as config_lib
from srvp_jax import convert
from srvp_jax.model import abstract_model, build_model

CONFIG_FILE = 'srvp_config.json'
OFFICIAL_CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
LOCK_FILE = 'run.lock'
CHECKPOINT_DIR = 'checkpoints'  # The run's one checkpoint directory (latest, best and kept steps alike).
LEGACY_BEST_DIR = 'best'  # Earlier layout only: best/<step> beside checkpoints/<step>.
OFFICIAL_MODEL = 'model.pt'  # The official final weights (an official experiment folder).
METRIC = 'val_psnr'
# Config keys a checkpoint's arrays depend on: a relaunch must not change them.
STATE_KEYS = config_lib.MODEL_KEYS + ('param_dtype',)


class CheckpointNotFoundError(FileNotFoundError):
  """A folder without the checkpoint the caller asked for."""


class CorruptCheckpointError(config_lib.ConfigError):
  """A checkpoint whose files cannot be read back (missing or truncated files, flipped bytes, non-finite values)."""


class WorkdirBusyError(config_lib.ConfigError):
  """Another training run holds the workdir's lock."""

class ModelMismatchError(config_lib.ConfigError):
  """A tree whose variables (names or shapes) are not those of the config's model (``check_tree``)."""


class CheckpointWriteError(OSError):
  """A step could not be written (disk full, no permission); the steps saved before it are intact."""


# What orbax's and TensorStore's asyncio leftovers raise after a failed read or write (``silence_async_noise``).
# Their code (JAX's array serialization included: orbax writes arrays through it), and orbax's temporary folder of a
# step being written, which the reports of a failed write name (the failure itself reaches our code).
_NOISY_LIBRARIES = tuple(os.sep + name + os.sep for name in ('orbax', 'tensorstore', 'array_serialization'))
_NOISY_TEXT = (*_NOISY_LIBRARIES, '.orbax-checkpoint-tmp')
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _async_noise(unraisable: Any) -> bool:
  """Whether an unraisable exception is the asyncio leftover of a failed orbax / TensorStore read or write.

  Two kinds: TensorStore completing a read into the event loop orbax has already closed ("Event loop is
  closed", raised in asyncio's ``call_soon_threadsafe``), and orbax's coroutines abandoned by that loop,
  whose own error (the damage already reported) surfaces when they are garbage-collected.
  """
  exc = unraisable.exc_value
  if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
    return True
  code = getattr(unraisable.object, 'cr_code', None)
  if code is not None and any(name in code.co_filename for name in _NOISY_LIBRARIES):
    return True
  return any(text in str(exc) for text in _NOISY_TEXT)


def _not_async_noise(record: logging.LogRecord) -> bool:
  """asyncio's logger filter: its reports on orbax's / TensorStore's tasks and futures ("Task exception was never
  retrieved": named in the message, or raised in their code) go, the others stay."""
  exc = record.exc_info[1] if record.exc_info else None
  if any(text in f'{record.getMessage()} {exc}' for text in _NOISY_TEXT):
    return False
  tb = record.exc_info[2] if record.exc_info else None
  while tb is not None:
    if any(name in tb.tb_frame.f_code.co_filename for name in _NOISY_LIBRARIES):
      return False
    tb = tb.tb_next
  return True


def silence_async_noise() -> None:
  """Drops orbax's / TensorStore's asyncio leftovers; idempotent.

  Two places: ``sys.unraisablehook`` (``_async_noise``) and asyncio's logger, which reports their tasks
  garbage-collected with an error (``_not_async_noise``). Process-wide, since the leftovers surface after the
  failed call has returned (when the reads or writes still in flight complete, or at exit); every other
  unraisable exception and asyncio record goes on as before.
  """
  asyncio_logger = logging.getLogger('asyncio')
  if _not_async_noise not in asyncio_logger.filters:
    asyncio_logger.addFilter(_not_async_noise)
  if getattr(sys.unraisablehook, 'srvp_async_noise', False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _async_noise(unraisable):
      previous(unraisable)
  hook.srvp_async_noise = True
  sys.unraisablehook = hook


def is_no_space(e: BaseException | None) -> bool:
  """Whether ``e`` (or an exception it came from) says the disk or the quota is full.

  Python raises ``OSError`` ENOSPC / EDQUOT; TensorStore a ``ValueError`` 'RESOURCE_EXHAUSTED: ...
  [os_error_code='28']'.
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
      return True
    if any(f"os_error_code='{code}'" in str(e) for code in _NO_SPACE):
      return True
    e = e.__cause__ or e.__context__
  return False


@dataclasses.dataclass
class Resume:
  """Where a run starts: its step, the restored model / optimizer trees (None: a fresh run), the skipped steps."""
  step: int = 0
  model: Any = None
  opt: Any = None
  skipped: list = dataclasses.field(default_factory=list)  # (step, why) of unreadable steps, newest first.


def model_tree(model: nnx.Module) -> dict:
  """All model variables (parameters and BatchNorm statistics) as a pure dict of arrays."""
  return nnx.to_pure_dict(nnx.state(model))


def set_model_tree(model: nnx.Module, tree: Mapping, where: str = 'checkpoint') -> None:
  """Loads a pure dict of variables into ``model``, checking names and shapes (``check_tree``)."""
  state = nnx.state(model)
  check_tree(nnx.to_pure_dict(state), tree, where)
  nnx.replace_by_pure_dict(state, tree)
  nnx.update(model, state)


def check_tree(want: Any, have: Any, where: str) -> None:
  """ModelMismatchError (a ConfigError) unless ``have`` holds the variables of ``want`` (same names and shapes).

  ``want`` is the config's model (arrays or abstract leaves); ``have`` what a checkpoint holds (arrays,
  or orbax metadata whose leaves have a ``shape``). Names compare as '/'-joined keys (orbax stores them
  as strings).
  """
  def shapes(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
    return {'/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path): tuple(np.shape(v))
            for path, v in leaves}
  want, have = shapes(want), shapes(have)
  if set(want) != set(have):
    diff = sorted(set(want) ^ set(have))[:5]
    raise ModelMismatchError(f'{where} does not match the config\'s model: variables {diff} differ')
  for k, shape in want.items():
    if have[k] != shape:
      raise ModelMismatchError(f'{where} does not match the config\'s model: {k} has shape {have[k]}, the '
                               f'config implies {shape}')


def abstract(tree, sharding=None):
  """``jax.ShapeDtypeStruct`` leaves (with ``sharding`` when given) of a tree of arrays."""
  def leaf(x):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding or getattr(x, 'sharding', None))
  return jax.tree.map(leaf, tree)


def _best_metric(metrics: Mapping[str, Any]) -> float:
  value = metrics.get(METRIC) if metrics else None
  return float(value) if value is not None and math.isfinite(float(value)) else -math.inf


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  text = text.splitlines()[0].split(' See full TensorStore details')[0] if text else type(e).__name__
  return text[:300]


class RunFolder:
  """A run's (or a converted model's) folder: its config files and its one checkpoint directory.

  ``keep`` / ``keep_period`` are the preservation policy of the steps this object saves (a run's
  ``keep_checkpoints`` / ``keep_period``; ``for_run``). Readers need neither.
  """

  def __init__(self, path: str, keep: int | None = 3, keep_period: int | None = None):
    self.path = path
    self.directory = os.path.abspath(os.path.join(path, CHECKPOINT_DIR))
    self._policy = (keep, keep_period or None)
    self._managers: dict[str, ocp.CheckpointManager] = {}
    self._writing: int | None = None  # The step whose (asynchronous) save has not been waited for yet.

  @classmethod
  def for_run(cls, workdir: str, cfg: Mapping[str, Any]) -> 'RunFolder':
    return cls(workdir, int(cfg['keep_checkpoints']), int(cfg['keep_period']))

  # Layout. -----------------------------------------------------------------------------------------------------------
  def is_official(self) -> bool:
    """Whether this is an official experiment folder (``config.json`` + ``*.pt``, none of ours)."""
    return (os.path.isfile(os.path.join(self.path, OFFICIAL_CONFIG_FILE))
            and not os.path.isfile(os.path.join(self.path, CONFIG_FILE))
            and not os.path.isdir(self.directory)
            and any(n.endswith('.pt') for n in os.listdir(self.path)))

  def is_legacy(self) -> bool:
    """Whether it was written with the earlier layout (``best/<step>`` beside ``checkpoints/``)."""
    return os.path.isdir(os.path.join(self.path, LEGACY_BEST_DIR))

  def legacy_hint(self) -> str:
    """The one line that tells how to train on from a folder of the earlier layout."""
    return (f'{self.path} was written with the earlier checkpoint layout (best/ beside checkpoints/), which '
            'evaluation and export still read but training no longer writes: continue in a new workdir '
            f'with --config.init_from={self.path} (or evaluate it as it is)')

  def has_checkpoints(self) -> bool:
    """Whether a checkpoint directory (this layout's or the earlier one's) exists."""
    return os.path.isdir(self.directory) or self.is_legacy()

  # Config. -----------------------------------------------------------------------------------------------------------
  def save_config(self, cfg: Mapping[str, Any]) -> None:
    """Writes our config and its official ``config.json`` form, each atomically (a reader sees the old or the new)."""
    os.makedirs(self.path, exist_ok=True)
    _write_atomic(os.path.join(self.path, CONFIG_FILE), json.dumps(dict(cfg), indent=1, sort_keys=True))
    self.save_official_config(cfg)

  def save_official_config(self, cfg: Mapping[str, Any]) -> None:
    """Writes ``config.json``, the official flat form of ``cfg`` (what the official code reads), atomically."""
    _write_atomic(os.path.join(self.path, OFFICIAL_CONFIG_FILE), json.dumps(config_lib.to_official(cfg), indent=1))

  def load_config(self) -> ml_collections.ConfigDict:
    """Our config of the folder (falls back to an official ``config.json``)."""
    ours = os.path.join(self.path, CONFIG_FILE)
    if os.path.isfile(ours):
      try:
        with open(ours, encoding='utf-8') as f:
          data = json.load(f)
      except json.JSONDecodeError as e:
        raise config_lib.ConfigError(f'{ours} is not a JSON config ({e})') from None
      try:
        return config_lib.with_overrides(**data)
      except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f'{ours}: {e}') from None
    official = os.path.join(self.path, OFFICIAL_CONFIG_FILE)
    if os.path.isfile(official):
      return config_lib.load_official_json(official)
    raise CheckpointNotFoundError(f'{self.path} has neither {CONFIG_FILE} nor {OFFICIAL_CONFIG_FILE}: '
                                  'not a checkpoint folder (train with launch.py or run convert_torch_ckpt.py)')

  def config_conflicts(self, cfg: Mapping[str, Any]) -> list[str]:
    """``key: saved -> new`` for every key of STATE_KEYS on which ``cfg`` contradicts the saved config."""
    if not any(os.path.isfile(os.path.join(self.path, f)) for f in (CONFIG_FILE, OFFICIAL_CONFIG_FILE)):
      return []
    saved = self.load_config()
    return [f'{k}: {saved[k]!r} -> {cfg[k]!r}' for k in STATE_KEYS if saved[k] != cfg[k]]

  # The run. ----------------------------------------------------------------------------------------------------------
  def lock(self) -> 'RunLock':
    """Takes the run lock of the folder (``RunLock``; refused: ``WorkdirBusyError``), before anything is read.

    Process 0 of a run takes it; the other processes of a multi-process run learn from process 0 whether it was
    taken (so they do not conflict with their own run, and a second copy of the run is refused on every process).
    """
    lock, error = RunLock(os.path.join(self.path, LOCK_FILE)), None
    if jax.process_index() == 0:
      try:
        lock.acquire()
      except Exception as e:  # pylint: disable=broad-except  # Told to the other processes, then raised.
        error = e
    if jax.process_count() > 1:
      refused = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
      if refused and error is None:
        error = WorkdirBusyError(f'{self.path} cannot be locked for this run (process 0 says why)')
    if error is not None:
      raise error
    return lock

  def drop_metrics_after(self, step: int) -> int:
    """Drops the rows of ``metrics.jsonl`` past ``step`` (a resume replays those steps), atomically; returns how many.

    A row cut short by a kill (the last line) goes too. Nothing is written when nothing is dropped.
    """
    path = os.path.join(self.path, METRICS_FILE)
    if not os.path.isfile(path):
      return 0
    with open(path, encoding='utf-8') as f:
      lines = f.readlines()
    kept = []
    for line in lines:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and int(row.get('step', 0)) <= step:
        kept.append(line if line.endswith('\n') else line + '\n')
    if len(kept) != len(lines):
      _write_atomic(path, ''.join(kept))
    return len(lines) - len(kept)

  # Steps. ------------------------------------------------------------------------------------------------------------
  def manager(self, sub: str = CHECKPOINT_DIR) -> ocp.CheckpointManager:
    """The orbax manager of ``sub`` (the checkpoint directory; ``best`` in the earlier layout).

    Its preservation policy keeps the ``keep`` newest steps, every multiple of ``keep_period`` when
    set, and the step with the best finite validation PSNR (the ``metrics`` given to ``save``; steps
    saved without metrics never count as best). The directory is not created here (``create``).
    """
    silence_async_noise()
    if sub not in self._managers:
      keep, keep_period = self._policy
      policy = [policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False)]
      if keep_period:
        policy.append(policies.EveryNSteps(interval_steps=int(keep_period)))
      options = ocp.CheckpointManagerOptions(preservation_policy=policies.AnyPreservationPolicy(policy),
                                             best_fn=_best_metric, best_mode='max', create=False)
      handlers = {'model': ocp.StandardCheckpointHandler(), 'opt': ocp.StandardCheckpointHandler(),
                  'meta': ocp.JsonCheckpointHandler()}
      self._managers[sub] = ocp.CheckpointManager(os.path.abspath(os.path.join(self.path, sub)), options=options,
                                                  item_handlers=handlers)
    return self._managers[sub]

  def create(self) -> None:
    """Creates the checkpoint directory (once a run is known to start)."""
    os.makedirs(self.directory, exist_ok=True)

  def steps(self, sub: str = CHECKPOINT_DIR) -> list[int]:
    """The saved steps of ``sub``, ascending (none when it does not exist)."""
    return sorted(self.manager(sub).all_steps()) if os.path.isdir(os.path.join(self.path, sub)) else []

  def latest_step(self) -> int | None:
    return self.manager().latest_step()

  def best_step(self) -> int | None:
    """The step with the best finite validation PSNR (None: no step was validated)."""
    return self.manager().best_step()

  def best_metric(self) -> float | None:
    """The validation PSNR of the best step (None: no step was validated)."""
    best = self.best_step()
    return (self.manager().metrics(best) or {}).get(METRIC) if best is not None else None

  def step_path(self, step: int, sub: str = CHECKPOINT_DIR) -> str:
    return os.path.join(os.path.abspath(os.path.join(self.path, sub)), str(step))

  def save(self, step: int, model_state: Any, meta: Mapping[str, Any], opt_state: Any = None,
           metrics: Mapping[str, float] | None = None) -> None:
    """Saves one step (``model_state`` a pure dict, ``opt_state`` optional) without a host copy.

    ``metrics`` (e.g. ``{'val_psnr': 21.3}``) rank the step for the best-checkpoint policy; a
    non-finite value is not recorded, so it never counts as best. The write goes on in the background:
    its failure is raised (``CheckpointWriteError``) by the next ``save``, ``wait_until_finished`` or ``close``.
    """
    items = {'model': ocp.args.StandardSave(model_state), 'meta': ocp.args.JsonSave(dict(meta))}
    if opt_state is not None and jax.tree.leaves(opt_state):  # A stateless optimizer has nothing to save.
      items['opt'] = ocp.args.StandardSave(opt_state)
    if metrics is not None and not all(math.isfinite(float(v)) for v in metrics.values()):
      metrics = None
    self.wait_until_finished()  # The previous step's write: its failure names that step.
    self._writing = step
    try:
      self.manager().save(step, args=ocp.args.Composite(**items), metrics=dict(metrics) if metrics else None)
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e) from None

  def wait_until_finished(self) -> None:
    """Waits for the save in flight; ``CheckpointWriteError`` (once) if it failed."""
    try:
      for mngr in self._managers.values():
        mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e) from None
    self._writing = None

  def _write_error(self, e: Exception) -> CheckpointWriteError:
    """The one-line error of the failed write of the step in flight (the steps saved before are intact)."""
    step, self._writing = self._writing, None
    what = f'checkpoint {step}' if step is not None else 'a checkpoint'
    if is_no_space(e):
      return CheckpointWriteError(f'no space left on device writing {what} in {self.directory}: free space and '
                                  'rerun the same command to resume')
    return CheckpointWriteError(f'cannot write {what} in {self.directory} ({_first_line(e)}); the checkpoints '
                                'saved before it are intact: fix this and rerun the same command to resume')

  def close(self) -> None:
    """Waits for the saves in flight and releases the managers (``CheckpointWriteError`` if a save failed)."""
    try:
      self.wait_until_finished()
    finally:
      for mngr in self._managers.values():
        mngr.close()
      self._managers.clear()

  def restore(self, step: int, model_template: Any, opt_template: Any = None, sub: str = CHECKPOINT_DIR):
    """(model pure dict, meta, opt_state or None) of ``step``, checked.

    Templates are abstract trees (``abstract``), whose shardings say where the arrays go; without
    ``opt_template`` only the model part is read. A tree that contradicts the template raises
    ``ModelMismatchError`` ("does not match the config's model"), step 0 without optimizer state (a
    converted model) asked for one ``ConfigError``; any damage (missing item or file, unreadable metadata
    or arrays, non-finite values) raises ``CorruptCheckpointError``.
    """
    mngr, where = self.manager(sub), f'checkpoint {self.step_path(step, sub)}'
    stateless = opt_template is not None and not jax.tree.leaves(opt_template)
    try:
      metadata = mngr.item_metadata(step)
      stored = metadata['model']
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpointError(f'{where} is corrupt or truncated (its metadata cannot be read: '
                                   f'{_first_line(e)})') from None
    if (opt_template is not None and not stateless and stored is not None and metadata.get('opt') is None
        and not os.path.isdir(os.path.join(self.step_path(step, sub), 'opt'))):
      if step:  # Training saves steps >= 1, always with the optimizer state: this one lost it.
        raise CorruptCheckpointError(f'{where} is incomplete (its optimizer state, opt/, is missing)')
      raise config_lib.ConfigError(f'{where} holds a model without optimizer state (a converted checkpoint): to '
                                   f'train from it use --config.init_from={self.path} with a new --workdir')
    if stored is None:
      raise CorruptCheckpointError(f'{where} is corrupt or truncated (no model item)')
    check_tree(model_template, getattr(stored, 'tree', stored), where)
    items = {'model': ocp.args.StandardRestore(abstract(model_template)), 'meta': ocp.args.JsonRestore()}
    if opt_template is not None and not stateless:
      items['opt'] = ocp.args.StandardRestore(abstract(opt_template))
    try:
      out = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpointError(f'{where} is corrupt or truncated ({_first_line(e)})') from None
    opt = opt_template if stateless else out['opt'] if opt_template is not None else None
    bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path((out['model'], opt))[0]
           if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact) and not bool(jax.numpy.isfinite(x).all())]
    if bad:
      raise CorruptCheckpointError(f'{where} is corrupt: non-finite values in {bad[:3]}')
    return out['model'], out['meta'], opt

  def quarantine(self, step: int) -> str:
    """Moves an unreadable step aside (``corrupt_<step>``, bytes kept) so that the run can go on; returns where."""
    src = self.step_path(step)
    dst, i = os.path.join(self.directory, f'corrupt_{step}'), 1
    while os.path.exists(dst):
      dst, i = os.path.join(self.directory, f'corrupt_{step}_{i}'), i + 1
    if jax.process_index() == 0:
      os.rename(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'srvp_quarantine_{step}')
    self.manager().reload()
    return dst

  # A run. ------------------------------------------------------------------------------------------------------------
  def resume(self, cfg: Mapping[str, Any], abstract_model: Any, abstract_opt: Any) -> Resume:
    """Where a run in this folder starts: the newest intact step (the damaged newer ones listed), or step 0.

    A step is damaged when it cannot be read back whole (``CorruptCheckpointError``), or when its variables
    differ from the model's although an older step of the same folder matches (its metadata was
    damaged). Refuses (``ConfigError``) a folder of the earlier layout, checkpoints of another model
    (STATE_KEYS, or no step matching the model), a converted model, and a folder whose every step is
    damaged (``CorruptCheckpointError``). Writes nothing.
    """
    if self.is_legacy():
      raise config_lib.ConfigError(self.legacy_hint())
    steps = sorted(self.manager().all_steps(), reverse=True)
    if steps:
      conflicts = self.config_conflicts(cfg)
      if conflicts:
        raise config_lib.ConfigError(f"{self.path} holds checkpoints of another model ({'; '.join(conflicts)}); "
                                     'drop these overrides to resume, or use another --workdir')
    start, errors = Resume(), []
    for step in steps:
      try:
        start.model, _, start.opt = self.restore(step, abstract_model, abstract_opt)
        start.step = int(step)
        return start
      except (CorruptCheckpointError, ModelMismatchError) as e:
        start.skipped.append((int(step), str(e)))
        errors.append(e)
    mismatches = [e for e in errors if isinstance(e, ModelMismatchError)]
    if mismatches:  # No step fits the model: another model, not damage.
      raise mismatches[0]
    if start.skipped:
      raise CorruptCheckpointError(f'no intact checkpoint in {self.directory}: {start.skipped[0][1]}; move the '
                                   'folder aside to start afresh')
    return start

  # Readers. ----------------------------------------------------------------------------------------------------------
  def resolve(self, which: str) -> tuple[str, int]:
    """(sub-folder, step) for ``which`` = 'best', 'latest' or a step number.

    'best' is the step with the best validation PSNR; a folder with a single step 0 (a converted
    model) serves it as both best and latest.
    """
    which = str(which)
    if self.is_legacy():
      return self._resolve_legacy(which)
    steps = self.steps()
    if not steps:
      raise CheckpointNotFoundError(f'no checkpoint in {self.directory}')
    if which == 'latest':
      return CHECKPOINT_DIR, max(steps)
    if which == 'best':
      best = self.best_step() if steps != [0] else 0
      if best is None:
        raise CheckpointNotFoundError(f'no validated checkpoint in {self.directory} (no step was saved with a '
                                      f'finite validation PSNR); it has step(s) {steps}: use --checkpoint latest')
      return CHECKPOINT_DIR, int(best)
    if not which.isdigit() or int(which) not in steps:
      raise CheckpointNotFoundError(f'no checkpoint for step {which} in {self.directory}; available: {steps}')
    return CHECKPOINT_DIR, int(which)

  def _resolve_legacy(self, which: str) -> tuple[str, int]:
    """``resolve`` for the earlier layout (``checkpoints/<step>`` + ``best/<step>``)."""
    sub = LEGACY_BEST_DIR if which == 'best' else CHECKPOINT_DIR
    folder = os.path.join(self.path, sub)
    steps = self.steps(sub)
    if not steps:
      other = CHECKPOINT_DIR if sub == LEGACY_BEST_DIR else LEGACY_BEST_DIR
      other_steps = self.steps(other)
      hint = ''
      if other_steps:
        hint = (f"; {os.path.join(self.path, other)} has step(s) {other_steps}: use --checkpoint "
                f"{'latest' if other == CHECKPOINT_DIR else 'best'}")
      raise CheckpointNotFoundError(f'no checkpoint in {folder}{hint}')
    if which in ('best', 'latest'):
      return sub, max(steps)
    if not which.isdigit() or int(which) not in steps:
      raise CheckpointNotFoundError(f'no checkpoint for step {which} in {folder}; available: {steps}')
    return sub, int(which)

  def load_model(self, which: str = 'best', compute_dtype: str | None = None, model_name: str | None = None):
    """(model, cfg, step) of the folder, written by training or the converter, or an official one.

    An official experiment folder (``config.json`` + ``model.pt``) is converted in memory; there
    ``model_name`` picks the file (default ``model.pt``) and ``which`` is ignored. For our folders the
    model is built abstractly (``nnx.eval_shape``) and only its part of the checkpoint is read (no
    optimizer state, no random initialisation). ``compute_dtype`` overrides the config's (parameters
    keep their dtype), e.g. float32 evaluation of a model trained in bfloat16. Raises
    ``CorruptCheckpointError`` for unreadable or non-finite files.
    """
    if not os.path.isdir(self.path):
      raise CheckpointNotFoundError(f'checkpoint folder not found: {self.path}')
    if self.is_official():
      return self._load_official(model_name or OFFICIAL_MODEL, compute_dtype)
    if model_name is not None:
      raise CheckpointNotFoundError(f'--model_name applies to official experiment folders (config.json + '
                                    f'model.pt); {self.path} is one of ours: use --checkpoint best|latest|STEP')
    cfg = self.load_config()
    if compute_dtype is not None:
      cfg.compute_dtype = compute_dtype
    sub, step = self.resolve(which)
    model = abstract_model(cfg)
    host = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    tree, _, _ = self.restore(step, abstract(model_tree(model), host), sub=sub)
    set_model_tree(model, tree)
    return model, cfg, step

  def _load_official(self, model_name: str, compute_dtype: str | None):
    """(model, cfg, step) of an official experiment folder, converted in memory.

    ``model_name`` picks the weights file as the official ``test.py --model_name`` does ('model.pt', the
    final weights, or 'model_best.pt'). The step is unknown in that layout and reported as -1.
    """
    path = os.path.join(self.path, model_name)
    if not os.path.isfile(path):
      found = sorted(n for n in os.listdir(self.path) if n.endswith('.pt'))
      raise CheckpointNotFoundError(f'no {model_name} in {self.path}; it has {found}: use --model_name NAME')
    cfg = config_lib.load_official_json(os.path.join(self.path, OFFICIAL_CONFIG_FILE))
    if compute_dtype is not None:
      cfg.compute_dtype = compute_dtype
    model = convert.load_state_dict(build_model(cfg), convert.load_torch_file(path), cfg)
    return model, cfg, -1

  def init_variables(self, template: Any) -> tuple[dict, int]:
    """(model variables, step) to fine-tune from: the best step, else the latest, checked against ``template``."""
    try:
      model, _, step = self.load_model('best')
    except CheckpointNotFoundError:
      model, _, step = self.load_model('latest')
    tree = model_tree(model)
    check_tree(template, tree, f'init_from={self.path}')
    return tree, step


def _write_atomic(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and a rename: readers see the old file or the new one."""
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _boot_id() -> str | None:
  try:
    with open('/proc/sys/kernel/random/boot_id', encoding='ascii') as f:
      return f.read().strip()
  except OSError:
    return None


def _start_time(pid: int) -> str | None:
  """A process's start time (clock ticks since boot, Linux): with the boot id it tells a reused pid apart."""
  try:
    with open(f'/proc/{pid}/stat', encoding='ascii', errors='replace') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


class RunLock:
  """The lock a training run holds on its workdir from start-up to exit: one run per workdir.

  ``flock`` on ``DIR/run.lock`` decides: the kernel releases it when its process ends, however it ends (kill -9
  included), and on network filesystems it holds across hosts. The file records the holder (host, pid, process
  start time, boot id, since when, process count) for the refusal's message, and decides alone on a filesystem
  without ``flock`` (a holder on this host that is gone, or whose pid was reused, is stale; one on another host
  cannot be checked and is reported with the file to delete). A record left by a killed run is taken over
  (``stale``). Released (``release``, or on leaving the ``with``) the file is removed, and so are the folders made
  to hold it when they are empty (a run refused at start-up leaves no workdir behind).
  """

  def __init__(self, path: str):
    self.path = path
    self.stale: dict | None = None  # The record of a gone holder this lock took over.
    self._fd: int | None = None
    self._made: list[str] = []

  def acquire(self) -> 'RunLock':
    """Takes the lock or raises ``WorkdirBusyError`` naming the holder; writes nothing when refused."""
    folder = os.path.dirname(os.path.abspath(self.path))
    try:
      self._made = _make_dirs(folder)
      for _ in range(20):  # Retried only when the file was replaced while being opened (a holder released it).
        try:
          fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
          raise config_lib.ConfigError(f'cannot lock the workdir ({self.path}: {e.strerror or e}); use a '
                                       'writable --workdir') from None
        try:
          flocked = self._flock(fd)
          if not _same_file(fd, self.path):
            os.close(fd)
            continue
          holder = _read_record(fd)
          alive = _alive(holder) if holder else False
          if alive or (alive is None and not flocked):  # Unknown on another host: flock, when there, decided.
            raise WorkdirBusyError(self._busy(holder, flocked))
        except BaseException:
          os.close(fd)
          raise
        self.stale, self._fd = holder, fd
        self._write_record()
        return self
      raise WorkdirBusyError(f'{folder} is in use by other training runs starting at once; use another --workdir')
    except BaseException:
      self._remove_made()
      raise

  def _flock(self, fd: int) -> bool:
    """True when ``flock`` took the lock, False on a filesystem without it; WorkdirBusyError when it is held."""
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except BlockingIOError:
      holder = None
      for _ in range(10):  # The holder writes its record right after locking.
        holder = _read_record(fd)
        if holder:
          break
        time.sleep(0.05)
      raise WorkdirBusyError(self._busy(holder, True)) from None
    except OSError as e:
      if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
      raise

  def _busy(self, holder: dict | None, flocked: bool) -> str:
    folder = os.path.dirname(self.path)
    if not holder:
      return (f'{folder} is in use by another training run (its lock {self.path} names no holder yet); wait for '
              'it to end or stop it, or use another --workdir')
    n = int(holder.get('processes', 1))
    who = (f"pid {holder.get('pid')} on {holder.get('host')}" + (f' (process 0 of {n})' if n > 1 else '')
           + f", since {holder.get('since')}")
    hint = ('' if flocked else f'; if that run is gone (this filesystem has no file locks to tell), delete '
            f'{self.path}')
    return (f'{folder} is in use by another training run ({who}): wait for it to end, or stop it (SIGTERM '
            f'saves it), or use another --workdir{hint}')

  def _write_record(self) -> None:
    record = {'host': socket.gethostname(), 'pid': os.getpid(), 'start_time': _start_time(os.getpid()),
              'boot_id': _boot_id(), 'since': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
              'processes': jax.process_count(), 'command': ' '.join(sys.argv)[:500]}
    data = json.dumps(record).encode()
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, data, 0)
    os.fsync(self._fd)

  def release(self) -> None:
    """Removes the lock file and lets go of the lock (idempotent)."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      if _same_file(fd, self.path):
        os.remove(self.path)
    finally:
      os.close(fd)  # Releases the flock.
      self._remove_made()

  def _remove_made(self) -> None:
    for folder in reversed(self._made):
      try:
        os.rmdir(folder)
      except OSError:
        break  # Not empty: the run wrote there.
    self._made = []

  def __enter__(self) -> 'RunLock':
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _make_dirs(folder: str) -> list[str]:
  """``os.makedirs(folder)``; returns the folders it made, outermost first. One line when it cannot."""
  made, parent = [], folder
  while not os.path.exists(parent):
    made.insert(0, parent)
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise config_lib.ConfigError(f'--workdir {folder}: {parent} is a file, not a folder')
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise config_lib.ConfigError(f'cannot create the workdir {folder}: {e.strerror or e}') from None
  return made


def _same_file(fd: int, path: str) -> bool:
  try:
    return os.fstat(fd).st_ino == os.stat(path).st_ino
  except FileNotFoundError:
    return False


def _read_record(fd: int) -> dict | None:
  try:
    record = json.loads(os.pread(fd, 1 << 16, 0).decode('utf-8', 'replace') or 'null')
  except json.JSONDecodeError:
    return None
  return record if isinstance(record, dict) else None


def _alive(holder: Mapping[str, Any]) -> bool | None:
  """Whether a lock's holder still runs: True / False on this host, None (cannot tell) on another one."""
  if holder.get('host') != socket.gethostname():
    return None
  if holder.get('boot_id') and _boot_id() and holder['boot_id'] != _boot_id():
    return False  # This host rebooted since.
  pid = int(holder.get('pid', -1))
  if pid == os.getpid():
    return False  # A record of this very process (an earlier run in it that did not release): stale.
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  except (OSError, OverflowError):
    return False
  start = _start_time(pid)
  return not (holder.get('start_time') and start and start != holder['start_time'])


def load_model(path: str, which: str = 'best', compute_dtype: str | None = None, model_name: str | None = None):
  """``RunFolder(path).load_model(...)``: (model, cfg, step) of a checkpoint folder."""
  return RunFolder(path).load_model(which, compute_dtype, model_name)
