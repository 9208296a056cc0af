"""Checkpoint folders: what training writes and what evaluation, fine-tuning and export read.

Layout of a run (or converted) folder::

    DIR/srvp_config.json     our full config (ml_collections keys)
    DIR/config.json          the same config in the official flat form (for PyTorch export)
    DIR/checkpoints/<step>/  one orbax CheckpointManager: 'model' (all model variables), 'opt' (the
                             optimizer state; training only), 'meta' (step, validation PSNR) and,
                             for validated steps, orbax 'metrics' ({'val_psnr': ...})

One manager keeps, by its preservation policy, the ``keep_checkpoints`` newest steps, every
``keep_period``-th step (when set) and the step with the best finite validation PSNR. ``best``
is the manager's best step; ``latest`` its newest. Model variables are stored as a pure nested dict
(``nnx.to_pure_dict``) of the arrays as they live on the devices (sharded ``jax.Array``), and
are restored into an abstract tree that carries the target shardings. Folders of the earlier layout
(``checkpoints/<step>`` beside ``best/<step>``) still load for evaluation and export.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from srvp_jax import config as config_lib

CONFIG_FILE = 'srvp_config.json'
OFFICIAL_CONFIG_FILE = 'config.json'
LATEST_DIR = 'checkpoints'  # The run's one checkpoint directory.
BEST_DIR = 'best'  # Earlier layout only: best/<step> beside checkpoints/<step>.
METRIC = 'val_psnr'
# Config keys a checkpoint's arrays depend on: a relaunch must not change them.
STATE_KEYS = config_lib.MODEL_KEYS + ('param_dtype',)


class CheckpointNotFoundError(FileNotFoundError):
  """A folder without the checkpoint the caller asked for."""


class CorruptCheckpointError(config_lib.ConfigError):
  """A checkpoint whose files cannot be read back (truncated, flipped bytes, non-finite values)."""


def save_config(workdir: str, cfg: Mapping[str, Any]) -> None:
  """Writes our config and its official ``config.json`` form into ``workdir``."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), 'w', encoding='utf-8') as f:
    json.dump(dict(cfg), f, indent=1, sort_keys=True)
  save_official_config(workdir, cfg)


def save_official_config(folder: str, cfg: Mapping[str, Any]) -> None:
  """Writes ``folder/config.json``, the official flat form of ``cfg`` (what the official code reads)."""
  with open(os.path.join(folder, OFFICIAL_CONFIG_FILE), 'w', encoding='utf-8') as f:
    json.dump(config_lib.to_official(cfg), f, indent=1)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Our config of a checkpoint folder (falls back to an official ``config.json``)."""
  ours = os.path.join(workdir, CONFIG_FILE)
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
  official = os.path.join(workdir, OFFICIAL_CONFIG_FILE)
  if os.path.isfile(official):
    return config_lib.load_official_json(official)
  raise CheckpointNotFoundError(f'{workdir} has neither {CONFIG_FILE} nor {OFFICIAL_CONFIG_FILE}: '
                                'not a checkpoint folder (train with launch.py or run convert_torch_ckpt.py)')


def config_conflicts(workdir: str, cfg: Mapping[str, Any]) -> list[str]:
  """``key: saved -> new`` for every key of STATE_KEYS on which ``cfg`` contradicts ``workdir``'s config."""
  if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)) and not os.path.isfile(
      os.path.join(workdir, OFFICIAL_CONFIG_FILE)):
    return []
  saved = load_config(workdir)
  return [f'{k}: {saved[k]!r} -> {cfg[k]!r}' for k in STATE_KEYS if saved[k] != cfg[k]]


def is_legacy_layout(workdir: str) -> bool:
  """Whether ``workdir`` was written with the earlier layout (``best/<step>`` beside ``checkpoints/``)."""
  return os.path.isdir(os.path.join(workdir, BEST_DIR))


def _best_metric(metrics: Mapping[str, Any]) -> float:
  value = metrics.get(METRIC) if metrics else None
  return float(value) if value is not None and math.isfinite(float(value)) else -math.inf


