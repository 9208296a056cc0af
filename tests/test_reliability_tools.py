"""Issue 18, the tools: output folders never overwritten without asking (converter, evaluation), Ctrl-C in every
tool, one line for a broken config file / workdir / official config, the unsafe-pickle refusal, quiet libraries."""
# pylint: disable=redefined-outer-name,unused-argument  # pytest fixtures.

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from absl import flags

import convert_torch_ckpt
import launch
from srvp_jax import benchmark, cli, convert, evaluate, out_folder, parity, predict
from srvp_jax.preparation import cli as data_cli
from tests import raw_fixtures as rf

from helpers import snapshot  # pylint: disable=wrong-import-order
from test_evaluate import mmnist_dir, tiny_ckpt  # pylint: disable=unused-import,wrong-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DCGAN = os.path.join(ROOT, 'tests', 'data', 'golden', 'dcgan')


def _python(*args, timeout=300, **kwargs):
  """A tool as a user runs it (SIGINT at its default even when the test runner ignores it)."""
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        check=False, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def _one_line(err, *needles):
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


def _official_folder(path, extra=()):
  """A copy of the golden official experiment folder (config.json + model.pt, and ``extra`` files)."""
  os.makedirs(path)
  for name in ('config.json', 'model.pt'):
    shutil.copy(os.path.join(GOLDEN_DCGAN, name), os.path.join(path, name))
  for name in extra:
    with open(os.path.join(path, name), 'w', encoding='utf-8') as f:
      f.write('theirs')
  return str(path)


# --------------------------------------------------------------------------------------------------------------------
# 1, 17: the converter owns its --out folder; it prints no library log.


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """The golden official checkpoint converted to ours by the command itself: one line on stdout, nothing on stderr
  (orbax's "Requested `tracked_metric`" warning went through the root logger's handler)."""
  out = str(tmp_path_factory.mktemp('conv') / 'ours')
  res = _python('convert_torch_ckpt.py', GOLDEN_DCGAN, '--out', out)
  assert res.returncode == 0 and res.stderr == '', res.stderr
  assert len(res.stdout.strip().splitlines()) == 1
  return out


def test_converter_refuses_a_foreign_or_input_out_and_replaces_its_own(converted, tmp_path, capsys, monkeypatch):
  official = _official_folder(tmp_path / 'official', extra=('model_best.pt',))
  before = snapshot(official)
  capsys.readouterr()
  # An official folder as --to_torch's --out, the input folder itself, a folder above the input: refused.
  cases = [([converted, '--to_torch', '--out', official], ['not an earlier output of convert_torch_ckpt.py',
                                                            'config.json, model.pt, model_best.pt', '--overwrite']),
           ([official, '--out', official], ['is the input', 'never replaces its input']),
           ([official, '--out', official, '--overwrite'], ['is the input']),
           ([converted, '--to_torch', '--out', os.path.dirname(converted), '--overwrite'], ['holding the input'])]
  for argv, needles in cases:
    assert convert_torch_ckpt.main(argv) == 2, argv
    _one_line(capsys.readouterr().err, *needles)
  assert snapshot(official) == before
  # --overwrite replaces the folder as a whole: no file of the official folder survives beside the export.
  assert convert_torch_ckpt.main([converted, '--to_torch', '--out', official, '--overwrite']) == 0
  assert sorted(os.listdir(official)) == sorted([convert_torch_ckpt.MARKER, 'config.json', 'model.pt'])
  # Its own earlier output is replaced without --overwrite; a failed conversion leaves it as it was.
  mine = snapshot(official)
  assert convert_torch_ckpt.main([converted, '--to_torch', '--out', official, '--checkpoint', 'latest']) == 0
  assert snapshot(official).keys() == mine.keys()
  mine = snapshot(official)

  def fail(*args):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(convert, 'save_torch_file', fail)
  with pytest.raises(OSError):
    convert_torch_ckpt.to_torch(converted, 'latest', official)
  assert snapshot(official) == mine
  assert sorted(os.listdir(tmp_path)) == ['official']  # No partial sibling left behind.


