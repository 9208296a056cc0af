"""The command-line layer every tool shares: argument parsing, one-line errors, log silencing, import order.

The tools are ``launch.py``, ``convert_torch_ckpt.py`` and ``python -m srvp_jax.{data,evaluate,predict,
benchmark,parity}``. All take GNU-style ``--name value`` (or ``--name=value``) options with underscores in
their names, and their ``--help`` ends with examples. The argparse tools build a ``Parser`` and run their
body through ``main``; ``launch.py`` parses with absl and ml_collections, as the flax examples do
(``--config FILE`` plus ``--config.KEY=VALUE`` overrides, ``--workdir``, absl's ``--verbosity``), and
reports its errors through ``error`` with the same exit statuses.

Errors are one ``error: ...`` line on stderr, never a traceback: ``UsageError`` (bad arguments, or
input found unusable before any work: missing folder, checkpoint, config) exits with status 2,
``Failure`` (the work itself failed: out of memory, missing or broken data) with status 1.
Ctrl-C is one ``error: interrupted ...`` line and status 130 (``main``).

``start`` is the tools' first step after parsing: it silences the libraries' INFO / WARNING logs
(absl, orbax, TensorFlow's C++ notes) unless ``--verbose``, imports torch first when the tool will
use it (``srvp_jax.import_order``) and, for the tools that compile the model's programs (training,
evaluation, predict), turns on JAX's persistent compilation cache (``compilation_cache``).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
from typing import Callable, Sequence

from absl import logging as absl_logging

from srvp_jax import import_order

USAGE = 2
FAILURE = 1


class UsageError(Exception):
  """Bad arguments, or input found unusable before any work: one ``error: ...`` line, exit status 2."""
  code = USAGE


class Failure(Exception):
  """The work itself failed: one ``error: ...`` line, exit status 1."""
  code = FAILURE


def first_line(e: BaseException, limit: int | None = 300) -> str:
  """The first line of an exception's message (its type's name when empty), at most ``limit`` characters."""
  text = str(e).strip()
  return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def error(message: str, code: int = USAGE) -> int:
  """Prints ``error: message`` on stderr; returns ``code`` (the exit status)."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  return code


def number(cast: Callable[[str], float], minimum: float, requirement: str, strict: bool = False):
  """An argparse type: ``cast(text)``, >= ``minimum`` (> when ``strict``), else one line saying ``requirement``."""
  noun = 'an integer' if cast is int else 'a number'

  def parse(text: str):
    try:
      value = cast(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'{text!r} is not {noun}') from None
    if not (value > minimum if strict else value >= minimum):
      raise argparse.ArgumentTypeError(f'{text} must be {requirement}')
    return value

  return parse


class Parser(argparse.ArgumentParser):
  """argparse with the examples after ``--help``, a ``--verbose`` option and one-line errors (UsageError).

  Sub-command parsers (``add_subparsers().add_parser``) are Parsers too; their errors name their own
  ``--help``. ``--verbose`` is on the parser made with ``verbose=True``: the top one by default, the
  sub-command parsers instead when the top one is made with ``verbose=False`` (``add_parser(..., verbose=True)``).
  """

  def __init__(self, *args, examples: str | None = None, verbose: bool = True, **kwargs):
    kwargs.setdefault('formatter_class', argparse.RawDescriptionHelpFormatter)
    if examples is not None:
      kwargs['epilog'] = examples
    super().__init__(*args, **kwargs)
    if verbose:
      self.add_argument('--verbose', action='store_true',
                        help='Show the libraries\' INFO and WARNING logs (absl, orbax, TensorFlow).')

  def add_subparsers(self, **kwargs):
    kwargs.setdefault('parser_class', functools.partial(Parser, verbose=False))
    return super().add_subparsers(**kwargs)

  def error(self, message):
    raise UsageError(f'{message} (see {self.prog} --help)')


INTERRUPTED = 130  # 128 + SIGINT, the shells' status for Ctrl-C.


def main(body: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None,
         interrupted: str = 'interrupted (Ctrl-C)', program: bool | None = None) -> int:
  """Runs a tool's ``body(argv)``; a UsageError or Failure becomes its one line and exit status.

  Ctrl-C becomes ``error: <interrupted>`` and status 130: when the tool is the program (``program``, by default
  ``argv is None``: it parses the process's own command line) through ``exit_on_ctrl_c``, otherwise (a call from
  Python) by catching KeyboardInterrupt.
  """
  program = argv is None if program is None else program
  restore = exit_on_ctrl_c(interrupted) if program else None
  try:
    return body(argv)
  except (UsageError, Failure) as e:
    return error(str(e), e.code)
  except KeyboardInterrupt:
    return error(interrupted, INTERRUPTED)
  finally:
    if restore is not None:
      restore()


