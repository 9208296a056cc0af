"""Trains SRVP: ``python launch.py --config configs/bair.py --workdir DIR [--config.key=value ...]``.

Rerunning the same command in the same workdir resumes from the latest intact checkpoint; Ctrl-C or
SIGTERM saves the last finished step first. Library logs (absl, orbax, TensorFlow) are off unless
``--verbosity=0`` (INFO) or ``--verbosity=1`` (DEBUG) is given. Several hosts: the same command on
every host with ``--config.distributed=True`` (see ``initialize_distributed``).

The flags are absl's, as in the flax examples: ml_collections' ``--config FILE`` with ``--config.KEY=VALUE``
overrides, ``--workdir`` and ``--verbosity``; the other tools take argparse options of the same
``--name value`` style. Both report through ``srvp_jax.cli``: errors are one ``error: ...`` line, exit
status 2 for a bad config or workdir, 1 when training fails (non-finite loss, disk full); 128 + the signal number
after a SIGINT/SIGTERM save.
"""

import difflib
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from srvp_jax import checkpoints
from srvp_jax import cli
from srvp_jax import config as config_lib
from srvp_jax import data
from srvp_jax import train
from srvp_jax.data import DataError

USAGE = 'python launch.py --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]'
_CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file of configs/ (get_config()).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and samples go (resumes if present).')


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors (missing file, mistyped key, bad value) instead of tracebacks."""
  known = set(config_lib.default_config().keys())
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0].split('.', 1)[0]
      if key not in known:
        sys.exit(cli.error(f'{config_lib.did_you_mean(key)} in {arg}'))
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(cli.error(f'{e}; usage: {USAGE}'))
  for name in ('config', 'workdir'):
    if getattr(flags.FLAGS, name) is None:
      sys.exit(cli.error(f'--{name} is required; usage: python launch.py --config configs/NAME.py --workdir DIR'))
  path = flags.FLAGS['config'].config_filename
  if not os.path.isfile(path):
    close = difflib.get_close_matches(os.path.basename(path), os.listdir('configs') if os.path.isdir('configs') else [])
    sys.exit(cli.error(f'config file not found: {path}' + (f' (did you mean configs/{close[0]}?)' if close else
                                                             '; the paper setups are configs/*.py')))
  return rest


def load_config():
  """The config of the flags, overrides applied, validated once (the config file's own errors are one line)."""
  try:
    cfg = _CONFIG.value
  except Exception as e:  # pylint: disable=broad-except
    # config_flags wraps whatever went wrong (file, override type) in a few layers: keep the first line.
    text = ' '.join(str(e).replace('\\n', ' ').split())
    raise cli.UsageError(f'cannot load the config: {text[:400]}') from None
  if cfg.nc == 0 and cfg.dataset in data.DATASETS:  # nc=0: the data's channel count (configs/videos.py).
    try:
      cfg.nc = data.dataset_class(cfg.dataset)(cfg, cfg.data_dir).nc
    except (DataError, OSError) as e:
      raise cli.UsageError(str(e)) from None
  try:
    config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    raise cli.UsageError(str(e)) from None
  return cfg


def initialize_distributed(cfg) -> None:
  """``jax.distributed.initialize`` with the config's (or JAX_* environment's) coordinator, count and id.

  Unset values fall back to ``$JAX_COORDINATOR_ADDRESS``, ``$JAX_NUM_PROCESSES`` and ``$JAX_PROCESS_ID``,
  then to the cluster's auto-detection (SLURM, Open MPI, TPU pods, ...).
  """
  address = cfg.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS') or None
  num = int(cfg.num_processes) or int(os.environ.get('JAX_NUM_PROCESSES', 0)) or None
  pid = int(cfg.process_id) if int(cfg.process_id) >= 0 else os.environ.get('JAX_PROCESS_ID')
  pid = None if pid is None else int(pid)
  given = [v is not None for v in (address, num, pid)]
  if any(given) and not all(given):
    raise cli.UsageError('multi-process training needs the coordinator address, the process count and this process '
                         'id together (--config.coordinator_address=HOST:PORT --config.num_processes=N '
                         '--config.process_id=I, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), '
                         'or none of them on a cluster JAX detects (SLURM, Open MPI, TPU)')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU devices of several processes reduce.
  try:
    jax.distributed.initialize(address, num, pid)
  except (ValueError, RuntimeError) as e:
    raise cli.Failure(f'jax.distributed.initialize failed: {cli.first_line(e, limit=None)}') from None


def main(argv):
  try:
    return cli.main(_main, argv)
  except KeyboardInterrupt:  # Before training installed its handlers (imports, config): nothing was written.
    print('interrupted before training started; nothing written', file=sys.stderr, flush=True)
    return 130


def _main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments {argv[1:]}')
  cli.start(verbose=flags.FLAGS['verbosity'].present, cache_compilations=True)
  cfg = load_config()
  if cfg.distributed:
    initialize_distributed(cfg)  # Before anything touches the devices.
  try:
    train.train_and_evaluate(cfg, _WORKDIR.value, progress=sys.stderr.isatty())  # The bar is for terminals.
  except train.Interrupted as e:
    return e.exit_code  # The save message is printed.
  except (train.NonFiniteError, checkpoints.CheckpointWriteError) as e:
    raise cli.Failure(str(e)) from None
  except (config_lib.ConfigError, FileNotFoundError, DataError) as e:
    raise cli.UsageError(str(e)) from None
  except (ValueError, OSError) as e:
    if checkpoints.is_no_space(e):  # Logs, samples: the checkpoints saved so far are intact.
      raise cli.Failure(f'no space left on device writing in {_WORKDIR.value}: free space and rerun the same command '
                        'to resume') from None
    if not type(e).__module__.startswith('srvp_jax'):
      raise
    raise cli.UsageError(str(e)) from None  # Bad input found by our own code (data files, checkpoints): one line.
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
