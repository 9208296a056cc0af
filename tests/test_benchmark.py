"""The speed benchmark (srvp_jax.benchmark) on a tiny model: rows, PyTorch baseline, layers, CLI, no TensorFlow.

Times are only checked to be positive and finite: the benchmark measures, it never asserts a speed.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from srvp_jax import benchmark
from srvp_jax.model import onednn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(nf=8, nhx=16, nlayers_inf=2, nlayers_res=2, ny=4, nz=4, nh_inf=16, nh_res=16, seq_len=6, nt_cond=2,
            nt_inf=2, batch_size_test=2)
TINY_ARG = ','.join(f'{k}={v}' for k, v in TINY.items())
BATCH = 4


def tiny_config(name='smmnist', **overrides):
  return benchmark.load_config(name, batch=BATCH, overrides={**TINY, **overrides})


def positive_finite(x):
  return isinstance(x, float) and math.isfinite(x) and x > 0


def run_cli(args, tmp_path, script=None):
  """Runs the benchmark in a subprocess (``python -m`` or a script importing it) from the repository root."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  cmd = [sys.executable, '-m', 'srvp_jax.benchmark', *args] if script is None else [sys.executable, '-c', script, *args]
  return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_time_train_step_and_torch_baseline():
  cfg = tiny_config()
  row = benchmark.time_train_step(cfg, warmup=1, steps=2, label='smmnist')
  assert row['kind'] == 'train' and row['batch'] == BATCH and row['dtype'] == 'float32'
  assert row['precision'] == 'float32' and row['scan_unroll'] == 1  # The CPU default.
  for key in ('median_s', 'min_s', 'compile_s', 'first_step_s', 'videos_per_s'):
    assert positive_finite(row[key]), (key, row[key])
  assert row['videos_per_s'] == BATCH / row['median_s']
  assert len(row['times_s']) == 2
  assert row['warnings'] == []  # The donated state is fully reused: no "donated buffers were not usable".
  assert row['flops'] > 0 and row['peak_memory_bytes'] > 0
  assert row['mfu'] is None  # CPU: no known peak.
  assert math.isfinite(row['first_loss'])
  assert row['host_other_cores'] is None or row['host_other_cores'] >= 0
  torch_row = benchmark.time_torch_train_step(cfg, warmup=1, steps=2)
  assert positive_finite(torch_row['torch_s']) and torch_row['torch_device'] == 'cpu'


def test_time_layers_both_frameworks():
  # With skip connections (the decoder then takes the encoder's skips) and 2 Euler steps per frame.
  cfg = tiny_config(skipco=True, n_euler_steps=2, batch_size=2)
  rows = benchmark.time_layers(cfg, warmup=1, steps=2, with_torch=True, label='smmnist')
  assert {(r['layer'], r['mode']) for r in rows} == {(l, m) for l in benchmark.LAYERS for m in benchmark.MODES}
  for r in rows:
    assert positive_finite(r['median_s']) and positive_finite(r['compile_s']), r
    assert positive_finite(r['torch_s']) and r['ratio'] == r['torch_s'] / r['median_s'], r
  assert 'skips' in next(r for r in rows if r['layer'] == 'decoder')['shape']


@pytest.mark.skipif(not onednn.available(), reason='oneDNN unavailable (apt-get install -y libdnnl-dev)')
def test_time_convs_every_pass_of_every_convolution():
  cfg = tiny_config(batch_size=1)
  shapes = benchmark.conv_shapes(cfg)
  # DCGAN: four stride-2 convolutions (64x64 -> 4x4) and four stride-2 transposed convolutions (4x4 -> 64x64);
  # the 4x4 'valid' convolution and the 1x1 -> 4x4 transposed one are matrix products.
  assert (False, 64, 1, 8, 4, 2, 1) in shapes and (True, 32, 8, 1, 4, 2, 1) in shapes and len(shapes) == 8
  rows = benchmark.time_convs(cfg, warmup=0, steps=1, with_torch=True, label='smmnist')
  assert len(rows) == 3 * len(shapes)
  assert {r['mode'] for r in rows} == set(benchmark.CONV_PASSES)
  for r in rows:
    assert positive_finite(r['median_s']) and positive_finite(r['xla_s']) and positive_finite(r['torch_s']), r
    assert r['batch'] == cfg.batch_size * cfg.seq_len and r['ratio'] == r['torch_s'] / r['median_s']


