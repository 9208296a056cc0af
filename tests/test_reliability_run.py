"""A training run under a scheduler's faults (issue 18): one run per workdir (the run lock), resume after kill -9
(metrics once per step, the stale lock taken over), a failed relaunch keeps the config, SIGTERM during validation,
and a lost peer process of a multi-process run told in one line."""

import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import psutil
import pytest

from srvp_jax import checkpoints
from srvp_jax import train
from srvp_jax.train import supervisor
from srvp_jax.train import validation

from helpers import free_port, snapshot  # pylint: disable=wrong-import-order
from test_launch import (ROOT, TINY_FLAGS, _Run, _losses, _quickstart_config,  # pylint: disable=wrong-import-order
                         launch_cmd)

# The quick start, tiny, with a schedule that outlives the test: checkpoints every 2 steps, a loss row per step.
LONG = [*TINY_FLAGS, '--config.lr_scheduling_burnin=100000', '--config.log_interval=1',
        '--config.val_interval=100000', '--config.chkpt_interval=2']


def _overrides(flags):
  out = {}
  for flag in flags:
    key, value = flag[len('--config.'):].split('=', 1)
    out[key] = int(value) if value.lstrip('-').isdigit() else value
  return out


def _batches(batch=4, t=6):
  """A step-indexed stream of the tiny quick start's shape (batch k is a function of k)."""
  def factory(start):
    def gen():
      k = start
      while True:
        yield np.random.default_rng([0, k]).uniform(size=(batch, t, 64, 64, 1)).astype(np.float32)
        k += 1
    return gen()
  return factory


def _stop_at(factory, step, error=KeyboardInterrupt):
  """``factory``'s stream, raising ``error`` when asked for the batch of ``step`` (KeyboardInterrupt: like Ctrl-C)."""
  def wrapped(start):
    inner = factory(start)

    def gen():
      k = start
      while True:
        if k + 1 == step:
          raise error('stopped by the test')
        yield next(inner)
        k += 1
    return gen()
  return wrapped


