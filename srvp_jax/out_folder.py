"""An output folder a tool owns (``--out`` of the converter and of evaluation): checked, then replaced as a whole.

``check`` refuses, before any work, an ``--out`` that is a file, that is (or holds) one of the tool's inputs, or
that holds anything but an earlier output of the same tool, unless ``--overwrite``. ``replaced`` gives a fresh
sibling folder to write into and, once everything is written, swaps it with ``--out`` in one rename (Linux's
``renameat2(RENAME_EXCHANGE)``; elsewhere two renames): no file of an earlier output survives beside the new
ones, and a tool that fails or is interrupted leaves the earlier output as it was. A sibling left by a killed
process (``.<name>.partial-<host>-<pid>-...``) is removed by the next run on the same host.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import socket
from typing import Callable, Iterator, Sequence

from srvp_jax import cli

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def check(path: str, owned: Callable[[str], bool], tool: str, overwrite: bool, inputs: Sequence[str] = ()) -> None:
  """UsageError unless ``path`` may receive the tool's output: absent, empty, ``owned(path)`` (an earlier output
  of ``tool``) or ``overwrite``; never a file, nor an input folder or a folder above one (even with overwrite)."""
  real = os.path.realpath(path)
  for given in inputs:
    source = os.path.realpath(given)
    if source == real or source.startswith(real.rstrip(os.sep) + os.sep):
      raise cli.UsageError(f'--out {path} is {"the input" if source == real else "a folder holding the input"} '
                           f'{given}: the output never replaces its input; give another --out folder')
  if os.path.lexists(path) and not os.path.isdir(path):
    raise cli.UsageError(f'--out {path} is a file, not a folder: give a folder')
  if overwrite or not os.path.isdir(path) or owned(path):
    return
  entries = sorted(os.listdir(path))
  if entries:
    shown = ', '.join(entries[:4]) + (f' and {len(entries) - 4} more' if len(entries) > 4 else '')
    raise cli.UsageError(f'--out {path} holds files that are not an earlier output of {tool} ({shown}): give a new '
                         '--out folder, or add --overwrite to replace the folder as a whole')


def _partial_prefix(name: str) -> str:
  return f'.{name}.partial-{socket.gethostname()}-'


def _remove_stale(parent: str, name: str) -> None:
  """Removes the siblings that processes of this host, now dead, left while writing ``name``."""
  prefix = _partial_prefix(name)
  for entry in os.listdir(parent):
    if not entry.startswith(prefix):
      continue
    pid = entry[len(prefix):].split('-')[0]
    if not pid.isdigit():
      continue
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    except OSError:
      pass  # Alive, of another user.


def _exchange(a: str, b: str) -> bool:
  """Swaps two paths atomically (Linux); False where the system cannot."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
    return False  # A file system without the exchange.
  raise OSError(code, os.strerror(code), b)


@contextlib.contextmanager
def replaced(path: str) -> Iterator[str]:
  """Yields a new empty sibling folder of ``path``; when the block ends without error, the sibling becomes
  ``path`` and the earlier ``path`` (if any) is removed. On any error or interrupt the sibling is removed and
  ``path`` is left untouched. Raises ``cli.Failure`` when the folder cannot be written."""
  real = os.path.realpath(path)
  parent, name = os.path.split(real)
  try:
    os.makedirs(parent, exist_ok=True)
    _remove_stale(parent, name)
    tmp = os.path.join(parent, f'{_partial_prefix(name)}{os.getpid()}-{secrets.token_hex(3)}')
    os.mkdir(tmp)
  except OSError as e:
    raise cli.Failure(f'cannot write the output folder {path}: {e.strerror or e}') from None
  try:
    yield tmp
    try:
      if not os.path.isdir(real):
        os.rename(tmp, real)
      elif not _exchange(tmp, real):
        os.rename(real, f'{tmp}-old')
        try:
          os.rename(tmp, real)
        except OSError:
          os.rename(f'{tmp}-old', real)
          raise
        tmp = f'{tmp}-old'
    except OSError as e:
      raise cli.Failure(f'cannot write the output folder {path}: {e.strerror or e}') from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # The partial output, or the earlier one after the swap.
