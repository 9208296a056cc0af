"""Checkpoints under faults: no non-finite state saved or called good, any damage of the latest step moved aside,
no orbax / TensorStore asyncio noise after a failed read, and a full disk in one line."""

import glob
import os
import shlex
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from srvp_jax import checkpoints
from srvp_jax import train
from srvp_jax.model import abstract_model
from srvp_jax.train import step as step_lib

from helpers import random_tree  # pylint: disable=wrong-import-order
from test_launch import ROOT, TINY_FLAGS, launch_cmd  # pylint: disable=wrong-import-order
from test_train import step_indexed, tiny_config  # pylint: disable=wrong-import-order

HOST = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_non_finite_update_is_never_saved_nor_called_good(tmp_path):
  """Item 4: a finite loss and finite gradients but a non-finite update (what --config.lr=nan gives; here a resumed
  Adam state whose second moment is negative, so that its square root is NaN), with a checkpoint due at every
  step: the update is not applied, nothing non-finite is written, and the step called the last good checkpoint
  restores finite. (tiny_config(): the train step of test_train.py, compiled once for both.)"""
  workdir = str(tmp_path / 'run')
  cfg = tiny_config(chkpt_interval=1)
  model = abstract_model(cfg)
  checkpoints.set_model_tree(model, random_tree(model, 0))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  negative_nu = lambda path, x: -np.ones_like(x) if any(getattr(k, 'name', None) == 'nu' for k in path) else x
  opt = jax.tree_util.tree_map_with_path(negative_nu, step_lib.make_optimizer(cfg).init(params))
  folder = checkpoints.RunFolder.for_run(workdir, cfg)
  folder.save_config(cfg)
  folder.create()
  folder.save(2, checkpoints.model_tree(model), {'step': 2}, opt)
  folder.close()
  with pytest.raises(train.NonFiniteError) as e:
    train.train_and_evaluate(cfg, workdir, train_batches=step_indexed(), val_batches=lambda step: iter(()),
                             progress=False)
  assert 'at step 3' in str(e.value) and 'the last good checkpoint (step 2)' in str(e.value), e.value
  assert checkpoints.RunFolder(workdir).steps() == [2]
  _, _, step = checkpoints.load_model(workdir, 'latest')  # CorruptCheckpointError on non-finite values.
  assert step == 2


# --------------------------------------------------------------------------------------------------
# Damage of the latest step. Small trees of random arrays (no model, no compilation) saved as training saves them.
def _trees(n=4, size=4096):
  rng = np.random.default_rng(0)
  model = {f'layer{i}': {'kernel': rng.standard_normal(size).astype(np.float32)} for i in range(n)}
  opt = {'count': np.int32(7), 'mu': {k: rng.standard_normal(size).astype(np.float32) for k in model}}
  return model, opt


def _save_run(workdir, steps=(1, 2), **trees):
  model, opt = _trees(**trees)
  folder = checkpoints.RunFolder(workdir)
  folder.create()
  for step in steps:
    folder.save(step, model, {'step': step}, opt)
  folder.close()
  return checkpoints.abstract(model, HOST), checkpoints.abstract(opt, HOST)


def _largest(pattern):
  return max(glob.glob(pattern), key=os.path.getsize)


def _truncate(path, fraction=0.4):
  with open(path, 'r+b') as f:
    f.truncate(int(os.path.getsize(path) * fraction))


def _overwrite(path, data):
  with open(path, 'wb') as f:
    f.write(data)


DAMAGE = {
    'missing opt item': lambda step: shutil.rmtree(os.path.join(step, 'opt')),
    'missing model item': lambda step: shutil.rmtree(os.path.join(step, 'model')),
    'missing meta item': lambda step: shutil.rmtree(os.path.join(step, 'meta')),
    'truncated array': lambda step: _truncate(_largest(os.path.join(step, 'model', 'ocdbt.process_0', 'd', '*'))),
    'truncated optimizer array': lambda step: _truncate(_largest(os.path.join(step, 'opt', 'ocdbt.process_0', 'd',
                                                                              '*'))),
    'unreadable metadata': lambda step: _overwrite(os.path.join(step, 'model', '_METADATA'), b'\x00{garbage'),
    'missing array files': lambda step: [os.remove(p) for p in glob.glob(os.path.join(step, 'model', '*', 'd', '*'))],
    'missing manifest': lambda step: os.remove(os.path.join(step, 'model', 'manifest.ocdbt')),
}


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
  """A run folder with intact steps 1 and 2, and the abstract trees a resume restores into."""
  workdir = str(tmp_path_factory.mktemp('pristine') / 'run')
  return workdir, _save_run(workdir)