def test_test_py_baseline_runs_the_official_protocol():
  cfg = tiny_config()
  from srvp_jax.evaluation import learned_metrics  # pylint: disable=import-outside-toplevel
  row = benchmark.time_test_py(cfg, n_videos=3, n_samples=2, lpips_model=learned_metrics.LpipsOnFrames(None).model.model)
  assert positive_finite(row['test_py_s']) and positive_finite(row['test_py_sample_s'])
  assert row['test_py_sample_s'] <= row['test_py_s'] and row['torch_device'] == 'cpu'


def test_torch_ssim_matches_ours():
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from srvp_jax.metrics import image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  a, b = rng.uniform(size=(2, 4, 64, 64, 3)).astype(np.float32)
  b = np.clip(a + 0.1 * b, 0, 1)
  ours = np.asarray(image.ssim(jnp.asarray(a), jnp.asarray(b)))
  theirs = benchmark._torch_ssim(torch.from_numpy(a).permute(0, 3, 1, 2), torch.from_numpy(b).permute(0, 3, 1, 2))
  np.testing.assert_allclose(theirs.numpy(), ours, rtol=1e-4, atol=1e-5)


# The command's main (what ``python -m srvp_jax.benchmark`` runs, below for bad input and --help), then what the
# process imported: the whole command, torch baselines and LPIPS included, runs without TensorFlow.
_MAIN_WITHOUT_TENSORFLOW = (
    'import sys\n'
    'from srvp_jax import benchmark\n'
    'status = benchmark.main(sys.argv[1:])\n'
    'loaded = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))\n'
    'assert not loaded, loaded\n'
    'sys.exit(status)\n')


def test_cli_table_and_json_without_tensorflow(tmp_path):
  out = tmp_path / 'sub' / 'bench.json'
  res = run_cli(['--configs', 'smmnist', '--batch', str(BATCH), '--steps', '2', '--warmup', '1', '--torch',
                 '--eval', '--eval_videos', '2', '--eval_samples', '2', '--override', TINY_ARG, '--json', str(out)],
                tmp_path, script=_MAIN_WITHOUT_TENSORFLOW)
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'train step' in res.stdout and 'eval psnr,ssim,lpips' in res.stdout and 'torch/ours' in res.stdout
  assert res.stdout.startswith('# cpu')
  report = json.loads(out.read_text())
  assert report['jax'] and report['device'] == 'cpu' and report['date'] and report['torch']
  assert report['tensorflow_imported'] is False
  kinds = [r['kind'] for r in report['rows']]
  assert kinds == ['train', 'eval', 'eval']
  train_row, eval_row, lpips_row = report['rows']
  assert positive_finite(train_row['torch_s']) and train_row['ratio'] == train_row['torch_s'] / train_row['median_s']
  for r in (eval_row, lpips_row):
    assert positive_finite(r['frames_per_s']) and r['predicted_frames'] == 2 * 2 * (25 - 2)
  assert lpips_row['metrics'] == ['psnr', 'ssim', 'lpips'] and 'random AlexNet' in lpips_row['note']


@pytest.mark.parametrize('args, expected', [
    (['--configs', 'smmnist,nope'], "unknown config 'nope'; valid: smmnist, mmnist_deterministic, kth, human, bair"),
    (['--dtypes', 'float16'], 'unknown dtype'),
    (['--override', 'nf=eight'], 'nf='),
])
def test_bad_input_is_one_line(tmp_path, args, expected):
  res = run_cli(args, tmp_path)
  assert res.returncode == 2
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and expected in lines[0], res.stderr
  assert 'Traceback' not in res.stderr and res.stdout == ''


def test_help_has_an_example(tmp_path):
  res = run_cli(['--help'], tmp_path)
  assert res.returncode == 0 and 'python -m srvp_jax.benchmark --configs' in res.stdout


def test_gpu_table_runs_valid_benchmark_commands():
  # --gpu_table needs a GPU to run; its two stages must at least be commands the benchmark accepts.
  for name, extra in benchmark.GPU_TABLE.items():
    args = benchmark.parse_args(extra + ['--json', f'runs/gpu/{name}.json'])
    assert set(args.configs) <= set(benchmark.PAPER_CONFIGS) and args.json.endswith(f'{name}.json')
