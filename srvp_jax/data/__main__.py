"""``python -m srvp_jax.data``: the data CLI, which lives with the preparation (``srvp_jax/preparation/cli.py``).

The entry point only: no module of ``srvp_jax.data`` imports the preparation side.
"""

import sys

from srvp_jax.preparation.cli import main

if __name__ == '__main__':
  sys.exit(main())
