"""Parity with the official PyTorch code: replays tests/data/golden/{dcgan,vgg_skip} (srvp_jax.parity).

The primary reference is ``golden64.npz`` (the official code in float64): replayed with our model in
float64, every recorded quantity, gradients included, agrees to 1e-10 relative (measured: < 1e-13).
``golden.npz`` (float32) checks the float32 program: forward values and losses (1e-5) and the DCGAN
gradients (1e-4); VGG gradients in float32 depend on the machine's rounding and are not compared.
Tests check the returned ``Comparison`` objects; one test runs the CLI.
"""

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from srvp_jax import parity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, 'tests', 'data', 'golden')
DCGAN, VGG_SKIP = os.path.join(GOLDEN, 'dcgan'), os.path.join(GOLDEN, 'vgg_skip')
NOT_COMPARED = ('x', 'pred/nt_cond', 'pred/nt_pred', 'train/skip_frame', 'train/w_frames')


_REPLAYS = {}
_REPLAY = parity.replay


def replay(golden_dir, precision, forms=None):
  """``parity.replay`` of a whole folder, computed once per test process: the replays are pure functions of
  their folder, precision and forms (the CLI test reads the same ones, below)."""
  key = (golden_dir, precision, forms)
  if key not in _REPLAYS:
    optimised = _OPTIMISED.get((precision, forms), ())
    with _llvm_optimised(optimised) if optimised else contextlib.nullcontext():
      _REPLAYS[key] = _REPLAY(golden_dir, precision, forms=forms)
  return _REPLAYS[key]


# The replayed programs (parity.py's jitted passes) that compile with LLVM's optimisations, whatever the suite's
# level 0 (conftest.py), per (precision, forms). XLA's CPU float64 convolutions are loops it generates itself: the
# GPU forms' lhs-dilated ones make each pass of their replay 2-2.5x faster optimised (compilation included: 60 -> 28
# core-seconds), the CPU forms' gradients the training pass (DCGAN 17.8 -> 12.7, VGG 20.6 -> 15.3 core-seconds),
# while their evaluation and prediction passes and every float32 pass are faster unoptimised.
_OPTIMISED = {('float64', 'gpu'): ('eval_pass', 'pred_pass', 'train_pass'), ('float64', None): ('train_pass',)}


@contextlib.contextmanager
def _llvm_optimised(names):
  """The functions named ``names`` jitted meanwhile compile with LLVM's optimisations."""
  jit = jax.jit

  def optimised_jit(fun=None, **kwargs):
    if fun is None:  # jax.jit(**options) as a decorator.
      return functools.partial(optimised_jit, **kwargs)
    if getattr(fun, '__name__', None) in names:
      kwargs['compiler_options'] = {'xla_backend_optimization_level': 2}
    return jit(fun, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax, 'jit', optimised_jit)
    yield


def recorded_outputs(golden_dir, precision):
  """Reference keys that are outputs (every one must be compared), not inputs or injected noise."""
  with np.load(os.path.join(golden_dir, parity.REFERENCE_FILES[precision])) as g:
    return {k for k in g.files if k not in NOT_COMPARED and '/eps_' not in k}


@pytest.mark.parametrize('golden_dir', [DCGAN, VGG_SKIP], ids=['dcgan', 'vgg_skip'])
def test_float64_replay_matches_every_recorded_quantity(golden_dir):
  results = replay(golden_dir, 'float64')
  names = [c.name for c in results]
  assert len(names) == len(set(names)) and set(names) == recorded_outputs(golden_dir, 'float64')
  assert {c.kind for c in results} == {'forward', 'loss', 'grad'}
  bad = [c for c in results if not c.ok]
  assert not bad, bad
  # Exact up to float64 rounding: far inside the 1e-10 tolerance, gradients included.
  assert max(c.rel_err for c in results) < 1e-12
  assert all(c.tolerance == 1e-10 for c in results)


def test_float64_replay_with_the_gpu_layer_forms_is_exact():
  """The GPU forms (lhs-dilated transposed convolutions, traced for a GPU, run here) replay DCGAN exactly."""
  results = replay(DCGAN, 'float64', forms='gpu')
  assert {c.name for c in results} == recorded_outputs(DCGAN, 'float64')
  assert all(c.ok for c in results), [c for c in results if not c.ok]
  assert max(c.rel_err for c in results) < 1e-12


def test_float32_replay_dcgan_matches_values_losses_and_gradients():
  results = replay(DCGAN, 'float32')
  assert {c.name for c in results} == recorded_outputs(DCGAN, 'float32')
  assert all(c.ok for c in results), [c for c in results if not c.ok]
  assert sum(c.kind == 'grad' for c in results) > 30


def test_float32_replay_vgg_skip_compares_everything_but_gradients():
  results = replay(VGG_SKIP, 'float32')
  expected = {k for k in recorded_outputs(VGG_SKIP, 'float32') if not k.startswith('train/grad/')}
  assert {c.name for c in results} == expected
  assert all(c.ok for c in results), [c for c in results if not c.ok]
  assert not any(c.kind == 'grad' for c in results)


def test_replay_detects_a_model_that_differs(tmp_path):
  """A wrong loss weight (what a convention bug looks like) fails the float64 replay."""
  case = tmp_path / 'dcgan'
  shutil.copytree(DCGAN, case)
  cfg = json.loads((case / 'config.json').read_text())
  cfg['beta_z'] = float(cfg['beta_z']) + 1e-6
  (case / 'config.json').write_text(json.dumps(cfg))
  results = {c.name: c for c in parity.replay(str(case), 'float64', parts=('eval',))}
  assert results['eval/x_rec'].ok and results['eval/loss/nll'].ok
  assert not results['eval/loss/loss'].ok and results['eval/loss/loss'].rel_err < 1e-6


def test_cli_passes_and_exits_0(capsys, monkeypatch):
  """``python -m srvp_jax.parity DIR``'s main, in this process (its process-level error path: the test below), on
  the replays the tests above computed and checked (computed now if they did not run)."""
  calls = []
  monkeypatch.setattr(parity, 'replay', lambda d, precision, forms=None: calls.append((precision, forms)) or replay(
      d, precision, forms))
  code = parity.main([DCGAN])
  assert calls == [('float64', None), ('float32', None), ('float64', 'gpu')]  # Each precision, then the GPU forms.
  out = capsys.readouterr()
  assert code == 0, out.out + out.err
  assert 'dcgan [float64]: 98/98 quantities within tolerance' in out.out
  assert 'dcgan [float32]: 98/98 quantities within tolerance' in out.out
  assert 'dcgan [float64, GPU layer forms and scan unrolling]: 98/98 quantities within tolerance' in out.out


def test_cli_errors_on_a_folder_without_golden_data(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'srvp_jax.parity', str(tmp_path)], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 2 and 'lacks model.pt' in proc.stderr and 'Traceback' not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
