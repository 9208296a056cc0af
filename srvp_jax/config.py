"""Experiment configuration: one flat ``ml_collections.ConfigDict`` whose keys are the official ones.

The official code stores every option of ``train.py`` in a flat ``config.json`` next to each
checkpoint. We keep exactly those names (so official configs load as ours and ours export as
official ones) and add a few of our own (``compute_dtype``, ``init_from``, ...). The dict is
locked: an unknown or mistyped key is an error, never a silently ignored option.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from typing import Any, Mapping

import ml_collections
import numpy as np

FRAME_SIZE = 64  # Frames are FRAME_SIZE x FRAME_SIZE: the official encoders and decoders are for 64x64 frames.

# Official option -> default (official ``args.py``; dataset-specific ones have no default).
OFFICIAL_DEFAULTS: dict[str, Any] = dict(
    # Model.
    nx=FRAME_SIZE, nc=1, nf=64, nhx=128, ny=20, nz=20, skipco=False, nt_inf=5, nh_inf=256, nlayers_inf=3,
    nh_res=512, nlayers_res=4, archi='dcgan', n_euler_steps=1, res_gain=1.41,
    # Objective.
    obs_scale=1.0, beta_y=1.0, beta_z=1.0, l2_res=1.0,
    # Optimisation.
    lr=3e-4, lr_scheduling_burnin=1_000_000, lr_scheduling_n_iter=100_000, batch_size=128, seed=0,
    # Data.
    dataset='smmnist', data_dir='', seq_len=15, ndigits=2, max_speed=4, deterministic=False,
    subsampling=8,
    # Validation.
    val_interval=20_000, chkpt_interval=0, batch_size_test=16, n_iter_test=25, nt_cond=5,
    n_samples_test=100, seq_len_test=0,
)

# Options of ours, with their defaults.
EXTRA_DEFAULTS: dict[str, Any] = dict(
    compute_dtype='float32',  # 'float32' or 'bfloat16' for convolutions and dense layers.
    precision='float32',  # float32 compute: 'float32' (true float32) or 'tensorfloat32' (TF32 on A100 / H100 GPUs).
    scan_unroll=0,  # Frames (Euler, LSTM steps) per loop iteration of the model's scans; True: all; 0: per backend.
    param_dtype='float32',  # Parameters, statistics, accumulations: 'float32' ('float64': reference replay, x64).
    init_from='',  # A checkpoint folder (ours or converted) to start from (fine-tuning).
    keep_checkpoints=3,  # How many 'latest' checkpoints orbax keeps.
    keep_period=0,  # Also keep every checkpoint whose step is a multiple of this (0: none; periodic).
    log_interval=50,  # Steps between scalar summaries.
    n_val_videos_gif=4,  # Videos shown in the validation GIF.
    distributed=False,  # Call jax.distributed.initialize() (multi-host; launch.py).
    coordinator_address='',  # host:port of process 0 ('': $JAX_COORDINATOR_ADDRESS or cluster auto-detection).
    num_processes=0,  # Processes in the run (0: $JAX_NUM_PROCESSES or cluster auto-detection).
    process_id=-1,  # This process's index (-1: $JAX_PROCESS_ID or cluster auto-detection).
    profile_steps=0,  # Profile this many steps (from the 3rd after start-up) into WORKDIR/plugins/profile.
    num_data_workers=4,  # Parallel batch builders in the input pipeline (threads).
    num_data_processes=0,  # Worker processes building batches (0: threads only; Moving MNIST scales with them).
    digits_source='auto',  # Moving MNIST digits: 'auto', 'idx', 'tfds' or 'standin' (offline stand-in).
    val_sample_chunk=25,  # Validation samples decoded together (memory vs speed).
    val_resample=False,  # True: other validation videos and fresh noise at each validation (official); False: the same.
    mesh_data_axis=-1,  # Devices on the 'data' mesh axis (-1: all devices).
    # Test protocol (``python -m srvp_jax.evaluate`` defaults; 0 / '': the paper's for the dataset, PAPER_TEST).
    test_nt_cond=0,  # Conditioning frames at test time (0: nt_cond).
    test_nt_gen=0,  # Frames per test video, conditioning + predicted.
    test_n_samples=0,  # Samples per test video (best-of-N).
    test_checkpoint='',  # 'latest' (final weights, official model.pt) or 'best' (best validation PSNR).
)

# The paper's test protocol per dataset (docs/srvp.md sections 1 and 5; deterministic Moving MNIST is 'mmnist').
PAPER_TEST = {
    'smmnist': dict(nt_gen=25, n_samples=100, checkpoint='latest'),
    'mmnist': dict(nt_gen=100, n_samples=1, checkpoint='latest'),
    'kth': dict(nt_gen=40, n_samples=100, checkpoint='best'),
    'human': dict(nt_gen=53, n_samples=100, checkpoint='best'),
    'bair': dict(nt_gen=30, n_samples=100, checkpoint='latest'),
    'videos': dict(nt_gen=20, n_samples=100, checkpoint='best'),  # Your own videos (configs/videos.py).
}

MODEL_KEYS = ('nx', 'nc', 'nf', 'nhx', 'ny', 'nz', 'skipco', 'nt_inf', 'nh_inf', 'nlayers_inf', 'nh_res',
              'nlayers_res', 'archi')
DATASETS = ('smmnist', 'mmnist', 'kth', 'human', 'bair', 'videos')
ARCHITECTURES = ('dcgan', 'vgg')
PRECISIONS = ('float32', 'tensorfloat32')


class ConfigError(ValueError):
  """A configuration that cannot describe an SRVP run."""


def default_config() -> ml_collections.ConfigDict:
  """All keys with their defaults; paper configs override the dataset-specific ones."""
  cfg = ml_collections.ConfigDict({**OFFICIAL_DEFAULTS, **EXTRA_DEFAULTS})
  return cfg


def preset(**overrides) -> ml_collections.ConfigDict:
  """Our defaults with ``overrides`` (unknown keys are errors), locked; validated later, once (``launch.py``)."""
  cfg = _defaults_with(overrides)
  cfg.lock()
  return cfg


def _defaults_with(overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Our defaults with ``overrides`` applied; ConfigError for an unknown key."""
  cfg = default_config()
  unknown = sorted(set(overrides) - set(cfg.keys()))
  if unknown:
    raise ConfigError(f'unknown config key(s) {unknown}')
  problems = _type_problems(overrides)
  if problems:  # ConfigDict would raise a TypeError naming its internals.
    raise ConfigError('; '.join(problems))
  cfg.update(overrides)
  return cfg


