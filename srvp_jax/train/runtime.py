"""What a training run shows and writes around its steps: the console, signal handling and metric writers.

* ``Console``: the progress bar (interactive runs, process 0) and the few lines a run prints;
* ``StopRequest`` / ``Interrupted``: SIGINT/SIGTERM turned into "finish the step, save, stop";
* ``make_writer``: clu's writers (TensorBoard, absl logging) and ``metrics.jsonl`` (``JsonlWriter``);
  clu imports TensorFlow, so it is imported lazily (``clu_modules``) with TensorFlow's C++ start-up
  notes kept off stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from srvp_jax import checkpoints
from srvp_jax import import_order


def clu_modules():
  """clu's ``metric_writers`` and ``periodic_actions`` (they import TensorFlow: lazily, GPUs hidden from it)."""
  quiet = 'tensorflow' not in sys.modules and logging.get_verbosity() < logging.INFO
  with _stderr_silenced(quiet):  # TensorFlow's C++ start-up notes (oneDNN, absl) bypass every log level.
    try:
      import_order.import_tensorflow()
    except ImportError as e:
      logging.info('TensorBoard events disabled (%s)', e)
    from clu import metric_writers, periodic_actions  # pylint: disable=import-outside-toplevel  # They import TF.
  return metric_writers, periodic_actions


@contextlib.contextmanager
def _stderr_silenced(active: bool):
  """Points file descriptor 2 at /dev/null while active (C++ libraries write there directly)."""
  if not active:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


class JsonlWriter:
  """clu's ``MetricWriter`` interface for ``metrics.jsonl``: scalars, one JSON object per line.

  Only scalars are written (no TensorBoard needed to read them); the other kinds go to TensorBoard only.
  """

  def __init__(self, path: str):
    self.path = path

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    pass

  def close(self):
    pass


def make_writer(workdir: str):
  """clu's default writer (TensorBoard + absl logging; logging only off process 0) and ``metrics.jsonl``."""
  metric_writers, _ = clu_modules()
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(just_logging=True)
  return metric_writers.MultiWriter([metric_writers.create_default_writer(os.path.join(workdir, 'tensorboard')),
                                     JsonlWriter(os.path.join(workdir, checkpoints.METRICS_FILE))])

class Console:
  """The progress bar (interactive runs, process 0) and the few lines a run prints."""

  def __init__(self, total: int, initial: int, show_bar: bool, is_main: bool):
    self.is_main = is_main
    self.bar = tqdm(total=total, initial=initial, disable=not (show_bar and is_main), dynamic_ncols=True,
                    unit='step', leave=True)
    self.postfix = {}

  def line(self, text: str) -> None:
    if self.is_main:
      if self.bar.disable:
        print(text, file=sys.stderr, flush=True)
      else:
        self.bar.write(text, file=sys.stderr)

  def update(self, n: int = 1, **postfix: str) -> None:
    self.postfix.update(postfix)
    if postfix:
      self.bar.set_postfix(self.postfix, refresh=False)
    self.bar.update(n)

  def close(self) -> None:
    self.bar.close()


# --------------------------------------------------------------------------------------------------
# Signals.
class Interrupted(KeyboardInterrupt):
  """Training stopped by SIGINT/SIGTERM (or Ctrl-C) after saving ``step``; ``exit_code`` is 128 + signal."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + int(signum)


class StopRequest:
  """SIGINT/SIGTERM set a flag the loop reads between steps (a donated step is never cut in half).

  A second signal exits at once without saving; the same signal again within ``SAME_SIGNAL_S`` is the
  same request (a terminal's Ctrl-C or a scheduler's signal reaches both a multi-process launcher and the
  training process it forwards signals to). Multi-process runs agree on the flag every step, so all
  processes save the same step together.
  """
  SAME_SIGNAL_S = 1.0

  def __init__(self):
    self.signum, self._previous = None, {}
    self._received, self._since = None, 0.0  # The signal this process received (not learnt from the others), when.
    self.say = lambda text: print(text, file=sys.stderr, flush=True)  # The console's, once there is one.

  def _handle(self, signum, frame):
    del frame
    if self._received is not None:
      if signum == self._received and time.monotonic() - self._since < self.SAME_SIGNAL_S:
        return
      print(f'\n{signal.Signals(signum).name} again: exiting without saving', file=sys.stderr, flush=True)
      os._exit(128 + signum)  # pylint: disable=protected-access
    self._received, self._since = signum, time.monotonic()
    self.signum = self.signum or signum
    self.say(f'{signal.Signals(signum).name} received: finishing the current step, then saving '
             '(send it again to exit without saving)')

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGINT, signal.SIGTERM):
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)

  def requested(self) -> bool:
    flag = self.signum is not None
    if jax.process_count() > 1:
      signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
      if self.signum is None and np.max(signums):
        self.signum = int(np.max(signums))
      flag = bool(np.max(signums))
    return flag