def manager(workdir: str, which: str = LATEST_DIR, max_to_keep: int | None = 3,
            keep_period: int | None = None) -> ocp.CheckpointManager:
  """The orbax manager of ``workdir/which``: the run's one checkpoint directory.

  Its preservation policy keeps the ``max_to_keep`` newest steps, every multiple of
  ``keep_period`` when set, and the step with the best finite validation PSNR (the ``metrics``
  given to ``save``; steps saved without metrics never count as best). The directory is not
  created here: a run creates it once it is known to start.
  """
  keep = [policies.LatestN(n=max_to_keep),
          policies.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False)]
  if keep_period:
    keep.append(policies.EveryNSteps(interval_steps=int(keep_period)))
  options = ocp.CheckpointManagerOptions(preservation_policy=policies.AnyPreservationPolicy(keep),
                                         best_fn=_best_metric, best_mode='max', create=False)
  handlers = {'model': ocp.StandardCheckpointHandler(), 'opt': ocp.StandardCheckpointHandler(),
              'meta': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, which)), options=options,
                               item_handlers=handlers)


def model_tree(model: nnx.Module) -> dict:
  """All model variables (parameters and BatchNorm statistics) as a pure dict of arrays."""
  return nnx.to_pure_dict(nnx.state(model))


def save(mngr: ocp.CheckpointManager, step: int, model_state: Any, meta: Mapping[str, Any],
         opt_state: Any = None, metrics: Mapping[str, float] | None = None) -> None:
  """Saves one step (``model_state`` a pure dict, ``opt_state`` optional) without a host copy.

  ``metrics`` (e.g. ``{'val_psnr': 21.3}``) rank the step for the best-checkpoint policy; a
  non-finite value is not recorded, so it never counts as best.
  """
  items = {'model': ocp.args.StandardSave(model_state), 'meta': ocp.args.JsonSave(dict(meta))}
  if opt_state is not None and jax.tree.leaves(opt_state):  # A stateless optimizer has nothing to save.
    items['opt'] = ocp.args.StandardSave(opt_state)
  if metrics is not None and not all(math.isfinite(float(v)) for v in metrics.values()):
    metrics = None
  mngr.save(step, args=ocp.args.Composite(**items), metrics=dict(metrics) if metrics else None)


def abstract(tree, sharding=None):
  """``jax.ShapeDtypeStruct`` leaves (with ``sharding`` when given) of a tree of arrays."""
  def leaf(x):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding or getattr(x, 'sharding', None))
  return jax.tree.map(leaf, tree)


def step_path(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  text = text.splitlines()[0].split(' See full TensorStore details')[0] if text else type(e).__name__
  return text[:300]


def _check_structure(mngr: ocp.CheckpointManager, step: int, model_template: Any, with_opt: bool) -> None:
  """ConfigError when the checkpoint's stored tree contradicts the template (config mismatch)."""
  try:
    metadata = mngr.item_metadata(step)
    stored = metadata['model']
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpointError(f'checkpoint {step_path(mngr, step)} is corrupt or truncated (its metadata '
                                 f'cannot be read: {_first_line(e)})') from None
  if with_opt and stored is not None and metadata.get('opt') is None and not os.path.isdir(
      os.path.join(step_path(mngr, step), 'opt')):
    workdir = os.path.dirname(str(mngr.directory))
    raise config_lib.ConfigError(f'checkpoint {step_path(mngr, step)} holds a model without optimizer state (a '
                                 f'converted checkpoint?): to train from it use --config.init_from={workdir} '
                                 'with a new --workdir')
  if stored is None:
    raise CorruptCheckpointError(f'checkpoint {step_path(mngr, step)} is corrupt or truncated (no model item)')
  stored = getattr(stored, 'tree', stored)
  want = dict(jax.tree_util.tree_flatten_with_path(model_template)[0])
  have = dict(jax.tree_util.tree_flatten_with_path(stored, is_leaf=lambda x: hasattr(x, 'shape'))[0])
  key = lambda p: '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in p)  # Stored keys are strings.
  want, have = {key(p): v for p, v in want.items()}, {key(p): v for p, v in have.items()}
  if set(want) != set(have):
    diff = sorted(set(want) ^ set(have))[:5]
    raise config_lib.ConfigError(f'checkpoint {step_path(mngr, step)} does not match its config: variables {diff} '
                                 'differ')
  for k, v in want.items():
    if tuple(np.shape(v)) != tuple(have[k].shape):
      raise config_lib.ConfigError(f'checkpoint {step_path(mngr, step)} does not match its config: {k} has shape '
                                   f'{tuple(have[k].shape)}, the config implies {tuple(np.shape(v))}')


def restore(mngr: ocp.CheckpointManager, step: int, model_template: Any, opt_template: Any = None):
  """(model pure dict, meta, opt_state or None) of ``step``, checked.

  Templates are abstract trees (``abstract``), whose shardings say where the arrays go; without
  ``opt_template`` only the model part is read. A tree that contradicts the template raises
  ``ConfigError`` ("does not match its config"); unreadable files or non-finite values raise
  ``CorruptCheckpointError``.
  """
  stateless = opt_template is not None and not jax.tree.leaves(opt_template)
  _check_structure(mngr, step, model_template, with_opt=opt_template is not None and not stateless)
  items = {'model': ocp.args.StandardRestore(abstract(model_template)), 'meta': ocp.args.JsonRestore()}
  if opt_template is not None and not stateless:
    items['opt'] = ocp.args.StandardRestore(abstract(opt_template))
  try:
    out = mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpointError(f'checkpoint {step_path(mngr, step)} is corrupt or truncated '
                                 f'({_first_line(e)})') from None
  opt = opt_template if stateless else out['opt'] if opt_template is not None else None
  bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path((out['model'], opt))[0]
         if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact) and not bool(jax.numpy.isfinite(x).all())]
  if bad:
    raise CorruptCheckpointError(f'checkpoint {step_path(mngr, step)} is corrupt: non-finite values in {bad[:3]}')
  return out['model'], out['meta'], opt


