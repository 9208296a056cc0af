"""Compiling and loading the oneDNN convolution handlers (``conv.cpp``) on first use.

The shared library is built with the system C++ compiler into a per-user cache folder
(``$XDG_CACHE_HOME/srvp_jax``, else ``~/.cache/srvp_jax``), under a name keyed by the source, the jaxlib
version and the compiler, so that an upgrade rebuilds it. Several processes may race to build it: they
serialise on a file lock and the library appears by an atomic rename, never half-written.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import pathlib
import shlex
import subprocess
import tempfile

import jax
import jaxlib

SOURCE = pathlib.Path(__file__).with_name('conv.cpp')
INSTALL_HINT = 'apt-get install -y libdnnl-dev (Debian/Ubuntu; elsewhere install oneDNN 2.x with its headers)'


class BuildError(RuntimeError):
  """The handlers could not be compiled or loaded (no compiler, no oneDNN headers or library)."""


def cache_dir() -> pathlib.Path:
  """The per-user folder holding the compiled handlers."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'srvp_jax'


def _compiler() -> list[str]:
  return shlex.split(os.environ.get('CXX', 'c++'))


def _command(output: str) -> list[str]:
  return [*_compiler(), '-O2', '-std=c++17', '-fPIC', '-shared', '-w', f'-I{jax.ffi.include_dir()}', str(SOURCE),
          '-o', output, '-ldnnl']


def _compiler_id() -> str:
  try:
    run = subprocess.run([*_compiler(), '--version'], capture_output=True, text=True, timeout=60, check=False)
  except OSError as e:
    raise BuildError(f'no C++ compiler ({" ".join(_compiler())}: {e.strerror})') from None
  return run.stdout


def library_path() -> pathlib.Path:
  """Where the library for this source, jaxlib and compiler lives (built or not)."""
  digest = hashlib.sha256()
  for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), _compiler_id().encode(),
               ' '.join(_command('out')).encode()):
    digest.update(part)
    digest.update(b'\0')
  return cache_dir() / f'onednn_conv_{digest.hexdigest()[:16]}.so'


def build() -> pathlib.Path:
  """The compiled library, built now unless another process (or an earlier run) already did."""
  path = library_path()
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path.with_suffix('.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if path.exists():  # Built by another process while this one waited.
      return path
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
      run = subprocess.run(_command(tmp), capture_output=True, text=True, timeout=600, check=False)
      if run.returncode != 0:
        lines = [line for line in run.stderr.splitlines() if 'error' in line] or run.stderr.splitlines() or ['?']
        raise BuildError(f'compiling {SOURCE.name} failed: {lines[0].strip()}')
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  return path


def load() -> ctypes.CDLL:
  """Builds (if needed) and loads the library."""
  path = build()
  try:
    return ctypes.CDLL(str(path))
  except OSError as e:
    raise BuildError(f'loading {path.name} failed: {e}') from None
