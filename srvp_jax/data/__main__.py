"""``python -m srvp_jax.data``: see ``srvp_jax/data/cli.py``."""

import sys

from srvp_jax.data.cli import main

if __name__ == '__main__':
  sys.exit(main())