def exit_on_ctrl_c(line: str) -> Callable[[], None] | None:
  """Makes Ctrl-C end the process at once: ``error: <line>`` and ``os._exit(130)``; returns the undo.

  Not a KeyboardInterrupt: raised inside a garbage-collection callback (JAX has one) it is printed as
  "Exception ignored" and lost, the tool running on, and a normal interpreter exit with XLA / torch threads
  still running can crash. A thread woken by the signal's wakeup fd ends the process also while the main thread
  is inside a long compiled call. While another handler is installed (training saves on Ctrl-C), it stands aside.
  What a tool leaves is what a kill would leave (the converter, evaluation and ``prepare`` write beside their
  output and rename it into place at the end).
  Nothing is installed outside the main thread or when SIGINT is ignored (``nohup``, background jobs).
  """
  if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    return None
  lock = threading.Lock()

  def leave(*_):
    if signal.getsignal(signal.SIGINT) is not leave or not lock.acquire(blocking=False):
      return
    try:
      sys.stdout.flush()
    except (OSError, RuntimeError, ValueError):  # A reentrant call, a closed pipe: the line below matters.
      pass
    os.write(2, f'error: {line}\n'.encode())
    os._exit(INTERRUPTED)  # pylint: disable=protected-access

  read, write = os.pipe()
  os.set_blocking(write, False)

  def watch():
    while True:
      if signal.SIGINT in os.read(read, 64):
        leave()

  previous = signal.signal(signal.SIGINT, leave)
  previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
  threading.Thread(target=watch, name='srvp_ctrl_c', daemon=True).start()

  def restore():
    signal.signal(signal.SIGINT, previous)
    signal.set_wakeup_fd(previous_fd)
  return restore


def start(verbose: bool = False, torch_first: bool = False, cache_compilations: bool = False) -> None:
  """A tool's start-up: library logs off unless ``verbose``; torch imported now when the tool will use it;
  the persistent compilation cache on when ``cache_compilations``."""
  if not verbose:
    quiet_libraries()
  if cache_compilations:
    compilation_cache()
  if torch_first:
    try:
      import_order.import_torch_first()
    except import_order.ImportOrderError as e:
      raise UsageError(str(e)) from None


def compilation_cache() -> str:
  """Turns on JAX's persistent compilation cache; returns its folder.

  A rerun, a resume or the next evaluation of the same config then loads its compiled programs instead of
  compiling them again (15-45 s each for the paper configs on a GPU, seconds on a CPU). The folder is
  ``$JAX_COMPILATION_CACHE_DIR`` when set (JAX's own variable), else ``$XDG_CACHE_HOME/srvp_jax/jax`` (by
  default ``~/.cache/srvp_jax/jax``). JAX caches the programs whose compilation took over a second.
  """
  import jax  # pylint: disable=import-outside-toplevel  # The parsers and --help stay fast without it.
  folder = os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'srvp_jax', 'jax')
  jax.config.update('jax_compilation_cache_dir', folder)
  return folder


def _ours(record: logging.LogRecord) -> bool:
  """Records of our code (and launch.py) and libraries' errors pass; libraries' INFO and WARNING do not, nor
  orbax's errors: a failed checkpoint read or write reaches our code as an exception, reported in one line."""
  ours = os.sep + 'srvp_jax' + os.sep in record.pathname or record.pathname.endswith('launch.py')
  return ours or (record.levelno >= logging.ERROR and os.sep + 'orbax' + os.sep not in record.pathname)


def quiet_libraries() -> None:
  """Our warnings stay; libraries' INFO and WARNING records (absl, orbax, jax) and TensorFlow's C++ notes go.

  Records reach stderr through absl's handler (absl apps: launch.py) or the root logger's handler that absl's
  first record installs (``logging.basicConfig``) in the other tools: both get the filter. TensorFlow reads its
  variables when imported (always later, lazily); its oneDNN note is printed whatever TF_CPP_MIN_LOG_LEVEL says,
  so its oneDNN kernels are turned off (TensorFlow only reads records and writes events here: no numerics).
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  absl_logging.set_verbosity(absl_logging.WARNING)
  if not logging.root.handlers:
    logging.basicConfig()  # What absl's first record would do, here so that its handler gets the filter.
  console = [h for h in logging.root.handlers if getattr(h, 'stream', None) in (sys.stderr, sys.__stderr__)]
  for handler in [absl_logging.get_absl_handler(), *console]:
    if _ours not in handler.filters:
      handler.addFilter(_ours)
