"""A multi-process run's launcher: the training in a child process, so that a lost peer process is one line.

When one process of a multi-process run dies, the others cannot go on, and JAX's runtime ends them itself:
either a collective fails (gloo: "Connection closed by peer"), which reaches Python as an exception, or the
coordination service misses a process's heartbeats (or the coordinator is gone) and the C++ client aborts
the process from a background thread: a fatal log line, a check-failure stack trace, Python's thread dump,
SIGABRT. That abort cannot be caught in the process: ``jax.distributed.initialize`` does not take the
client's missed-heartbeat callback, the binding's callback cannot receive its status, and the C++ lines go
to file descriptor 2 directly. Hence the simplest robust design, a supervising parent: ``launch.py`` with
``--config.distributed=True`` runs the same command as a child process (``CHILD_ENV`` set) and relays the
child's stderr line by line. From the runtime's first fatal line on it holds the rest back; when the child
then ends by a signal, it prints one ``error:`` line instead: which process was lost (from the runtime's
message) and how to resume, exit status 1. The child turns a failed collective into the same line itself
(``exit_lost``) and leaves at once, skipping the exit-time shutdown barrier that would wait for the dead
process. The parent forwards SIGINT/SIGTERM to the child (a signal both receive counts once, see
``StopRequest``); on Linux the child gets SIGTERM (save and stop) if the parent dies. Single-process runs
have no peer to lose and run in one process.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
from typing import Sequence

from srvp_jax import checkpoints, cli

CHILD_ENV = 'SRVP_LAUNCH_CHILD'  # "<parent pid>:tty|pipe" in the training process a launcher supervises.
# Lines with which the runtime starts to die: a fatal log line, a check failure, Python's fatal error.
_FATAL = re.compile(rb'^(F\d{4} \d\d:\d\d:\d\d|\*\*\* Check failure|Fatal Python error|terminate called)')
_PEER_WORDS = ('gloo', 'connection closed', 'connection reset', 'heartbeat', 'coordination service', 'unavailable',
               'deadline_exceeded', 'barrier')


def is_child() -> bool:
  return CHILD_ENV in os.environ


def child_progress() -> bool:
  """Whether the supervised training shows the progress bar (the launcher's stderr is a terminal)."""
  return os.environ.get(CHILD_ENV, '').endswith(':tty')


def child_setup() -> None:
  """In the supervised training: SIGTERM (save and stop) when the launcher dies (Linux)."""
  parent = int(os.environ[CHILD_ENV].split(':', 1)[0])
  if sys.platform.startswith('linux'):
    try:
      ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
      pass
  if os.getppid() != parent:  # The launcher died before the line above.
    os.kill(os.getpid(), signal.SIGTERM)


def supervise(argv: Sequence[str], workdir: str, process_id: int | None, num_processes: int | None,
              verbose: bool, coordinator: str | None = None) -> int:
  """Runs ``argv`` (this launch command) as the training child; returns the exit status to leave with.

  ``coordinator``: the run's coordinator address (HOST:PORT), probed when the child dies by a signal without the
  runtime naming the cause (a check failure with a bare stack trace): nothing answering there means process 0,
  which hosts the coordination service, is gone.
  """
  env = dict(os.environ, **{CHILD_ENV: f"{os.getpid()}:{'tty' if sys.stderr.isatty() else 'pipe'}"})
  if not verbose:
    env['TF_CPP_MIN_LOG_LEVEL'] = '3'  # The runtime's C++ ERROR lines: a lost peer is told in one line.
  child = None
  pending = []

  def forward(signum, frame):
    del frame
    if child is None:
      pending.append(signum)
    else:
      try:
        child.send_signal(signum)
      except ProcessLookupError:
        pass

  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    child = subprocess.Popen([sys.executable, *argv], env=env, stderr=subprocess.PIPE)
    for signum in pending:
      child.send_signal(signum)
    held = _relay(child.stderr.fileno())
    rc = child.wait()
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
  text = b''.join(held).decode('utf-8', 'replace')
  # The child's own error line, printed while the runtime was aborting it (a failed collective seen at once).
  own = [line for line in text.splitlines() if line.startswith('error: ')][-1:]
  if verbose or (rc >= 0 and not own):  # Asked for, or no abort after all: what was held back is shown.
    _write(held)
  elif own:
    _write([(own[0] + '\n').encode()])
  if rc >= 0 or own:
    return rc if rc >= 0 else cli.FAILURE
  gone = process_id != 0 and coordinator_gone(coordinator)
  sys.stderr.write('error: ' + describe_end(text, -rc, process_id, num_processes, workdir, gone) + '\n')
  sys.stderr.flush()
  return cli.FAILURE


def _relay(fd: int) -> list[bytes]:
  """Copies the child's stderr to ours piece by piece (lines, progress-bar updates) until the runtime's first
  fatal line; returns that line and everything after it."""
  held, rest = [], b''
  while True:
    chunk = os.read(fd, 1 << 16)
    if not chunk:
      break
    *pieces, rest = re.split(rb'(?<=[\r\n])', rest + chunk)
    for piece in pieces:
      if held or _FATAL.match(piece):
        held.append(piece)
      else:
        _write([piece])
  if rest and (held or _FATAL.match(rest)):
    held.append(rest)
  elif rest:
    _write([rest])
  return held


def _write(pieces: list[bytes]) -> None:
  for piece in pieces:
    os.write(2, piece)


def coordinator_gone(address: str | None, timeout: float = 2.0) -> bool:
  """Whether nothing accepts a TCP connection at the coordinator's ``HOST:PORT`` (False when unknown or when
  something answers)."""
  host, _, port = (address or '').rpartition(':')
  if not host or not port.isdigit():
    return False
  try:
    with socket.create_connection((host.strip('[]'), int(port)), timeout=timeout):
      return False
  except ConnectionRefusedError:
    return True
  except OSError:  # Unreachable, timed out, unknown host: no proof either way.
    return False


def describe_end(text: str, signum: int, process_id: int | None, num_processes: int | None, workdir: str,
                 coordinator_is_gone: bool = False) -> str:
  """The one line for a training child ended by ``signum`` after the runtime's fatal ``text``; a lost peer when
  the text says so or ``coordinator_is_gone``."""
  resume = resume_hint(workdir, num_processes)
  if any(w in text.lower() for w in _PEER_WORDS):
    return lost_line(text, process_id, num_processes, resume)
  if coordinator_is_gone:
    return lost_line(text, process_id, num_processes, resume, known=([0], 'the coordinator is gone'))
  try:
    name = signal.Signals(signum).name
  except ValueError:
    name = f'signal {signum}'
  why = ' (out of memory, or killed by the scheduler?)' if signum == signal.SIGKILL else ''
  first = text.strip().splitlines()[0][:200] if text.strip() else ''
  return f'the training process ended by {name}{why}' + (f': {first}' if first else '') + f'; {resume}'


def lost_line(text: str, process_id: int | None, num_processes: int | None, resume: str,
              known: tuple[list[int], str] | None = None) -> str:
  """``lost process K of the N-process run (why); ...`` from the runtime's message ``text`` (or ``known``:
  the lost processes and why, found otherwise)."""
  lost = []
  m = re.search(r'stopped sending heartbeats\):\s*((?:\d+[\s,]*)+)', text)
  if known is not None:
    lost, why = known
  elif m:
    lost = [int(k) for k in re.findall(r'\d+', m.group(1))]
    why = 'it stopped sending heartbeats'
  elif re.search(r'[Tt]ask (\d+) heartbeat', text):
    lost = [int(re.search(r'[Tt]ask (\d+) heartbeat', text).group(1))]
    why = 'it stopped sending heartbeats'
  elif 'coordination service' in text and ('leader' in text or 'Failed to send RPC' in text):
    lost, why = [0], 'the coordinator is gone'
  else:
    why = ' '.join(text.strip().splitlines()[0].split())[:160] if text.strip() else 'a collective failed'
    if num_processes == 2 and process_id in (0, 1):
      lost = [1 - process_id]
  who = (f"process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))}" if lost
         else 'another process')
  run = f' of the {num_processes}-process run' if num_processes else ' of the run'
  me = f'process {process_id}' if process_id is not None else 'this process'
  return f'lost {who}{run} ({why}); {me} stopped too: {resume}'


def resume_hint(workdir: str, num_processes: int | None) -> str:
  """How to go on: the same command on every host, from the newest step on disk (read without orbax)."""
  folder = os.path.join(workdir, checkpoints.CHECKPOINT_DIR)
  try:
    steps = sorted(int(n) for n in os.listdir(folder) if n.isdigit())
  except OSError:
    steps = []
  where = 'on every host ' if num_processes != 1 else ''
  if not steps:
    return f'no checkpoint was written yet; rerun the same command {where}to start again'
  return f'rerun the same command {where}to resume from the last checkpoint (step {steps[-1]} in {folder})'


def is_peer_loss(e: BaseException) -> bool:
  """Whether an error of a multi-process run's JAX call says a peer process is gone (a failed collective)."""
  text = str(e).lower()
  return type(e).__name__ in ('JaxRuntimeError', 'XlaRuntimeError') and any(w in text for w in _PEER_WORDS)


def exit_lost(e: BaseException, process_id: int, num_processes: int, workdir: str) -> None:
  """Prints the lost-process line for a failed collective and leaves at once with status 1.

  ``os._exit``: the exit-time ``jax.distributed.shutdown`` would wait at a barrier for the dead process and
  then abort. Checkpoints are whole (orbax writes a step to a temporary folder and renames it).
  """
  line = lost_line(str(e), process_id, num_processes, resume_hint(workdir, num_processes))
  sys.stdout.flush()
  sys.stderr.write(f'error: {line}\n')
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access
