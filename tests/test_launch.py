"""launch.py as a user runs it: one line per bad input and an untouched workdir, a quiet console and
SIGINT/SIGTERM saves (two processes against one: tests/test_launch_distributed.py)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from srvp_jax import checkpoints
from srvp_jax import config as config_lib

from helpers import snapshot  # pylint: disable=wrong-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The quick start, tiny: a few seconds per step on 2 CPU cores, mostly compilation.
TINY_FLAGS = ['--config.nf=8', '--config.nhx=16', '--config.nlayers_inf=2', '--config.nlayers_res=2', '--config.ny=4',
              '--config.nz=4', '--config.nh_inf=16', '--config.nh_res=16', '--config.nt_inf=2', '--config.nt_cond=2',
              '--config.seq_len=6', '--config.batch_size=4', '--config.num_data_workers=1', '--config.n_samples_test=2',
              '--config.val_sample_chunk=2', '--config.batch_size_test=2', '--config.n_iter_test=1',
              '--config.n_val_videos_gif=2']


def launch_cmd(workdir, *flags, config='configs/quickstart.py'):
  return [sys.executable, 'launch.py', '--config', config, '--workdir', str(workdir), *flags]


def run_launch(workdir, *flags, config='configs/quickstart.py', timeout=600):
  return subprocess.run(launch_cmd(workdir, *flags, config=config), cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, check=False)


def assert_one_line(res, *needles, code=2):
  lines = res.stderr.strip().splitlines()
  assert res.returncode == code and len(lines) == 1 and lines[0].startswith('error: '), res.stderr
  assert 'Traceback' not in res.stderr
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize('flags,needles', [
    (['--config.nff=3'], ["unknown config key 'nff'", "did you mean 'nf'?"]),
    (['--config.val_intervl=10'], ["did you mean 'val_interval'?"]),
    (['--config.val_interval=0'], ['val_interval=0 must be a positive integer']),
    (['--config.log_interval=0'], ['log_interval=0 must be a positive integer']),
    (['--config.nf=abc'], ['nf']),
])
def test_bad_flags_are_one_line_and_leave_no_workdir(tmp_path, flags, needles):
  res = run_launch(tmp_path / 'run', *flags)
  assert_one_line(res, *needles)
  assert not (tmp_path / 'run').exists()


def test_missing_config_file_is_one_line(tmp_path):
  res = run_launch(tmp_path / 'run', config='configs/quickstrat.py')
  assert_one_line(res, 'config file not found: configs/quickstrat.py', 'did you mean configs/quickstart.py?')
  assert not (tmp_path / 'run').exists()


def test_data_error_comes_first_and_leaves_no_workdir(tmp_path):
  res = run_launch(tmp_path / 'run', '--config.digits_source=idx', f'--config.data_dir={tmp_path / "nodata"}')
  assert res.returncode == 2 and 'Traceback' not in res.stderr, res.stderr
  errors = [l for l in res.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and str(tmp_path / 'nodata') in errors[0], res.stderr
  assert not (tmp_path / 'run').exists()


def _quickstart_config(**overrides):
  import importlib  # pylint: disable=import-outside-toplevel
  cfg = importlib.import_module('configs.quickstart').get_config()  # configs is a package: no sys.path edits.
  cfg.unlock()
  cfg.update(overrides)
  config_lib.validate(cfg)
  return cfg


def test_relaunch_contradicting_the_checkpoints_is_refused_untouched(tmp_path):
  """A run made with nf=16, relaunched with --config.nf=8: one line naming nf, nothing written."""
  from srvp_jax.model import abstract_model  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / 'run')
  cfg = _quickstart_config()
  folder = checkpoints.RunFolder(workdir)
  folder.save_config(cfg)
  model = abstract_model(cfg)
  zeros = __import__('jax').tree.map(lambda v: np.zeros(v.shape, v.dtype), checkpoints.model_tree(model))
  folder.create()
  folder.save(10, zeros, {'step': 10})
  folder.close()
  before = snapshot(workdir)
  res = run_launch(workdir, '--config.nf=8')
  assert_one_line(res, 'holds checkpoints of another model', 'nf: 16 -> 8')
  assert snapshot(workdir) == before
  # --verbosity brings the library logs (here orbax's) back; the error is still one line, printed once.
  res = run_launch(workdir, '--config.nf=8', '--verbosity=0')
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 2 and any('checkpoint_manager.py' in l for l in lines), res.stderr
  assert sum(l.startswith('error: ') for l in lines) == 1 and lines[-1].startswith('error: ')
  assert snapshot(workdir) == before


def test_quick_start_run_is_quiet_and_keeps_latest_periodic_best(tmp_path):
  """8 steps, 2 validations: a handful of lines, no library logs, no nan; checkpoints as the policy says."""
  workdir = tmp_path / 'run'
  res = run_launch(workdir, *TINY_FLAGS, '--config.lr_scheduling_burnin=6', '--config.lr_scheduling_n_iter=2',
                   '--config.val_interval=4', '--config.chkpt_interval=2', '--config.keep_checkpoints=1',
                   '--config.keep_period=3', '--config.log_interval=2')
  assert res.returncode == 0, res.stderr
  lines = res.stderr.strip().splitlines() + res.stdout.strip().splitlines()
  assert len(lines) <= 20, lines
  text = '\n'.join(lines)
  assert 'nan' not in text.lower() and 'Traceback' not in text and 'orbax' not in text and 'I0000' not in text, text
  assert sum(l.startswith('step ') and 'validation PSNR' in l for l in lines) == 2, text
  with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
    records = [json.loads(l) for l in f]
  psnr = {r['step']: r['val_psnr'] for r in records if 'val_psnr' in r}
  assert sorted(psnr) == [4, 8]
  best = max(psnr, key=psnr.get)
  # Saved at 2, 4, 6, 8: kept the newest (8), the multiples of keep_period (6) and the best.
  assert sorted(int(d) for d in os.listdir(workdir / 'checkpoints')) == sorted({6, 8, best})
  assert checkpoints.RunFolder(str(workdir)).resolve('best')[1] == best
  assert checkpoints.load_model(str(workdir), 'latest')[2] == 8
  assert os.path.isfile(workdir / 'samples' / 'val_00000004.gif')


class _Run:
  """launch.py in the background, its stderr collected line by line."""

  def __init__(self, workdir, *flags):
    self.proc = subprocess.Popen(launch_cmd(workdir, *flags), cwd=ROOT, stderr=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, text=True)
    self.lines = []
    self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
    self.reader.start()

  def wait_for(self, predicate, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
      if predicate():
        return
      if self.proc.poll() is not None:
        raise AssertionError(f'launch.py ended early: {"".join(self.lines)}')
      time.sleep(0.05)
    self.proc.kill()
    raise AssertionError(f'timed out: {"".join(self.lines)}')

  def finish(self, timeout=300):
    rc = self.proc.wait(timeout)
    self.reader.join(10)
    return rc, ''.join(self.lines)


def _losses(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return 0
  with open(path, encoding='utf-8') as f:
    return sum('"loss"' in l for l in f)


def _signal_and_finish(run, sig, workdir):
  """Sends ``sig`` to the running launch.py: it exits with 128 + signal, no traceback, having saved (and named)
  the step it finished; that step is the latest checkpoint. Returns it."""
  run.proc.send_signal(getattr(signal, sig))
  rc, err = run.finish()
  assert rc == 128 + getattr(signal, sig), err
  assert 'Traceback' not in err and 'Segmentation' not in err, err
  saved = [l for l in err.splitlines() if l.startswith(f'{sig}: saved step ')]
  assert len(saved) == 1, err
  step = int(saved[0].split('saved step ')[1].split()[0])
  assert checkpoints.load_model(str(workdir), 'latest')[2] == step
  return step


def test_signals_save_a_valid_state_and_exit_cleanly(tmp_path):
  """SIGINT during the first compilation; resumed, SIGTERM between steps (right after a donated step); resumed
  again, SIGTERM right after resuming: each time the step actually finished is saved and named, no traceback,
  exit status 128 + signal, and the next run resumes from it (one workdir, three runs)."""
  workdir = tmp_path / 'run'
  flags = [*TINY_FLAGS, '--config.lr_scheduling_burnin=100000', '--config.log_interval=1',
           '--config.val_interval=100000', '--config.chkpt_interval=100000']
  run = _Run(workdir, *flags)
  run.wait_for(lambda: any('training from step 0' in l for l in run.lines))  # Compilation starts.
  first = _signal_and_finish(run, 'SIGINT', workdir)
  assert first >= 1
  run = _Run(workdir, *flags)  # Resumes, then takes 3 more steps.
  run.wait_for(lambda: any(f'resuming at step {first}' in l for l in run.lines))
  run.wait_for(lambda: _losses(workdir) >= first + 3)
  second = _signal_and_finish(run, 'SIGTERM', workdir)
  assert second >= first + 3
  run = _Run(workdir, *flags)
  run.wait_for(lambda: any(f'resuming at step {second}' in l for l in run.lines))
  _signal_and_finish(run, 'SIGTERM', workdir)