def did_you_mean(key: str) -> str:
  """``unknown config key 'x' (did you mean 'y'?)``: the one-line message of a mistyped key."""
  close = difflib.get_close_matches(key, sorted(set(OFFICIAL_DEFAULTS) | set(EXTRA_DEFAULTS)), n=1)
  return f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else '')


def with_overrides(**overrides) -> ml_collections.ConfigDict:
  """Our defaults with ``overrides`` applied and validated (unknown keys are errors); not locked."""
  cfg = _defaults_with(overrides)
  validate(cfg)
  return cfg


def validate(cfg: Mapping[str, Any]) -> None:
  """Refuses a configuration the model cannot run, before anything is written (``launch.py`` calls it first).

  Every key is checked against its type and valid range (``_type_problems``, ``_range_problems``), and the keys
  that constrain each other (``_relation_problems``: nt_inf <= nt_cond < the validation length, the test
  protocol's lengths, a schedule of at least one step, the multi-process keys, the Moving MNIST keys). Every
  violation is reported, each naming its keys and a valid choice, in one ConfigError (one line). What depends on
  the machine or the data (batch sizes vs devices, clip lengths vs videos) is checked at start-up, also before
  anything is written.
  """
  known = set(OFFICIAL_DEFAULTS) | set(EXTRA_DEFAULTS)
  unknown = sorted(set(cfg.keys()) - known)
  if unknown:
    raise ConfigError('; '.join(did_you_mean(k) for k in unknown))
  values = {**OFFICIAL_DEFAULTS, **EXTRA_DEFAULTS, **{k: cfg[k] for k in cfg.keys()}}
  problems = _type_problems(values)
  if not problems:  # Ranges and relations read the keys as numbers and strings: once the types are right.
    problems = _range_problems(values) + _relation_problems(values)
  if problems:
    raise ConfigError('; '.join(problems))


DIGIT_SOURCES = ('auto', 'idx', 'tfds', 'standin')  # Moving MNIST digits (``srvp_jax.data.mnist``).
SEED_LIMIT = 2 ** 32  # Seeds are 32-bit: JAX keys and NumPy generators are seeded with seed, seed + 1, seed + 2.
# Integer keys by smallest valid value (a few have their own rule in ``_range_problems``).
_POSITIVE = ('nf', 'nhx', 'ny', 'nz', 'nt_inf', 'nh_inf', 'nh_res', 'n_euler_steps', 'batch_size', 'ndigits',
             'subsampling', 'val_interval', 'batch_size_test', 'n_iter_test', 'nt_cond', 'n_samples_test',
             'keep_checkpoints', 'log_interval', 'n_val_videos_gif', 'num_data_workers', 'val_sample_chunk')
