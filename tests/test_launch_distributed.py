"""Two processes (jax.distributed on localhost, CPU collectives) against one process with all the devices: the same
run, killed and resumed. In a file of its own: the slowest test, a unit of work of its own (tests/conftest.py)."""

import json
import os
import subprocess
import sys

import numpy as np

from srvp_jax import checkpoints

from helpers import free_port  # pylint: disable=wrong-import-order
from test_launch import ROOT  # pylint: disable=wrong-import-order

_DRIVER = r'''
import os, sys
n_dev, workdir, kill_at, root = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={n_dev}'
os.environ['JAX_PLATFORMS'] = 'cpu'
import numpy as np
import launch
from srvp_jax import config as C
from srvp_jax import import_order
import_order.without_torchvision()  # As launch.py does: training imports no torch.
cfg = C.with_overrides(**%s, distributed='JAX_NUM_PROCESSES' in os.environ)
if cfg.distributed:
  launch.initialize_distributed(cfg)  # From JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
import jax
from srvp_jax import train
p, n = jax.process_index(), jax.process_count()
assert jax.device_count() == 4 and jax.local_device_count() == n_dev


def batches(start):  # Batch k is a function of k; each process feeds its own slice.
  k = start
  while True:
    if k == kill_at:
      raise KeyboardInterrupt
    x = np.random.default_rng([0, k]).uniform(size=(8, 6, 64, 64, 1)).astype(np.float32)
    yield x[p * 8 // n:(p + 1) * 8 // n]
    k += 1

val = np.random.default_rng(9).uniform(size=(6, 6, 64, 64, 1)).astype(np.float32)  # The same on every process.
try:
  train.train_and_evaluate(cfg, workdir, train_batches=batches, val_batches=lambda step: iter([val]), progress=False)
except train.Interrupted as e:
  print('exit code', e.exit_code, flush=True)
  kill_at = -1  # Resume (a new train_and_evaluate: restored from the checkpoint on disk) to the end.
  train.train_and_evaluate(cfg, workdir, train_batches=batches, val_batches=lambda step: iter([val]), progress=False)
'''
DIST = dict(nf=8, nhx=16, nlayers_inf=2, nlayers_res=2, ny=4, nz=4, nh_inf=16, nh_res=16, nt_inf=2, nt_cond=2,
            seq_len=6, batch_size=8, lr_scheduling_burnin=2, lr_scheduling_n_iter=2, val_interval=2, chkpt_interval=2,
            log_interval=1, n_samples_test=3, val_sample_chunk=2, n_val_videos_gif=2)


def _two_processes(script, workdir, kill_at, alongside=None):
  port = free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(pid), PYTHONPATH=ROOT)
    procs.append(subprocess.Popen([sys.executable, str(script), '2', str(workdir), str(kill_at), ROOT], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  if alongside is not None:
    alongside.communicate(timeout=600)
  outs = [p.communicate(timeout=600)[0] for p in procs]
  return [p.returncode for p in procs], outs


def test_two_processes_equal_one_process_with_four_devices(tmp_path):
  """jax.distributed on localhost (CPU collectives, 2 devices per process): a run killed at step 3 and
  resumed ends with the losses and parameters of one process with 4 devices; only process 0 writes logs."""
  script = tmp_path / 'driver.py'
  script.write_text(_DRIVER % repr(DIST))
  one, two = tmp_path / 'one', tmp_path / 'two'
  with open(tmp_path / 'reference.log', 'w', encoding='utf-8') as log:
    reference = subprocess.Popen([sys.executable, str(script), '4', str(one), '-1', ROOT], cwd=ROOT, text=True,
                                 env=dict(os.environ, PYTHONPATH=ROOT), stdout=log, stderr=subprocess.STDOUT)
    codes, outs = _two_processes(script, two, kill_at=3, alongside=reference)  # The reference runs meanwhile.
  assert reference.returncode == 0, (tmp_path / 'reference.log').read_text()
  assert codes == [0, 0], outs
  for out in outs:
    assert out.count('exit code 130') == 1, out  # Both processes stopped at step 3 (Ctrl-C) ...
  assert 'SIGINT: saved step 3' in outs[0] and 'saved step' not in outs[1], outs  # ... process 0 speaks.
  assert 'resuming at step 3' in outs[0]  # ... and resumed from the checkpoint of step 3.

  def losses(workdir):
    with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
      return [(r['step'], r['loss']) for r in map(json.loads, f) if 'loss' in r]
  l1, l2 = losses(one), losses(two)
  assert [s for s, _ in l2] == [1, 2, 3, 4]  # Once per step: only process 0 writes.

  def val_psnr(workdir):
    with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
      return [(r['step'], r['val_psnr']) for r in map(json.loads, f) if 'val_psnr' in r]
  v1, v2 = val_psnr(one), val_psnr(two)  # Validation sharded over both processes' devices, read by each.
  assert [s for s, _ in v2] == [2, 4] and [s for s, _ in v1] == [2, 4]
  np.testing.assert_allclose([v for _, v in v1], [v for _, v in v2], rtol=1e-4)
  assert sorted(os.listdir(two / 'samples')) == sorted(os.listdir(one / 'samples')) != []  # Written once.
  np.testing.assert_allclose([l for _, l in l1], [l for _, l in l2], rtol=1e-6)
  m1, _, s1 = checkpoints.load_model(str(one), 'latest')
  m2, _, s2 = checkpoints.load_model(str(two), 'latest')
  assert s1 == s2 == 4
  a, b = (__import__('jax').tree.leaves(checkpoints.model_tree(m)) for m in (m1, m2))
  scale = max(float(np.abs(np.asarray(x)).max()) for x in a)
  for x, y in zip(a, b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=2e-3 * scale)