@pytest.mark.parametrize('kind', sorted(DAMAGE))
def test_any_damage_of_the_latest_step_is_moved_aside(tmp_path, pristine, kind):  # pylint: disable=redefined-outer-name
  """Item 6: whatever the damage of the latest step (a missing opt/ item included), the resume takes the newest
  intact step, names the damaged one in one line, and moves it aside (bytes kept)."""
  source, (abstract_model, abstract_opt) = pristine
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  folder = checkpoints.RunFolder(workdir)
  DAMAGE[kind](folder.step_path(2))
  start = folder.resume({}, abstract_model, abstract_opt)
  assert start.step == 1 and [s for s, _ in start.skipped] == [2], (kind, start.skipped)
  why = start.skipped[0][1]
  assert '\n' not in why and folder.step_path(2) in why and 'init_from' not in why, why
  assert 'corrupt' in why or 'incomplete' in why, why
  where = folder.quarantine(2)
  assert where == os.path.join(folder.directory, 'corrupt_2') and os.path.isdir(where)
  assert folder.steps() == [1]
  np.testing.assert_array_equal(start.model['layer0']['kernel'], _trees()[0]['layer0']['kernel'])


def test_only_an_incompatible_or_converted_checkpoint_is_an_error(tmp_path, pristine):  # pylint: disable=W0621
  """Checkpoints of another model (every step mismatching) and a converted model (step 0, no optimizer state)
  are refused in one line; nothing is moved."""
  source, (abstract_model, abstract_opt) = pristine
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  folder = checkpoints.RunFolder(workdir)
  other = dict(abstract_model, layer0={'kernel': jax.ShapeDtypeStruct((8,), np.float32, sharding=HOST)})
  with pytest.raises(checkpoints.ModelMismatchError, match=r"checkpoints/2 does not match the config's model"):
    folder.resume({}, other, abstract_opt)
  assert folder.steps() == [1, 2] and not glob.glob(os.path.join(folder.directory, 'corrupt_*'))
  converted = str(tmp_path / 'converted')
  model, _ = _trees()
  out = checkpoints.RunFolder(converted)
  out.create()
  out.save(0, model, {'step': 0})
  out.close()
  with pytest.raises(checkpoints.config_lib.ConfigError, match='converted checkpoint.*init_from'):
    checkpoints.RunFolder(converted).resume({}, abstract_model, abstract_opt)


_RESTORE = r'''
import sys
from srvp_jax import checkpoints, cli
cli.quiet_libraries()
import jax, numpy as np
host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
tree = {f'a{i}': jax.ShapeDtypeStruct((int(sys.argv[2]),), np.float32, sharding=host) for i in range(int(sys.argv[3]))}
opt = {'count': jax.ShapeDtypeStruct((), np.int32, sharding=host)}
folder = checkpoints.RunFolder(sys.argv[1])
start = folder.resume({}, tree, opt)  # The resume of launch.py.
print(f'resumed at {start.step}; skipped {[s for s, _ in start.skipped]}', file=sys.stderr)
try:
  folder.restore(2, tree)  # What evaluate reads.
except checkpoints.CorruptCheckpointError as e:
  sys.exit(cli.error(str(e), 1))
'''


