"""Checkpoint folders: what training writes and what evaluation, fine-tuning and export read.

Layout of a run (or converted) folder::

    DIR/srvp_config.json     our full config (ml_collections keys)
    DIR/config.json          the same config in the official flat form (for PyTorch export)
    DIR/checkpoints/<step>/  orbax: 'model' (all model variables), 'opt' (optimizer state, training
                             only), 'meta' (step, RNG key, data position, best metric, ...)
    DIR/best/<step>/         orbax: the best model by validation PSNR ('model' + 'meta')

Model variables are stored as a pure nested dict (``nnx.State.to_pure_dict``), float32.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from srvp_jax import config as config_lib

CONFIG_FILE = 'srvp_config.json'
OFFICIAL_CONFIG_FILE = 'config.json'
LATEST_DIR = 'checkpoints'
BEST_DIR = 'best'


class CheckpointNotFoundError(FileNotFoundError):
  """A folder without the checkpoint the caller asked for."""


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
    with open(ours, encoding='utf-8') as f:
      data = json.load(f)
    try:
      return config_lib.with_overrides(**data)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f'{ours}: {e}') from None
  official = os.path.join(workdir, OFFICIAL_CONFIG_FILE)
  if os.path.isfile(official):
    return config_lib.load_official_json(official)
  raise CheckpointNotFoundError(f'{workdir} has neither {CONFIG_FILE} nor {OFFICIAL_CONFIG_FILE}: '
                                'not a checkpoint folder (train with launch.py or run convert_torch_ckpt.py)')


def manager(workdir: str, which: str = LATEST_DIR, max_to_keep: int | None = 3,
            keep_period: int | None = None) -> ocp.CheckpointManager:
  """An orbax manager over ``workdir/which`` (created on save).

  Keeps the ``max_to_keep`` newest checkpoints, plus, when ``keep_period`` is set, every checkpoint
  whose step is a multiple of it (periodic checkpoints).
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_period or None, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, which)), options=options)


def model_tree(model: nnx.Module) -> dict:
  """All model variables (parameters and BatchNorm statistics) as a pure dict of arrays."""
  return nnx.state(model).to_pure_dict()


def save(mngr: ocp.CheckpointManager, step: int, model_state: Any, meta: Mapping[str, Any],
         opt_state: Any = None) -> None:
  """Saves one step (``model_state`` a pure dict; ``opt_state`` optional)."""
  items = {'model': ocp.args.StandardSave(model_state), 'meta': ocp.args.JsonSave(dict(meta))}
  if opt_state is not None:
    items['opt'] = ocp.args.StandardSave(opt_state)
  mngr.save(step, args=ocp.args.Composite(**items))


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore(mngr: ocp.CheckpointManager, step: int, model_template: Any, opt_template: Any = None):
  """Restores (model pure dict, meta, opt_state or None) of ``step`` with the templates' structure."""
  items = {'model': ocp.args.StandardRestore(_abstract(model_template)), 'meta': ocp.args.JsonRestore()}
  if opt_template is not None:
    items['opt'] = ocp.args.StandardRestore(_abstract(opt_template))
  out = mngr.restore(step, args=ocp.args.Composite(**items))
  return out['model'], out['meta'], (out['opt'] if opt_template is not None else None)


def resolve_step(workdir: str, which: str) -> tuple[str, int]:
  """(sub-folder, step) for ``which`` = 'best', 'latest' or a step number."""
  if which == 'best':
    sub = BEST_DIR if os.path.isdir(os.path.join(workdir, BEST_DIR)) else LATEST_DIR
  else:
    sub = LATEST_DIR
  folder = os.path.join(workdir, sub)
  steps = manager(workdir, sub).all_steps() if os.path.isdir(folder) else []
  if not steps:
    other = LATEST_DIR if sub == BEST_DIR else BEST_DIR
    other_dir = os.path.join(workdir, other)
    other_steps = sorted(manager(workdir, other).all_steps()) if os.path.isdir(other_dir) else []
    hint = ''
    if other_steps:
      hint = f"; {other_dir} has step(s) {other_steps}: use --checkpoint {'latest' if other == LATEST_DIR else 'best'}"
    raise CheckpointNotFoundError(f'no checkpoint in {folder}{hint}')
  if which in ('best', 'latest'):
    return sub, max(steps)
  if not str(which).isdigit() or int(which) not in steps:
    raise CheckpointNotFoundError(f'no checkpoint for step {which} in {folder}; available: {sorted(steps)}')
  return sub, int(which)


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
  model is built abstractly (``nnx.eval_shape``) and filled from the checkpoint: a real random
  initialisation would be compiled and run for values that are all overwritten. ``compute_dtype``
  overrides the config's (parameters are float32 either way), e.g. float32 evaluation of a model
  trained in bfloat16.
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
  sub, step = resolve_step(workdir, which)
  model = nnx.eval_shape(lambda: build_model(cfg))
  template = model_tree(model)
  try:
    tree, _, _ = restore(manager(workdir, sub), step, template)
  except (ValueError, KeyError) as e:
    raise config_lib.ConfigError(f'checkpoint {workdir}/{sub}/{step} does not match its config: '
                                 f'{str(e).splitlines()[0]}') from None
  set_model_tree(model, tree)
  return model, cfg, step


def set_model_tree(model: nnx.Module, tree: Mapping) -> None:
  """Loads a pure dict of variables into ``model``, checking names and shapes."""
  state = nnx.state(model)
  template = dict(jax.tree_util.tree_flatten_with_path(state.to_pure_dict())[0])
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