_NON_NEGATIVE = {  # key -> what 0 means.
    'lr_scheduling_burnin': 'no constant-rate steps', 'lr_scheduling_n_iter': 'no decay steps',
    'max_speed': 'still digits', 'chkpt_interval': 'at each validation', 'seq_len_test': 'seq_len',
    'keep_period': 'none kept', 'profile_steps': 'off', 'num_processes': 'from the environment',
    'num_data_processes': 'threads only', 'test_nt_cond': 'nt_cond', 'test_nt_gen': "the paper's",
    'test_n_samples': "the paper's", 'scan_unroll': "the backend's: 1 on CPUs and TPUs, True (all) on GPUs"}
_MIN_2 = ('nlayers_inf', 'nlayers_res')  # An MLP has at least its input and output layers.
_POSITIVE_FLOATS = ('lr', 'obs_scale', 'res_gain')
_NON_NEGATIVE_FLOATS = ('beta_y', 'beta_z', 'l2_res')
_CHOICES = {'archi': ARCHITECTURES, 'dataset': DATASETS, 'compute_dtype': ('float32', 'bfloat16'),
            'precision': PRECISIONS, 'param_dtype': ('float32', 'float64'), 'digits_source': DIGIT_SOURCES,
            'test_checkpoint': ('', 'latest', 'best')}


def _type_problems(cfg: Mapping[str, Any]) -> list[str]:
  """Each key given in ``cfg`` whose value is not of the type of its default (an int is a valid float)."""
  problems = []
  for key, default in {**OFFICIAL_DEFAULTS, **EXTRA_DEFAULTS}.items():
    if key not in cfg:
      continue
    value = cfg[key]
    if key == 'scan_unroll' and value is True:  # An integer, or True: every step in one loop body.
      continue
    if isinstance(default, bool):
      if not isinstance(value, (bool, np.bool_)):
        problems.append(f'{key}={value!r}: expected True or False')
    elif isinstance(default, int):
      if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        problems.append(f'{key}={value!r}: expected an integer')
    elif isinstance(default, float):
      if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        problems.append(f'{key}={value!r}: expected a number')
    elif not isinstance(value, str):
      problems.append(f'{key}={value!r}: expected a string')
  return problems


def _range_problems(cfg: Mapping[str, Any]) -> list[str]:
  """Each key on its own (of the right type): its valid range or choices."""
  problems = []
  for key in _POSITIVE:
    if cfg[key] < 1:
      problems.append(f'{key}={cfg[key]} must be a positive integer')
  for key, zero in _NON_NEGATIVE.items():
    if cfg[key] < 0:
      problems.append(f'{key}={cfg[key]} must be >= 0 (0: {zero})')
  for key in _MIN_2:
    if cfg[key] < 2:
      problems.append(f'{key}={cfg[key]}: an MLP needs at least 2 layers; use {key} >= 2')
  for key in _POSITIVE_FLOATS:
    if not (math.isfinite(cfg[key]) and cfg[key] > 0):
      problems.append(f'{key}={cfg[key]} must be a finite number > 0')
  for key in _NON_NEGATIVE_FLOATS:
    if not (math.isfinite(cfg[key]) and cfg[key] >= 0):
      problems.append(f'{key}={cfg[key]} must be a finite number >= 0')
  for key, choices in _CHOICES.items():
    if cfg[key] not in choices:
      what = {'archi': 'unknown architecture ', 'dataset': 'unknown '}.get(key, '')
      problems.append(f'{what}{key}={cfg[key]!r}; expected one of {choices}' + (
          ' (float32 convolutions and matrix products; bfloat16 compute is compute_dtype=bfloat16)'
          if key == 'precision' else " (float64 needs jax_enable_x64)" if key == 'param_dtype' else ''))
  if cfg['nx'] != FRAME_SIZE:
    problems.append(f"nx={cfg['nx']}: only {FRAME_SIZE}x{FRAME_SIZE} frames are supported (the official "
                    f'architectures are 64x64); use nx={FRAME_SIZE}')
  if cfg['nc'] not in (1, 3):
    problems.append(f"nc={cfg['nc']}: frames must have 1 or 3 channels" +
                    (' (nc=0, the data\'s, is resolved by launch.py)' if cfg['nc'] == 0 else ''))
  if cfg['seq_len'] < 2:
    problems.append(f"seq_len={cfg['seq_len']}: a training clip needs at least 2 frames (the dynamics run "
                    'between frames); use seq_len >= 2')
  if not 0 <= cfg['seed'] < SEED_LIMIT:
    problems.append(f"seed={cfg['seed']} must be in [0, 2**32) (a 32-bit seed), e.g. seed=0")
  if cfg['process_id'] < -1:
    problems.append(f"process_id={cfg['process_id']} must be >= 0, or -1 (from the environment)")
  if cfg['mesh_data_axis'] == 0 or cfg['mesh_data_axis'] < -1:
    problems.append(f"mesh_data_axis={cfg['mesh_data_axis']} must be a positive device count, or -1 (all devices)")
  address = cfg['coordinator_address']
  host, _, port = address.rpartition(':')
  if address and not (host and port.isdigit() and 0 < int(port) < 65536):
    problems.append(f'coordinator_address={address!r}: expected HOST:PORT (e.g. 10.0.0.1:1234), or \'\' (from '
                    'the environment)')
  return problems