def test_failed_restore_leaves_no_asyncio_noise(tmp_path):
  """Item 8: a truncated latest step read while the other arrays are still in flight (orbax closes its event loop
  at the first error): the resume and an evaluation-style read print their one line, then nothing (no "Event
  loop is closed", no "Exception ignored in coroutine"), also at exit."""
  workdir = str(tmp_path / 'run')
  size, n = 1_000_000, 8  # 32 MB: reads still in flight at the first error (without the filter, ~200 lines).
  rng = np.random.default_rng(0)
  model = {f'a{i}': rng.standard_normal(size).astype(np.float32) for i in range(n)}
  folder = checkpoints.RunFolder(workdir)
  folder.create()
  for step in (1, 2):
    folder.save(step, model, {'step': step}, {'count': np.int32(step)})
  folder.close()
  for path in glob.glob(os.path.join(folder.step_path(2), 'model', 'ocdbt.process_0', 'd', '*')):
    _truncate(path)
  res = subprocess.run([sys.executable, '-c', _RESTORE, workdir, str(size), str(n)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, check=False, env=dict(os.environ, PYTHONPATH=ROOT))
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 1 and len(lines) == 2, res.stderr[-3000:]
  assert lines[0] == 'resumed at 1; skipped [2]', lines
  assert lines[1].startswith(f'error: checkpoint {folder.step_path(2)} is corrupt or truncated'), lines


def test_async_noise_filters_drop_only_orbax_leftovers(monkeypatch):
  """The filters behind item 8 (and the asyncio part of item 9) drop only the leftovers of orbax / TensorStore:
  another unraisable exception reaches the previous hook, another asyncio error is still logged."""
  import asyncio  # pylint: disable=import-outside-toplevel
  import logging  # pylint: disable=import-outside-toplevel
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  checkpoints.silence_async_noise()
  checkpoints.silence_async_noise()  # Idempotent.
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as e:  # What TensorStore meets when a read completes into orbax's closed loop.
    closed = e

  def unraisable(exc, obj=None):
    return type('U', (), dict(exc_type=type(exc), exc_value=exc, exc_traceback=exc.__traceback__, err_msg=None,
                              object=obj))()

  async def ours():
    pass
  orbax_coroutine = type('Coroutine', (), {'cr_code': type('Code', (), {'co_filename': '/x/orbax/checkpoint/a.py'})})()
  other = ours()
  full = OSError(28, 'No space left on device', '/w/checkpoints/2.orbax-checkpoint-tmp/opt/d/1f')  # A write's error.
  for args in [(closed,), (ValueError('truncated'), orbax_coroutine), (ValueError('ours'), other),
               (RuntimeError('another'),), (full,)]:
    sys.unraisablehook(unraisable(*args))
  other.close()
  assert [str(u.exc_value) for u in seen] == ['ours', 'another']
  asyncio_logger = logging.getLogger('asyncio')
  record = lambda where: logging.LogRecord('asyncio', logging.ERROR, 'base_events.py', 1, 'Task exception was never '
                                           f'retrieved\nfuture: <Task coro=<f() defined at {where}>>', None, None)
  assert not asyncio_logger.filter(record('/x/orbax/checkpoint/_src/serialization.py:188'))
  assert asyncio_logger.filter(record('/x/srvp_jax/data/stream.py:12'))
  assert not asyncio_logger.filter(record('/x/jax/experimental/array_serialization/tensorstore_impl.py:358'))
  failed_write = record('/x/srvp_jax/data/stream.py:12')
  failed_write.exc_info = (OSError, full, None)
  assert not asyncio_logger.filter(failed_write)


# --------------------------------------------------------------------------------------------------
# A full disk.
_INJECTED = r'''
import runpy, sys
import orbax.checkpoint as ocp
save = ocp.CheckpointManager.save
def full(self, step, *args, **kwargs):  # What TensorStore raises on a full disk, from the step's write.
  if step == 2:
    raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": Failed to write 4096 bytes to file 5: No '
                     "space left on device [os_error_code='28']")
  return save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = full
sys.argv = sys.argv[1:]
runpy.run_path('launch.py', run_name='__main__')
'''


def _small_disk():
  """The command prefix that runs a shell in a private mount namespace where tmpfs can be mounted (root, or a
  user namespace), or None where neither works."""
  prefixes = [['unshare', '--mount']] if os.geteuid() == 0 else []
  prefixes.append(['unshare', '--user', '--map-root-user', '--mount'])
  for prefix in prefixes:
    try:
      probe = subprocess.run([*prefix, 'sh', '-c', 'mount -t tmpfs -o size=1m tmpfs /mnt'], capture_output=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
      continue
    if probe.returncode == 0:
      return prefix
  return None


def test_disk_full_during_a_checkpoint_write_is_one_line(tmp_path):
  """Item 9: the workdir on a 3 MB tmpfs (a real full disk; where no tmpfs can be mounted, TensorStore's
  disk-full error injected into the write of step 2): the run ends with exit status 1 and one line naming the
  step, no orbax log or traceback; step 1 is intact and is where the rerun resumes."""
  # The schedule of test_launch.py's quick start (its compiled train step); the write of step 2 fails, and that
  # failure surfaces at the save of step 3, which ends the run.
  flags = [*TINY_FLAGS, '--config.lr_scheduling_burnin=6', '--config.lr_scheduling_n_iter=2',
           '--config.val_interval=100', '--config.chkpt_interval=1']
  prefix = _small_disk()
  if prefix is not None:  # Checkpoint 1 (~1.8 MB) fits, checkpoint 2 does not.
    disk, out = tmp_path / 'disk', tmp_path / 'out'
    disk.mkdir()
    out.mkdir()
    command = shlex.join(launch_cmd(disk / 'run', *flags))
    script = (f'mount -t tmpfs -o size=3m tmpfs {shlex.quote(str(disk))} || exit 99; {command}; rc=$?; '
              f'cp -a {shlex.quote(str(disk / "run"))} {shlex.quote(str(out))}/; exit $rc')
    res = subprocess.run([*prefix, 'sh', '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         check=False)
    workdir, copy = disk / 'run', out / 'run'
  else:
    workdir = copy = tmp_path / 'run'
    res = subprocess.run([sys.executable, '-c', _INJECTED, *launch_cmd(workdir, *flags)[1:]], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=False)
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 1, res.stderr[-3000:]
  assert 'Traceback' not in res.stderr and 'orbax' not in res.stderr and 'RESOURCE_EXHAUSTED' not in res.stderr
  assert lines[-1] == (f'error: no space left on device writing checkpoint 2 in {workdir}/checkpoints: free space and '
                       'rerun the same command to resume'), lines
  assert len(lines) <= 3 and all('training from step 0' in l or 'standin' in l for l in lines[:-1]), lines
  folder = checkpoints.RunFolder(str(copy))
  assert folder.steps() == [1]
  cfg = folder.load_config()  # The rerun's resume: step 1, nothing skipped.
  structure = abstract_model(cfg)
  _, params, _ = nnx.split(structure, nnx.Param, ...)
  start = folder.resume(cfg, checkpoints.abstract(checkpoints.model_tree(structure), HOST),
                        checkpoints.abstract(jax.eval_shape(step_lib.make_optimizer(cfg).init, params), HOST))
  assert start.step == 1 and not start.skipped
