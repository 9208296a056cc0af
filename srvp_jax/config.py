"""Experiment configuration: one flat ``ml_collections.ConfigDict`` whose keys are the official ones.

The official code stores every option of ``train.py`` in a flat ``config.json`` next to each
checkpoint. We keep exactly those names (so official configs load as ours and ours export as
official ones) and add a few of our own (``compute_dtype``, ``init_from``, ...). The dict is
locked: an unknown or mistyped key is an error, never a silently ignored option.
"""

from __future__ import annotations

import difflib
import json
import os
from typing import Any, Mapping

import ml_collections

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
  """One-line, actionable errors for configurations the model cannot run."""
  known = set(OFFICIAL_DEFAULTS) | set(EXTRA_DEFAULTS)
  unknown = sorted(set(cfg.keys()) - known)
  if unknown:
    raise ConfigError('; '.join(did_you_mean(k) for k in unknown))
  if cfg['archi'] not in ARCHITECTURES:
    raise ConfigError(f"unknown architecture archi={cfg['archi']!r}; expected one of {ARCHITECTURES}")
  if cfg['nx'] != FRAME_SIZE:
    raise ConfigError(f"nx={cfg['nx']}: only {FRAME_SIZE}x{FRAME_SIZE} frames are supported (the official "
                      'architectures are 64x64)')
  if cfg['nc'] not in (1, 3):
    raise ConfigError(f"nc={cfg['nc']}: frames must have 1 or 3 channels" +
                      (' (nc=0, the data\'s, is resolved by launch.py)' if cfg['nc'] == 0 else ''))
  for key in ('nf', 'nhx', 'ny', 'nz', 'nt_inf', 'nh_inf', 'nh_res', 'n_euler_steps', 'batch_size'):
    if int(cfg[key]) < 1:
      raise ConfigError(f'{key}={cfg[key]} must be a positive integer')
  for key in ('nlayers_inf', 'nlayers_res'):
    if int(cfg[key]) < 2:
      raise ConfigError(f'{key}={cfg[key]}: an MLP needs at least 2 layers')
  if cfg['compute_dtype'] not in ('float32', 'bfloat16'):
    raise ConfigError(f"compute_dtype={cfg['compute_dtype']!r}: expected 'float32' or 'bfloat16'")
  if cfg.get('precision', 'float32') not in PRECISIONS:
    raise ConfigError(f"precision={cfg['precision']!r}: expected one of {PRECISIONS} (float32 convolutions and "
                      'matrix products; bfloat16 compute is compute_dtype=bfloat16)')
  unroll = cfg.get('scan_unroll', 0)
  if not (unroll is True or (isinstance(unroll, int) and not isinstance(unroll, bool) and unroll >= 0)):
    raise ConfigError(f'scan_unroll={unroll!r}: expected an integer >= 1, True (fully unrolled scans) or 0 (the '
                      'backend\'s: 1 on CPUs and TPUs, True on GPUs)')
  if cfg['param_dtype'] not in ('float32', 'float64'):
    raise ConfigError(f"param_dtype={cfg['param_dtype']!r}: expected 'float32' or 'float64' (float64 needs "
                      'jax_enable_x64)')
  if cfg['dataset'] not in DATASETS:
    raise ConfigError(f"unknown dataset={cfg['dataset']!r}; expected one of {DATASETS}")
  for key in ('val_interval', 'log_interval', 'keep_checkpoints', 'batch_size_test', 'n_iter_test', 'n_samples_test',
              'val_sample_chunk'):
    if int(cfg[key]) < 1:
      raise ConfigError(f'{key}={cfg[key]} must be a positive integer')
  for key in ('chkpt_interval', 'keep_period', 'profile_steps', 'num_processes'):
    if int(cfg[key]) < 0:
      raise ConfigError(f'{key}={cfg[key]} must be 0 (off) or a positive integer')
  if cfg['seq_len'] < cfg['nt_inf']:
    raise ConfigError(f"seq_len={cfg['seq_len']} is shorter than nt_inf={cfg['nt_inf']}")
  for key in ('test_nt_cond', 'test_nt_gen', 'test_n_samples'):
    if int(cfg.get(key, 0)) < 0:
      raise ConfigError(f'{key}={cfg[key]} must be >= 0 (0: the paper\'s value for the dataset)')
  if not isinstance(cfg.get('val_resample', False), bool):
    raise ConfigError(f"val_resample={cfg['val_resample']!r}: expected True or False")
  if cfg.get('test_checkpoint', '') not in ('', 'latest', 'best'):
    raise ConfigError(f"test_checkpoint={cfg['test_checkpoint']!r}: expected 'latest' or 'best'")


def from_official(official: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Our config from an official ``config.json`` dict. Unknown official keys are ignored."""
  cfg = default_config()
  for key, value in official.items():
    if key not in OFFICIAL_DEFAULTS and key not in EXTRA_DEFAULTS:
      continue  # Official options we have no use for (apex_amp, n_workers, ...).
    if value is None:
      continue  # The official code uses None for "not set"; keep our default.
    default = cfg[key]
    if isinstance(default, bool):
      value = bool(value)
    elif isinstance(default, int) and not isinstance(value, bool):
      value = int(value)
    elif isinstance(default, float):
      value = float(value)
    cfg[key] = value
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
  return from_official(official)


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