def _relation_problems(cfg: Mapping[str, Any]) -> list[str]:
  """The keys that constrain each other (each one already valid on its own)."""
  problems = []
  nt_inf, nt_cond, seq_len = cfg['nt_inf'], cfg['nt_cond'], cfg['seq_len']
  if seq_len < nt_inf:
    problems.append(f'seq_len={seq_len} is shorter than nt_inf={nt_inf}: y_1 and w are inferred from nt_inf '
                    f'frames of each training clip; use seq_len >= {nt_inf} or a smaller nt_inf')
  if nt_cond < nt_inf:
    problems.append(f'nt_cond={nt_cond} is smaller than nt_inf={nt_inf}: a prediction infers y_1 and w from nt_inf '
                    f'of the nt_cond given frames; use nt_cond >= {nt_inf} or a smaller nt_inf')
  val_len = seq_len_test(cfg)
  if val_len <= nt_cond:
    lengths = (f"seq_len_test={val_len}" if cfg['seq_len_test'] else
               f'seq_len={val_len} (the validation length while seq_len_test=0)')
    problems.append(f'{lengths} leaves no frame to predict after nt_cond={nt_cond} conditioning frames: use '
                    f'seq_len_test >= {nt_cond + 1} or a smaller nt_cond')
  protocol = test_protocol(cfg) if cfg['dataset'] in DATASETS else None  # An unknown dataset has no paper protocol.
  test_cond = ('test_nt_cond' if cfg['test_nt_cond'] else 'nt_cond') + f"={protocol and protocol['nt_cond']}"
  if protocol and protocol['nt_cond'] < nt_inf and cfg['test_nt_cond']:
    problems.append(f'{test_cond} (the test conditioning frames) is smaller than nt_inf={nt_inf}; use '
                    f'test_nt_cond >= {nt_inf}, or 0 (nt_cond)')
  if protocol and protocol['nt_gen'] <= protocol['nt_cond']:
    test_gen = (f"test_nt_gen={protocol['nt_gen']}" if cfg['test_nt_gen'] else
                f"test_nt_gen=0 (the paper's {protocol['nt_gen']} frames for {protocol_dataset(cfg)})")
    problems.append(f'{test_gen} leaves no test frame to predict after {test_cond}: use test_nt_gen >= '
                    f"{protocol['nt_cond'] + 1}")
  burnin, n_iter = cfg['lr_scheduling_burnin'], cfg['lr_scheduling_n_iter']
  if burnin + n_iter < 1:
    problems.append(f'lr_scheduling_burnin={burnin} and lr_scheduling_n_iter={n_iter}: the run would train no step '
                    '(training lasts lr_scheduling_burnin + lr_scheduling_n_iter steps); make their sum >= 1')
  set_keys = [k for k, unset in (('coordinator_address', ''), ('num_processes', 0), ('process_id', -1))
              if cfg[k] != unset]
  if set_keys and not cfg['distributed']:
    one = len(set_keys) == 1
    problems.append(f"{', '.join(f'{k}={cfg[k]!r}' for k in set_keys)} appl{'ies' if one else 'y'} to multi-process "
                    f"runs only: set distributed=True (or leave {'it' if one else 'them'} unset)")
  if cfg['num_processes'] and cfg['process_id'] >= cfg['num_processes']:
    problems.append(f"process_id={cfg['process_id']} is out of range for num_processes={cfg['num_processes']}: "
                    f"use 0 to {cfg['num_processes'] - 1}")
  if cfg['dataset'] not in ('smmnist', 'mmnist'):
    moving_mnist = [f'{k}={cfg[k]!r}' for k, unset in (('deterministic', False), ('digits_source', 'auto'))
                    if cfg[k] != unset]
    if moving_mnist:
      problems.append(f"{', '.join(moving_mnist)} appl{'ies' if len(moving_mnist) == 1 else 'y'} to Moving MNIST "
                      f"only, not to dataset={cfg['dataset']!r}: leave the default")
  return problems