def _hash(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _wait_stopped(pid, timeout=60):
  """Waits until every thread of ``pid`` is stopped (SIGSTOP is delivered asynchronously, thread by thread)."""

  def stopped(tid):
    try:
      return psutil.Process(tid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:  # A thread that ended meanwhile.
      return True

  end = time.time() + timeout
  while not all(stopped(t.id) for t in psutil.Process(pid).threads()):
    assert time.time() < end, f'process {pid} did not stop'
    time.sleep(0.01)


@pytest.fixture(scope='module')
def killed_run(tmp_path_factory):
  """launch.py trains (run A); a second copy started while A runs (A paused) is refused; then A is killed -9."""
  workdir = tmp_path_factory.mktemp('killed') / 'run'
  run = _Run(workdir, *LONG)
  run.wait_for(lambda: _losses(workdir) >= 3 and os.path.isdir(workdir / 'checkpoints' / '2'))
  run.proc.send_signal(signal.SIGSTOP)
  try:
    _wait_stopped(run.proc.pid)  # A write of A's in flight when the signal came lands before the snapshot.
    before = snapshot(workdir)
    second = subprocess.run(launch_cmd(workdir, *LONG), cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    after = snapshot(workdir)
  finally:
    run.proc.send_signal(signal.SIGCONT)
  run.proc.kill()
  run.finish()
  return dict(workdir=workdir, pid=run.proc.pid, second=second, before=before, after=after)


def test_second_copy_is_refused_before_writing_naming_the_holder(killed_run):
  """Item 2: the same command on the same workdir while a run holds it: one line naming the holder, exit 2,
  nothing written."""
  res = killed_run['second']
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 2 and len(lines) == 1 and 'Traceback' not in res.stderr, res.stderr
  line = lines[0]
  assert line.startswith(f"error: {killed_run['workdir']} is in use by another training run (pid "
                         f"{killed_run['pid']} on {socket.gethostname()}, since "), line
  assert 'use another --workdir' in line
  assert killed_run['after'] == killed_run['before']


def test_resume_after_kill_takes_over_the_lock_and_logs_each_step_once(killed_run, tmp_path, capsys):
  """Items 2 and 7: kill -9 leaves a stale lock (taken over, said so) and loss rows past the last checkpoint; the
  resume drops those rows (it replays their steps), so each step keeps one row. Its end releases the lock."""
  workdir = tmp_path / 'run'
  shutil.copytree(killed_run['workdir'], workdir)
  assert (workdir / checkpoints.LOCK_FILE).exists()
  with open(workdir / checkpoints.METRICS_FILE, encoding='utf-8') as f:
    rows = [json.loads(l) for l in f if l.strip()]
  last = max(r['step'] for r in rows)
  saved = max(int(n) for n in os.listdir(workdir / 'checkpoints') if n.isdigit())
  assert last > saved  # The run logged steps past its last checkpoint.
  cfg = _quickstart_config(**_overrides(LONG))
  with pytest.raises(KeyboardInterrupt):  # Ctrl-C at the first batch: the run started, no step compiled.
    train.train_and_evaluate(cfg, str(workdir), train_batches=_stop_at(_batches(), saved + 1),
                             val_batches=lambda step: iter(()), progress=False)
  err = capsys.readouterr().err
  assert f"took over the lock of an earlier run that is gone (pid {killed_run['pid']} on " in err, err
  assert f'resuming at step {saved}' in err
  with open(workdir / checkpoints.METRICS_FILE, encoding='utf-8') as f:
    steps = [r['step'] for r in map(json.loads, f) if 'loss' in r]
  assert steps == list(range(1, saved + 1)), steps  # The next rows are the replayed steps' own.
  assert not (workdir / checkpoints.LOCK_FILE).exists()
  # Trimming alone: a row cut short by the kill goes too, and the file is replaced atomically (no temporary left).
  with open(workdir / checkpoints.METRICS_FILE, 'a', encoding='utf-8') as f:
    f.write('{"step": 1, "lo')
  n_lines = (workdir / checkpoints.METRICS_FILE).read_text().count('\n') + 1
  dropped = checkpoints.RunFolder(str(workdir)).drop_metrics_after(1)
  rows = [json.loads(l) for l in (workdir / checkpoints.METRICS_FILE).read_text().splitlines()]
  assert rows and {r['step'] for r in rows} == {1} and dropped == n_lines - len(rows)
  assert not glob.glob(str(workdir / '*.tmp*'))


def test_relaunch_failing_at_start_up_keeps_the_config(killed_run, tmp_path):
  """Item 15: a relaunch with another lr that fails before its first checkpoint leaves both config files as the
  checkpoints were trained with; the lock is released on the error."""
  workdir = tmp_path / 'run'
  shutil.copytree(killed_run['workdir'], workdir)
  files = [workdir / checkpoints.CONFIG_FILE, workdir / checkpoints.OFFICIAL_CONFIG_FILE]
  before = [_hash(f) for f in files]
  cfg = _quickstart_config(**_overrides(LONG), lr=0.5)

  def broken(start):  # The data fails at the first batch, after every start-up check.
    del start
    raise RuntimeError('stopped by the test')
    yield  # pylint: disable=unreachable
  with pytest.raises(RuntimeError, match='stopped by the test'):
    train.train_and_evaluate(cfg, str(workdir), train_batches=broken, val_batches=lambda step: iter(()),
                             progress=False)
  assert [_hash(f) for f in files] == before
  assert json.loads(files[0].read_text())['lr'] != 0.5
  assert not (workdir / checkpoints.LOCK_FILE).exists()
  assert not glob.glob(str(workdir / '*.tmp*'))


def test_lock_refuses_a_live_holder_and_cleans_up_after_itself(tmp_path):
  """The lock alone, in-process: a second holder is refused; releasing removes the file and the workdir it made;
  a workdir that is a file is one line."""
  workdir = tmp_path / 'new' / 'run'
  with checkpoints.RunFolder(str(workdir)).lock() as first:
    assert first.stale is None and (workdir / checkpoints.LOCK_FILE).exists()
    with pytest.raises(checkpoints.WorkdirBusyError, match=f'pid {os.getpid()} on '):
      checkpoints.RunFolder(str(workdir)).lock()
  assert not (tmp_path / 'new').exists()  # Nothing was written: the folders made for the lock are gone.
  (tmp_path / 'file').write_text('x')
  with pytest.raises(checkpoints.config_lib.ConfigError, match='is a file, not a folder'):
    checkpoints.RunFolder(str(tmp_path / 'file')).lock()


def test_sigterm_during_validation_abandons_it_and_saves(tmp_path, monkeypatch, capsys):
  """Item 16: SIGTERM while the first of 2 x 3 sample chunks runs: the validation stops after that chunk (no PSNR,
  no media), the step is saved, Interrupted (exit status 143) within seconds."""
  calls = []
  real = validation._check_stop  # pylint: disable=protected-access

  def check(stop, pending=None):
    calls.append(pending is not None)
    if pending is not None and len(calls) == 2:  # While the first chunk of the first batch runs.
      os.kill(os.getpid(), signal.SIGTERM)
      calls.append(time.monotonic())
    real(stop, pending)

  monkeypatch.setattr(validation, '_check_stop', check)
  cfg = _quickstart_config(**{**_overrides(TINY_FLAGS), **dict(
      lr_scheduling_burnin=4, lr_scheduling_n_iter=0, val_interval=2, chkpt_interval=100, n_samples_test=3,
      val_sample_chunk=1, n_iter_test=2)})
  x = np.random.default_rng(1).uniform(size=(2, 6, 64, 64, 1)).astype(np.float32)
  with pytest.raises(train.Interrupted) as e:
    train.train_and_evaluate(cfg, str(tmp_path), train_batches=_batches(), val_batches=lambda step: iter([x, x]),
                             progress=False)
  elapsed = time.monotonic() - calls[2]
  assert e.value.exit_code == 128 + signal.SIGTERM
  assert calls[:2] == [False, True] and len(calls) == 3, calls  # Abandoned at the first chunk's check.
  err = capsys.readouterr().err
  assert 'validation of step 2 abandoned (SIGTERM)' in err and 'SIGTERM: saved step 2' in err, err
  assert checkpoints.RunFolder(str(tmp_path)).steps() == [2]
  assert checkpoints.RunFolder(str(tmp_path)).best_step() is None
  assert not (tmp_path / 'samples').exists()
  metrics = tmp_path / checkpoints.METRICS_FILE
  assert not metrics.exists() or 'val_psnr' not in metrics.read_text()
  assert elapsed < 10, elapsed
  print(f'SIGTERM to Interrupted: {elapsed:.2f} s')


def test_lost_process_of_a_multi_process_run_is_one_line(tmp_path):
  """Items 10 and 2: two processes (jax.distributed on localhost) start a run; they share the lock, another taker
  is refused naming process 0; process 0 is killed -9 (launcher and training) while the first step compiles:
  process 1 ends in bounded time with one line naming process 0 and how to go on, exit status 1, no traceback,
  abort or thread dump (its runtime aborts it: its launcher turns that into the line)."""
  workdir = tmp_path / 'run'
  port = free_port()
  procs, started = [], threading.Event()
  for pid in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(pid),
               XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=1')
    procs.append(subprocess.Popen(launch_cmd(workdir, *LONG, '--config.distributed=True'), cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
  out0 = []

  def read0():
    for line in procs[0].stderr:
      out0.append(line)
      if line.startswith('training from step 0'):  # Start-up done, the lock held: the first step compiles.
        started.set()
  threading.Thread(target=read0, daemon=True).start()
  try:
    end = time.time() + 400
    while not started.wait(0.2):
      assert time.time() < end and all(p.poll() is None for p in procs), f'the run did not start: {out0}' 
    holder = psutil.Process(procs[0].pid).children()[0].pid  # Process 0's training (its launcher supervises it).
    with pytest.raises(checkpoints.WorkdirBusyError) as busy:  # A copy (here in-process: two real ones are above).
      checkpoints.RunFolder(str(workdir)).lock()
    assert f'is in use by another training run (pid {holder} on {socket.gethostname()} (process 0 of 2)' in str(
        busy.value)
    for p in [psutil.Process(holder), psutil.Process(procs[0].pid)]:
      p.kill()
    killed = time.time()
    _, err = procs[1].communicate(timeout=300)
    waited = time.time() - killed
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  lines = err.strip().splitlines()
  assert procs[1].returncode == 1, err
  errors = [l for l in lines if l.startswith('error: ')]
  assert len(errors) == 1 and lines[-1] == errors[0], err
  assert 'lost process 0 of the 2-process run' in errors[0] and 'process 1 stopped too' in errors[0], errors
  assert 'rerun the same command on every host' in errors[0], errors
  for noise in ('Traceback', 'Fatal Python error', 'Check failure', 'Thread 0x', 'client.h'):
    assert noise not in err, err
  assert waited < 120, waited
  print(f'process 1 ended {waited:.1f} s after process 0 was killed')


def test_a_bare_runtime_crash_after_the_coordinator_went_is_a_lost_process_zero():
  """Item 10, the other way the runtime dies: a check failure whose stack trace names no cause (seen as SIGSEGV
  under load). Nothing answering at the coordinator's address then says process 0 is lost; an address that answers
  keeps the generic line (no guess)."""
  closed = free_port()  # Nothing listens there.
  crash = '*** Check failure stack trace: ***\n    @ 0x7f0 (unknown)\n'
  assert supervisor.coordinator_gone(f'127.0.0.1:{closed}')
  line = supervisor.describe_end(crash, signal.SIGSEGV, 1, 2, '/nowhere', supervisor.coordinator_gone(
      f'127.0.0.1:{closed}'))
  assert line.startswith('lost process 0 of the 2-process run (the coordinator is gone); process 1 stopped too: '), line
  with socket.create_server(('127.0.0.1', 0)) as server:
    assert not supervisor.coordinator_gone(f'127.0.0.1:{server.getsockname()[1]}')
  assert not supervisor.coordinator_gone('') and not supervisor.coordinator_gone(None)
  line = supervisor.describe_end(crash, signal.SIGSEGV, 1, 2, '/nowhere', False)
  assert line.startswith('the training process ended by SIGSEGV: *** Check failure stack trace: ***;'), line