def test_converter_type_errors_and_unsafe_pickles_are_one_safe_line(tmp_path, capsys):
  xp = _official_folder(tmp_path / 'xp')
  with open(os.path.join(xp, 'config.json'), encoding='utf-8') as f:
    official = json.load(f)
  with open(os.path.join(xp, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump({**official, 'nf': 'sixteen'}, f)
  capsys.readouterr()
  assert convert_torch_ckpt.main([xp, '--out', str(tmp_path / 'a')]) == 2
  _one_line(capsys.readouterr().err, os.path.join(xp, 'config.json'), "nf='sixteen' is not an integer")
  # 14: a pickle that would run code: refused, and never with torch's advice to load it with weights_only=False.

  class Evil:
    def __reduce__(self):
      return os.makedirs, (str(tmp_path / 'pwned'),)
  torch.save({'w': torch.zeros(2), 'x': Evil()}, os.path.join(xp, 'model.pt'))
  with open(os.path.join(xp, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(official, f)
  assert convert_torch_ckpt.main([xp, '--out', str(tmp_path / 'b')]) == 2
  line = _one_line(capsys.readouterr().err, 'holds objects other than tensors (os.makedirs)', 'refused')
  assert 'weights_only' not in line
  assert not (tmp_path / 'pwned').exists() and not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


def test_stale_partial_folders_of_dead_processes_are_removed(tmp_path):
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True,
                        check=True).stdout.strip()
  prefix = out_folder._partial_prefix('out')  # pylint: disable=protected-access
  stale, alive = tmp_path / f'{prefix}{dead}-abc', tmp_path / f'{prefix}{os.getpid()}-abc'
  stale.mkdir()
  alive.mkdir()
  with out_folder.replaced(str(tmp_path / 'out')) as tmp:
    with open(os.path.join(tmp, 'x'), 'w', encoding='utf-8') as f:
      f.write('new')
  assert sorted(os.listdir(tmp_path)) == sorted([alive.name, 'out']) and os.listdir(tmp_path / 'out') == ['x']


# --------------------------------------------------------------------------------------------------------------------
# 5, 11: evaluation owns its --out folder; Ctrl-C leaves the earlier results.


def _evaluate(ckpt, data_dir, out, *extra):
  return evaluate.main([ckpt, '--data_dir', data_dir, '--nt_gen', '5', '--n_samples', '2', '--metrics', 'psnr',
                        '--no_progress', '--out', out, *extra])


@pytest.fixture(scope='module')
def earlier_eval(tiny_ckpt, mmnist_dir, tmp_path_factory):
  """An evaluation's output folder, with its figures (comparison.png / .gif, per_frame.png)."""
  out = str(tmp_path_factory.mktemp('earlier') / 'eval')
  assert _evaluate(tiny_ckpt, mmnist_dir, out, '--n_show', '1') == 0
  assert {'comparison.png', 'comparison.gif', 'per_frame.png', 'results.json'} <= set(os.listdir(out))
  return out


def test_evaluation_replaces_its_earlier_outputs_as_a_whole(earlier_eval, tiny_ckpt, mmnist_dir, tmp_path, capsys):
  out = str(tmp_path / 'eval')
  shutil.copytree(earlier_eval, out)
  assert _evaluate(tiny_ckpt, mmnist_dir, out, '--n_show', '0') == 0
  names = set(os.listdir(out))
  assert 'psnr_best.npz' in names and not names & {'comparison.png', 'comparison.gif'}, names  # Nothing stale.
  with open(os.path.join(out, 'results.json'), encoding='utf-8') as f:
    assert json.load(f)['options']['metrics'] == ['psnr']
  # A folder holding anything else is refused before any work, untouched; --overwrite replaces it.
  with open(os.path.join(out, 'notes.txt'), 'w', encoding='utf-8') as f:
    f.write('mine')
  before = snapshot(out)
  capsys.readouterr()
  assert _evaluate(tiny_ckpt, mmnist_dir, out) == 2
  _one_line(capsys.readouterr().err, 'not an earlier output of python -m srvp_jax.evaluate', 'notes.txt',
            '--overwrite')
  assert _evaluate(tiny_ckpt, mmnist_dir, mmnist_dir, '--overwrite') == 2
  _one_line(capsys.readouterr().err, 'is the input')
  assert snapshot(out) == before
  assert _evaluate(tiny_ckpt, mmnist_dir, out, '--n_show', '0', '--overwrite') == 0
  assert 'notes.txt' not in os.listdir(out) and sorted(os.listdir(tmp_path)) == ['eval']


def test_ctrl_c_during_evaluation_is_one_line_and_keeps_the_earlier_results(earlier_eval, tiny_ckpt, mmnist_dir,
                                                                            tmp_path):
  out = str(tmp_path / 'eval')
  shutil.copytree(earlier_eval, out)
  before = snapshot(out)
  proc = subprocess.Popen(  # 100,000 samples in chunks of 2: still sampling when Ctrl-C comes.
      [sys.executable, '-m', 'srvp_jax.evaluate', tiny_ckpt, '--data_dir', mmnist_dir, '--nt_gen', '5', '--metrics',
       'psnr', '--n_samples', '100000', '--sample_chunk', '2', '--no_progress', '--out', out], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
  reader.start()
  end = time.time() + 120
  while not any(line.startswith('Evaluating') for line in lines) and proc.poll() is None and time.time() < end:
    time.sleep(0.05)
  time.sleep(1)  # Compiling or sampling.
  proc.send_signal(signal.SIGINT)
  sent = time.time()
  rc = proc.wait(60)
  reader.join(10)
  err = ''.join(lines)
  assert rc == 130 and time.time() - sent < 10, err
  assert err.splitlines()[-1] == 'error: interrupted (Ctrl-C)', err
  assert 'Traceback' not in err and 'Exception ignored' not in err and 'Segmentation' not in err, err
  assert snapshot(out) == before


# --------------------------------------------------------------------------------------------------------------------
# 11: Ctrl-C in every tool.

_CTRL_C = r'''
import gc, signal, sys, time
from srvp_jax import cli

def body(argv):
  if sys.argv[1] == 'aside':  # Another handler in place (training's saves on Ctrl-C): it, not the exit, runs.
    got = []
    signal.signal(signal.SIGINT, lambda *a: got.append(1))
    print('ready', flush=True)
    while not got:
      time.sleep(0.01)
    print('handled by the tool', flush=True)
    return 0
  # JAX's way: a gc callback, where a KeyboardInterrupt would be printed as "Exception ignored" and lost.
  gc.callbacks.append(lambda phase, info: time.sleep(0.001))
  print('ready', flush=True)
  end = time.time() + 60
  while time.time() < end:
    for _ in range(100):
      a = []
      a.append(a)
  return 0

sys.exit(cli.main(body, None))
'''


@pytest.mark.parametrize('mode', ['gc_callbacks', 'aside'])
def test_ctrl_c_ends_a_program_with_one_line(mode):
  proc = subprocess.Popen([sys.executable, '-c', _CTRL_C, mode], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  assert proc.stdout.readline() == 'ready\n'
  time.sleep(0.3)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=30)
  if mode == 'aside':
    assert proc.returncode == 0 and out == 'handled by the tool\n' and err == '', err
  else:
    assert proc.returncode == 130 and err == 'error: interrupted (Ctrl-C)\n', err


def test_every_tool_ends_on_ctrl_c_when_it_is_the_program(monkeypatch, capsys):
  installed = []
  monkeypatch.setattr(cli, 'exit_on_ctrl_c', lambda line: installed.append(line) or (lambda: None))
  tools = {'convert_torch_ckpt.py': convert_torch_ckpt.main, 'evaluate': evaluate.main, 'predict': predict.main,
           'benchmark': benchmark.main, 'parity': parity.main, 'data': data_cli.main}
  for prog, main in tools.items():
    monkeypatch.setattr(sys, 'argv', [prog, '--no_such_option'])
    assert main() == 2 and len(installed) == 1 and installed.pop() == 'interrupted (Ctrl-C)', prog
  assert launch.main(['launch.py', 'unexpected']) == 2
  assert installed == ['interrupted (Ctrl-C) before training started; nothing written']
  # Called from Python (an argv list), a tool leaves Ctrl-C to Python: KeyboardInterrupt, the line, 130.
  assert convert_torch_ckpt.main(['--out', 'o', '--no_such_option']) == 2 and len(installed) == 1

  def interrupted(argv):
    raise KeyboardInterrupt
  capsys.readouterr()
  assert cli.main(interrupted, []) == 130 and capsys.readouterr().err == 'error: interrupted (Ctrl-C)\n'


# --------------------------------------------------------------------------------------------------------------------
# 13: a config file that fails, a workdir that is a file.


@pytest.fixture
def absl_flags():
  yield
  flags.FLAGS.unparse_flags()


@pytest.mark.parametrize('code, needles', [
    ('def get_config():\n  return 1 / 0\n', ['ZeroDivisionError: division by zero', 'cfg.py, line 2']),
    ('def get_config(:\n', ['SyntaxError: invalid syntax', 'cfg.py, line 1']),
    ('import configs.quickstart\ndef get_config():\n  c = configs.quickstart.get_config()\n  c.lr = lr\n  return c\n',
     ["NameError: name 'lr' is not defined", 'cfg.py, line 4']),
])
def test_a_failing_config_file_is_one_line(tmp_path, capsys, absl_flags, code, needles):
  path = tmp_path / 'cfg.py'
  path.write_text(code)
  with pytest.raises(SystemExit) as exit_info:
    launch.parse_flags(['launch.py', '--config', str(path), '--workdir', str(tmp_path / 'run')])
  assert exit_info.value.code == 2
  _one_line(capsys.readouterr().err, f'the config file {path} failed to load', *needles, 'correct it there')
  assert not (tmp_path / 'run').exists()


def test_a_workdir_that_is_a_file_is_one_line(tmp_path, capsys, absl_flags):
  (tmp_path / 'file').write_text('x')
  for workdir, needle in ((tmp_path / 'file', 'is a file, not a folder'), (tmp_path / 'file' / 'run', 'is a file')):
    launch.parse_flags(['launch.py', '--config', os.path.join(ROOT, 'configs', 'quickstart.py'), '--workdir',
                        str(workdir)])
    assert launch.main(['launch.py']) == 2
    _one_line(capsys.readouterr().err, f'--workdir {workdir}', needle)
  assert (tmp_path / 'file').read_text() == 'x'


# --------------------------------------------------------------------------------------------------------------------
# 17: no TensorFlow C++ lines while preparing BAIR.


def test_prepare_bair_prints_no_tensorflow_log(tmp_path):
  root = os.path.join(tmp_path, 'softmotion30_44k')
  rf.write_bair_tfrecords(root, 'train', (1,), seed=0)  # TensorFlow in this process, not in the tool's yet.
  rf.write_bair_tfrecords(root, 'test', (1,), seed=1)
  env = {k: v for k, v in os.environ.items() if not k.startswith('TF_')}
  res = _python('-m', 'srvp_jax.data', 'prepare', 'bair', '--data_dir', str(tmp_path), '--no_progress', env=env)
  assert res.returncode == 0 and res.stderr == '', res.stderr
  assert np.load(os.path.join(tmp_path, 'store', 'test', 'frames_0000.npy'), mmap_mode='r').shape[0] == 30