def _official_value(key: str, value: Any, default: Any) -> Any:
  """``value`` of an official config key as the type of our ``default``; ConfigError for a value of another kind."""
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, bool):
    ok = isinstance(value, bool) or (number and value in (0, 1))
    kind, value = 'true or false', bool(value) if ok else value
  elif isinstance(default, int):
    ok = isinstance(value, bool) or (number and float(value).is_integer())
    kind, value = 'an integer', int(value) if ok else value
  elif isinstance(default, float):
    ok, kind, value = number, 'a number', float(value) if number else value
  else:
    ok, kind = isinstance(value, type(default)), f'a {type(default).__name__}'
  if not ok:
    raise ConfigError(f'{key}={value!r} is not {kind}: correct it in the config file')
  return value


def from_official(official: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Our config from an official ``config.json`` dict. Unknown official keys are ignored."""
  cfg = default_config()
  for key, value in official.items():
    if key not in OFFICIAL_DEFAULTS and key not in EXTRA_DEFAULTS:
      continue  # Official options we have no use for (apex_amp, n_workers, ...).
    if value is None:
      continue  # The official code uses None for "not set"; keep our default.
    cfg[key] = _official_value(key, value, cfg[key])
  if official.get('dataset') == 'smmnist' and official.get('deterministic'):
    cfg.dataset = 'mmnist'
  validate(cfg)
  return cfg


def to_official(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The official flat ``config.json`` form (what the official ``test.py`` reads)."""
  out = {key: cfg[key] for key in OFFICIAL_DEFAULTS}
  # The official code names both Moving MNIST variants 'smmnist' and uses the 'deterministic' flag.
  if out['dataset'] == 'mmnist':
    out['dataset'], out['deterministic'] = 'smmnist', True
  for key in ('chkpt_interval', 'seq_len_test'):
    if not out[key]:
      out[key] = None
  return out


def load_official_json(path: str) -> ml_collections.ConfigDict:
  """Reads an official ``config.json``."""
  if not os.path.isfile(path):
    raise ConfigError(f'config file not found: {path}')
  try:
    with open(path, encoding='utf-8') as f:
      official = json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f'{path} is not a JSON config ({e})') from None
  if not isinstance(official, dict):
    raise ConfigError(f'{path} is not a flat JSON object of options')
  missing = [k for k in MODEL_KEYS if k not in official]
  if missing:
    raise ConfigError(f'{path} lacks the model option(s) {missing}')
  try:
    return from_official(official)
  except ConfigError as e:
    raise ConfigError(f'{path}: {e}') from None


def model_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The keyword arguments of ``srvp_jax.model.SRVP`` taken from a config."""
  return {key: cfg[key] for key in MODEL_KEYS}


def protocol_dataset(cfg: Mapping[str, Any]) -> str:
  """The dataset's name in the paper's tables: deterministic Moving MNIST is 'mmnist'."""
  if cfg['dataset'] in ('smmnist', 'mmnist') and (cfg['dataset'] == 'mmnist' or cfg['deterministic']):
    return 'mmnist'
  return cfg['dataset']


def test_protocol(cfg: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
  """The test protocol of ``cfg``: nt_cond, nt_gen, n_samples, checkpoint (config keys, else the paper's).

  ``overrides`` (e.g. the evaluation's command-line flags) replace those of its values that are not None.
  """
  paper = PAPER_TEST[protocol_dataset(cfg)]
  protocol = {'nt_cond': int(cfg.get('test_nt_cond', 0) or cfg['nt_cond']),
              'nt_gen': int(cfg.get('test_nt_gen', 0) or paper['nt_gen']),
              'n_samples': int(cfg.get('test_n_samples', 0) or paper['n_samples']),
              'checkpoint': str(cfg.get('test_checkpoint', '') or paper['checkpoint'])}
  unknown = set(overrides) - set(protocol)
  if unknown:
    raise TypeError(f'unknown test protocol key(s) {sorted(unknown)}')
  protocol.update({k: type(protocol[k])(v) for k, v in overrides.items() if v is not None})
  return protocol


def seq_len_test(cfg: Mapping[str, Any]) -> int:
  """Validation / test sequence length (``seq_len_test`` when set, else ``seq_len``)."""
  return int(cfg['seq_len_test'] or cfg['seq_len'])