def quarantine(mngr: ocp.CheckpointManager, step: int) -> str:
  """Moves an unreadable step aside (``corrupt_<step>``, bytes kept) so that the run can go on; returns where."""
  src = step_path(mngr, step)
  dst, i = os.path.join(str(mngr.directory), f'corrupt_{step}'), 1
  while os.path.exists(dst):
    dst, i = os.path.join(str(mngr.directory), f'corrupt_{step}_{i}'), i + 1
  if jax.process_index() == 0:
    os.rename(src, dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(f'srvp_quarantine_{step}')
  mngr.reload()
  return dst


def _steps(workdir: str, sub: str) -> list[int]:
  folder = os.path.join(workdir, sub)
  return sorted(manager(workdir, sub).all_steps()) if os.path.isdir(folder) else []


def resolve_step(workdir: str, which: str) -> tuple[str, int]:
  """(sub-folder, step) for ``which`` = 'best', 'latest' or a step number.

  'best' is the step with the best validation PSNR; a folder with a single step 0 (a converted
  model) serves it as both best and latest.
  """
  if is_legacy_layout(workdir):
    return _resolve_legacy(workdir, which)
  folder = os.path.join(workdir, LATEST_DIR)
  steps = _steps(workdir, LATEST_DIR)
  if not steps:
    raise CheckpointNotFoundError(f'no checkpoint in {folder}')
  if which == 'latest':
    return LATEST_DIR, max(steps)
  if which == 'best':
    best = manager(workdir).best_step() if steps != [0] else 0
    if best is None:
      raise CheckpointNotFoundError(f'no validated checkpoint in {folder} (no step was saved with a finite '
                                    f'validation PSNR); it has step(s) {steps}: use --checkpoint latest')
    return LATEST_DIR, int(best)
  if not str(which).isdigit() or int(which) not in steps:
    raise CheckpointNotFoundError(f'no checkpoint for step {which} in {folder}; available: {steps}')
  return LATEST_DIR, int(which)


def _resolve_legacy(workdir: str, which: str) -> tuple[str, int]:
  """``resolve_step`` for the earlier layout (``checkpoints/<step>`` + ``best/<step>``)."""
  sub = BEST_DIR if which == 'best' else LATEST_DIR
  folder = os.path.join(workdir, sub)
  steps = _steps(workdir, sub)
  if not steps:
    other = LATEST_DIR if sub == BEST_DIR else BEST_DIR
    other_steps = _steps(workdir, other)
    hint = ''
    if other_steps:
      hint = (f"; {os.path.join(workdir, other)} has step(s) {other_steps}: use --checkpoint "
              f"{'latest' if other == LATEST_DIR else 'best'}")
    raise CheckpointNotFoundError(f'no checkpoint in {folder}{hint}')
  if which in ('best', 'latest'):
    return sub, max(steps)
  if not str(which).isdigit() or int(which) not in steps:
    raise CheckpointNotFoundError(f'no checkpoint for step {which} in {folder}; available: {steps}')
  return sub, int(which)


def legacy_hint(workdir: str) -> str:
  """The one line that tells how to train on in a folder of the earlier layout."""
  return (f'{workdir} was written with the earlier checkpoint layout (best/ beside checkpoints/), which '
          'evaluation and export still read but training no longer writes: continue in a new workdir '
          f'with --config.init_from={workdir} (or evaluate it as it is)')


OFFICIAL_MODEL = 'model.pt'


def is_official_folder(folder: str) -> bool:
  """Whether ``folder`` is an official experiment folder (``config.json`` + ``*.pt``, none of ours)."""
  return (os.path.isfile(os.path.join(folder, OFFICIAL_CONFIG_FILE))
          and not os.path.isfile(os.path.join(folder, CONFIG_FILE))
          and not os.path.isdir(os.path.join(folder, LATEST_DIR))
          and any(n.endswith('.pt') for n in os.listdir(folder)))


def load_official_folder(folder: str, model_name: str = OFFICIAL_MODEL, compute_dtype: str | None = None):
  """(model, cfg, step) from an official experiment folder, converted in memory.

  ``model_name`` picks the weights file as the official ``test.py --model_name`` does ('model.pt', the
  final weights, or 'model_best.pt'). The step is unknown in that layout and reported as -1.
  """
  from srvp_jax import convert  # pylint: disable=import-outside-toplevel
  from srvp_jax.model import build_model  # pylint: disable=import-outside-toplevel
  path = os.path.join(folder, model_name)
  if not os.path.isfile(path):
    found = sorted(n for n in os.listdir(folder) if n.endswith('.pt'))
    raise CheckpointNotFoundError(f'no {model_name} in {folder}; it has {found}: use --model_name NAME')
  cfg = config_lib.load_official_json(os.path.join(folder, OFFICIAL_CONFIG_FILE))
  if compute_dtype is not None:
    cfg.compute_dtype = compute_dtype
  state_dict = convert.load_torch_file(path)
  model = convert.load_state_dict(build_model(cfg), state_dict, cfg)
  return model, cfg, -1


def load_model(workdir: str, which: str = 'best', compute_dtype: str | None = None,
               model_name: str | None = None):
  """(model, cfg, step) from a checkpoint folder written by training or the converter.

  An official experiment folder (``config.json`` + ``model.pt``) is converted in memory; there
  ``model_name`` picks the file (default ``model.pt``) and ``which`` is ignored. For our folders the
  model is built abstractly (``nnx.eval_shape``) and only its part of the checkpoint is read (no
  optimizer state, no random initialisation). ``compute_dtype`` overrides the config's (parameters
  keep their dtype), e.g. float32 evaluation of a model trained in bfloat16. Raises
  ``CorruptCheckpointError`` for unreadable or non-finite files.
  """
  from srvp_jax.model import build_model  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(workdir):
    raise CheckpointNotFoundError(f'checkpoint folder not found: {workdir}')
  if is_official_folder(workdir):
    return load_official_folder(workdir, model_name or OFFICIAL_MODEL, compute_dtype)
  if model_name is not None:
    raise CheckpointNotFoundError(f'--model_name applies to official experiment folders (config.json + '
                                  f'model.pt); {workdir} is one of ours: use --checkpoint best|latest|STEP')
  cfg = load_config(workdir)
  if compute_dtype is not None:
    cfg.compute_dtype = compute_dtype
  sub, step = resolve_step(workdir, str(which))
  model = nnx.eval_shape(lambda: build_model(cfg))
  host = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  tree, _, _ = restore(manager(workdir, sub), step, abstract(model_tree(model), host))
  set_model_tree(model, tree)
  return model, cfg, step


def set_model_tree(model: nnx.Module, tree: Mapping) -> None:
  """Loads a pure dict of variables into ``model``, checking names and shapes."""
  state = nnx.state(model)
  template = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0])
  given = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
  if set(template) != set(given):
    diff = sorted(map(jax.tree_util.keystr, set(template) ^ set(given)))[:5]
    raise config_lib.ConfigError(f'checkpoint variables do not match the config\'s model (e.g. {diff})')
  for path, value in given.items():
    if np.shape(value) != np.shape(template[path]):
      raise config_lib.ConfigError(f'checkpoint variable {jax.tree_util.keystr(path)} has shape '
                                   f'{np.shape(value)}, the config implies {np.shape(template[path])}')
  nnx.replace_by_pure_dict(state, tree)
  nnx.update(model, state)
