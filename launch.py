"""Trains SRVP: ``python launch.py --config configs/bair.py --workdir DIR [--config.key=value ...]``.

Rerunning the same command in the same workdir resumes from the latest checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from srvp_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file of configs/ (get_config()).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and samples go (resumes if present).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  from srvp_jax import train  # pylint: disable=import-outside-toplevel
  from srvp_jax.data import DataError  # pylint: disable=import-outside-toplevel
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (config_lib.ConfigError, FileNotFoundError, DataError, train.NonFiniteError) as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
