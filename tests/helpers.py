"""Helpers shared by the tests: random model variables without compiling an initialisation, workdir snapshots,
a free port, a test function run on 4 host devices."""

import hashlib
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from srvp_jax import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_tree(model, seed, bias_scale=0.1):
  """Random model variables (a real initialisation compiles for long on CPU): kernels ~ N(0, 1 / fan_in),
  BatchNorm running mean 0 and variance 1, biases ~ N(0, bias_scale^2)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(path[-1].key)
    if name == 'count':
      return np.zeros(leaf.shape, leaf.dtype)
    if name in ('var', 'scale'):
      return np.ones(leaf.shape, np.float32)
    if name == 'mean':
      return np.zeros(leaf.shape, np.float32)
    if name == 'kernel':
      return (rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)
    return (bias_scale * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, checkpoints.model_tree(model))


def snapshot(folder):
  """Every file under ``folder`` with its bytes' hash and mtime: "untouched" means equal snapshots."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      p = os.path.join(root, name)
      with open(p, 'rb') as f:
        out[os.path.relpath(p, folder)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(p).st_mtime_ns)
  return out


def free_port():
  """A TCP port on localhost nobody listens on (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# Runs tests/<module>.py's <function>() and saves the arrays it returns, with 4 forced host devices (XLA_FLAGS is read
# when JAX starts, hence a process of its own).
_FOUR_DEVICES = r'''
import importlib, os, sys
os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4'
module, function, root, path = sys.argv[1:]
sys.path[:0] = [root, os.path.join(root, 'tests')]
import numpy as np
np.savez(path, **getattr(importlib.import_module(module), function)())
'''


def on_four_devices(module, function, tmp_path):
  """``function()`` of the test module ``module`` (a dict of arrays) computed in a process with 4 host devices."""
  path = tmp_path / f'{function}_4_devices.npz'
  proc = subprocess.run([sys.executable, '-c', _FOUR_DEVICES, module, function, ROOT, str(path)], capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(np.load(path))
