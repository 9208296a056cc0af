"""Training, by concept:

* ``step``: the pure, jit-compiled, donated train step and its optimizer (Adam, the official schedule);
* ``loop``: ``train_and_evaluate``, start-up checks and the periodic log / validation / checkpoint actions;
* ``runtime``: the console, SIGINT/SIGTERM handling and the metric writers;
* ``validation``: the official validation (best-of-N PSNR) and its GIF/PNG media.
"""

from srvp_jax.train.loop import NonFiniteError, PeriodicActions, train_and_evaluate
from srvp_jax.train.runtime import Interrupted

__all__ = ['Interrupted', 'NonFiniteError', 'PeriodicActions', 'train_and_evaluate']
