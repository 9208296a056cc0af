"""Trains SRVP: ``python launch.py --config configs/bair.py --workdir DIR [--config.key=value ...]``.

Rerunning the same command in the same workdir resumes from the latest intact checkpoint; Ctrl-C or
SIGTERM saves the last finished step first. Library logs (absl, orbax, TensorFlow) are off unless
``--verbosity=0`` (INFO) or ``--verbosity=1`` (DEBUG) is given. Several hosts: the same command on
every host with ``--config.distributed=True`` (see ``initialize_distributed``); each then supervises its
training in a child process, so that a lost peer process is one line (``srvp_jax.train.supervisor``).
One run per workdir: a second copy is refused while the first holds the workdir's lock.

The flags are absl's, as in the flax examples: ml_collections' ``--config FILE`` with ``--config.KEY=VALUE``
overrides, ``--workdir`` and ``--verbosity``; the other tools take argparse options of the same
``--name value`` style. Both report through ``srvp_jax.cli``: errors are one ``error: ...`` line, exit
status 2 for a bad config or workdir (one in use by another run included), 1 when training fails
(non-finite loss, disk full, a lost peer process); 128 + the signal number after a SIGINT/SIGTERM save.
"""

import difflib
import os
import sys
import traceback

import jax
from absl import app, flags
from ml_collections import config_flags

from srvp_jax import checkpoints
from srvp_jax import cli
from srvp_jax import config as config_lib
from srvp_jax import data
from srvp_jax import import_order
from srvp_jax import train
from srvp_jax.data import DataError
from srvp_jax.train import supervisor

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
  except Exception as e:  # pylint: disable=broad-except  # The config file's own code failed (loaded here).
    sys.exit(cli.error(config_file_error(e, argv)))
  for name in ('config', 'workdir'):
    if getattr(flags.FLAGS, name) is None:
      sys.exit(cli.error(f'--{name} is required; usage: python launch.py --config configs/NAME.py --workdir DIR'))
  path = flags.FLAGS['config'].config_filename
  if not os.path.isfile(path):
    close = difflib.get_close_matches(os.path.basename(path), os.listdir('configs') if os.path.isdir('configs') else [])
    sys.exit(cli.error(f'config file not found: {path}' + (f' (did you mean configs/{close[0]}?)' if close else
                                                             '; the paper setups are configs/*.py')))
  return rest


def config_file_error(e: BaseException, argv: list[str]) -> str:
  """One line for an error raised by the code of the config file (or of a file it imports): what and where."""
  given = next((a.split('=', 1)[1] if '=' in a else argv[i + 2] for i, a in enumerate(argv[1:])
                if a.split('=', 1)[0] == '--config' and ('=' in a or i + 2 < len(argv))), None)
  if isinstance(e, SyntaxError) and e.filename:
    where = f'{e.filename}, line {e.lineno}'
  else:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith('<')
              and 'site-packages' not in f.filename and os.path.abspath(f.filename) != os.path.abspath(__file__)]
    ours = [f for f in frames if given and os.path.realpath(f.filename) == os.path.realpath(given)]
    frame = (ours or frames or [None])[-1]
    where = f'{frame.filename}, line {frame.lineno}' if frame else given
  text = e.msg if isinstance(e, SyntaxError) else cli.first_line(e, limit=200)
  return f'the config file {given} failed to load: {type(e).__name__}: {text} at {where}; correct it there'


def check_workdir(workdir: str) -> None:
  """UsageError unless ``workdir`` is a folder, or can be made one, that this user can write."""
  path = os.path.abspath(workdir)
  if os.path.lexists(path) and not os.path.isdir(path):
    raise cli.UsageError(f'--workdir {workdir} is a file, not a folder: give a folder (a new one, or a run\'s to '
                         'resume it)')
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise cli.UsageError(f'--workdir {workdir} cannot be created: {existing} is a file')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise cli.UsageError(f'--workdir {workdir} cannot be written: {existing} is not writable by this user')


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
  # Ctrl-C before training installed its handlers (imports, config, data checks): nothing was written.
  return cli.main(_main, argv, interrupted='interrupted (Ctrl-C) before training started; nothing written',
                  program=True)


def _main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments {argv[1:]}')
  verbose = flags.FLAGS['verbosity'].present
  cli.start(verbose=verbose, cache_compilations=True)
  import_order.without_torchvision()  # Training computes no LPIPS: TensorBoard's TensorFlow needs no torch first.
  check_workdir(_WORKDIR.value)
  cfg = load_config()
  if cfg.distributed and not supervisor.is_child():
    process_id = int(cfg.process_id) if int(cfg.process_id) >= 0 else os.environ.get('JAX_PROCESS_ID')
    return supervisor.supervise([os.path.abspath(sys.argv[0]), *sys.argv[1:]], _WORKDIR.value,
                                None if process_id is None else int(process_id),
                                int(cfg.num_processes) or int(os.environ.get('JAX_NUM_PROCESSES', 0)) or None, verbose,
                                cfg.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS'))
  if supervisor.is_child():
    supervisor.child_setup()
  if cfg.distributed:
    initialize_distributed(cfg)  # Before anything touches the devices.
  progress = supervisor.child_progress() if supervisor.is_child() else sys.stderr.isatty()  # Bars for terminals.
  try:
    train.train_and_evaluate(cfg, _WORKDIR.value, progress=progress)
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
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() > 1 and supervisor.is_peer_loss(e):  # A collective failed: a peer process is gone.
      supervisor.exit_lost(e, jax.process_index(), jax.process_count(), _WORKDIR.value)
    raise
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
