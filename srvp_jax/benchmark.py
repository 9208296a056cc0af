"""Speed benchmark: ``python -m srvp_jax.benchmark [--configs smmnist,bair] [--batch 16] [--torch] ...``.

Measurement only: nothing here asserts a time. TensorFlow is never imported (directly or through the
data pipelines: videos are random arrays), so the tool runs on a GPU machine without TensorFlow.

What is measured, for each paper config (``configs/<name>.py``) and compute dtype:

* **Training step** (``time_train_step``): the real step of ``srvp_jax.train`` (model, Adam with the
  official schedule, ``make_train_step``, ``jit_train_step`` on the data mesh, donated state) on random
  uniform videos (B, seq_len, 64, 64, nc). Compilation is timed on its own (``jitted.lower(...).compile()``),
  then the compiled step runs ``warmup`` times and ``steps`` timed times, each ended by
  ``jax.block_until_ready``; the row reports the median step time, videos/s = batch / median, the first
  execution, the peak memory (on accelerators the device's ``peak_bytes_in_use``, on CPU the process's
  peak resident set ``ru_maxrss``; both are process-wide maxima so far), the program's own memory
  (``compiled.memory_analysis()``: arguments + outputs + temporaries - aliased), the FLOPs of one step
  (XLA's ``cost_analysis``, per device), the achieved TFLOP/s and, on GPUs of known peak
  (``PEAK_FLOPS``), the model FLOPs utilisation. XLA's cost analysis counts a loop body once, so the
  per-frame LSTM / MLP scans are undercounted; they are well under 1% of a step's FLOPs (convolutions
  dominate), so TFLOP/s and MFU are slightly low, never high. A "donated buffers were not usable"
  warning, if any, is recorded in the row, and so are the ``precision`` and the scan unrolling
  (``scan_unroll``, the config's or the backend's) that ran; ``--scan_unroll 1,full`` times both side by side.
* **PyTorch baseline** (``time_torch_train_step``, ``--torch``, float32 rows): the official step in
  PyTorch (``srvp_jax.torch_srvp.make_train_step``: forward, loss, backward, Adam) at the same config and
  batch, on CUDA when torch has it, with the same warm-up / timed steps and median; the row gets
  ``torch_s`` and ``ratio`` = torch_s / ours (> 1: we are faster).
* **Evaluation** (``time_evaluation``, ``--eval``): ``srvp_jax.evaluation.evaluate_videos`` (the paper's
  protocol: n samples per video, PSNR / SSIM, best / worst selection) on random uint8 test videos of the
  dataset's test length (``config.PAPER_TEST``), after a warm-up call that compiles its programs;
  predicted frames/s and the total time. A second row adds LPIPS with a randomly initialised AlexNet
  backbone (``evaluation.learned_metrics.LpipsOnFrames(None)``), which costs the same time as the real weights.
* **Layers** (``time_layers``, ``--layers``): the encoder (all B*T frames), the decoder (all B*T frames,
  with skips when the config has them), the dynamics (Euler rollout of T-1 frames with the prior p_z, as
  ``SRVP.integrate`` with no posterior) and the inference LSTM (T frames), each forward and
  forward+backward (gradient of the sum of every output w.r.t. parameters and inputs), BatchNorm in
  training mode; ours are jitted functions of the nnx model (``nnx.split`` / ``nnx.merge``), and with
  ``--torch`` the same layers of ``TorchSRVP`` at the same shapes are timed beside them.

Host contention: CPU timings are only meaningful on an otherwise idle host (torch's OpenMP threads
spin-wait and suffer most when other processes take cores). Every timed loop therefore also records the
cores other processes kept busy meanwhile (``host_other_cores``, from Linux's /proc/stat minus this
process's CPU time), and a row says so in its note when that exceeds ``BUSY_CORES``.

Output: a table on stdout (header: device, JAX / torch versions, threads, date), progress lines on
stderr, and with ``--json FILE`` ``{'device', 'jax', 'torch', 'date', ..., 'rows': [...]}``. Bad arguments
are one ``error: ...`` line and exit status 2; a measurement that fails (e.g. out of memory) is recorded
in its row and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib.util
import json
import math
import os
import resource
import statistics
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from srvp_jax import cli
from srvp_jax import config as config_lib
from srvp_jax import evaluation, gpu_check, import_order, sharding
from srvp_jax.evaluation import learned_metrics, report, sampling
from srvp_jax.model import backend, build_model, conv, layers, onednn
from srvp_jax.model.onednn import ops
from srvp_jax.train import step as train_step

if TYPE_CHECKING:
  import torch

PAPER_CONFIGS = ('smmnist', 'mmnist_deterministic', 'kth', 'human', 'bair')
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
DTYPES = ('float32', 'bfloat16')
# Dense peak FLOP/s per device: (device_kind substring, bfloat16, TF32 tensor cores, true float32). The
# float32 peak is the one of the config's ``precision``: 'float32' (Precision.HIGHEST: CUDA cores) or
# 'tensorfloat32' (XLA's default for float32 on these GPUs). Checked in order; None: unknown (no MFU).
PEAK_FLOPS: tuple[tuple[str, float | None, float | None, float | None], ...] = (
    ('H100 PCIe', 756e12, 378e12, 51.2e12),
    ('H100 NVL', None, None, None),
    ('H100', 989e12, 494e12, 67e12),
    ('H200', 989e12, 494e12, 67e12),
    ('A100', 312e12, 156e12, 19.5e12),
)
BUSY_CORES = 0.25  # Other processes' cores while timing above which rows say the host was busy.
MIN_LOAD_WINDOW_S = 1.0  # Shorter timings are not checked for other processes' load (tick resolution).
LPIPS_NOTE = 'LPIPS with a random AlexNet backbone (same cost as the real weights)'
EXAMPLE = ('example:\n  python -m srvp_jax.benchmark --configs smmnist,bair --batch 16 --dtypes float32,bfloat16 '
           '--torch --json runs/bench.json\n'
           'deviceless H100 compile (memory, FLOPs, kernels; needs the JAX CUDA plugin):\n'
           '  python -m srvp_jax.benchmark --target h100 --configs smmnist,bair --dtypes float32,bfloat16\n'
           'smoke test (tiny model):\n  python -m srvp_jax.benchmark --configs smmnist --batch 4 --steps 1 '
           '--override nf=8,nhx=16,ny=4,nz=4,nh_inf=16,nh_res=16,seq_len=6,nt_cond=2,nt_inf=2')


def _progress(message: str) -> None:
  print(f'[benchmark] {message}', file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Configs.
def load_config(name: str, *, batch: int | None = None, dtype: str = 'float32', precision: str | None = None,
                overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """A paper config (name in PAPER_CONFIGS, or a path to a config file with get_config()) as an unlocked
  ConfigDict, with ``batch_size`` (when given), ``compute_dtype`` and ``overrides`` applied and validated.

  Raises cli.UsageError for an unknown name and ``config.ConfigError`` for invalid values.
  """
  if name in PAPER_CONFIGS:
    path = os.path.join(CONFIG_DIR, f'{name}.py')
  elif name.endswith('.py') and os.path.isfile(name):
    path = name
  else:
    raise cli.UsageError(f'unknown config {name!r}; valid: {", ".join(PAPER_CONFIGS)} (or a path to a config file)')
  if not os.path.isfile(path):
    raise cli.UsageError(f'config file {path} not found (the benchmark runs from a checkout with configs/)')
  stem = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'_srvp_benchmark_config_{stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  values = module.get_config().to_dict()
  values.update(overrides or {})
  if batch is not None:
    values['batch_size'] = int(batch)
  values['compute_dtype'] = dtype
  if precision is not None:
    values['precision'] = precision
  return config_lib.with_overrides(**values)


def eval_dataset(cfg: Mapping[str, Any]) -> str:
  """The evaluation protocol's dataset key ('mmnist' for deterministic Moving MNIST)."""
  if cfg['dataset'] == 'mmnist' or (cfg['dataset'] == 'smmnist' and cfg['deterministic']):
    return 'mmnist'
  return str(cfg['dataset'])


# ------------------------------------------------------------------------------------------------
# Device facts.
def device_info() -> dict[str, Any]:
  """The first device's kind and platform, the device count, the software versions and the date."""
  dev = jax.devices()[0]
  info = {'device': dev.device_kind, 'platform': dev.platform, 'n_devices': jax.device_count(),
          'jax': jax.__version__, 'cpu_count': os.cpu_count(),
          'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}
  if 'torch' in sys.modules:
    torch = sys.modules['torch']
    info['torch'] = torch.__version__
    info['torch_threads'] = torch.get_num_threads()
    info['torch_device'] = 'cuda' if torch.cuda.is_available() else 'cpu'
  else:
    info['torch'] = None
  return info


def peak_flops(device_kind: str, dtype: str, precision: str = 'float32') -> float | None:
  """Dense peak FLOP/s of one device of that kind for the compute dtype and precision, or None when unknown."""
  for name, bf16, tf32, f32 in PEAK_FLOPS:
    if name in device_kind:
      return bf16 if dtype == 'bfloat16' else tf32 if precision == 'tensorfloat32' else f32
  return None


def peak_memory() -> tuple[int | None, str]:
  """(bytes, what): the device's peak bytes in use, or on CPU the process's peak resident set."""
  stats = sampling.memory_stats(jax.devices()[0])
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device peak_bytes_in_use (process so far)'
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, 'host peak RSS (process so far)'


def _cost_flops(compiled: Any) -> float | None:
  """FLOPs of a compiled program from XLA's cost analysis (a dict, or a list of dicts on older JAX)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None  # Some backends do not implement it; FLOPs are then not reported.
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  flops = float(cost['flops'])
  return flops if flops > 0 else None


def _program_bytes(compiled: Any) -> int | None:
  """Arguments + outputs + temporaries - aliased bytes of a compiled program, when the backend says."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


# ------------------------------------------------------------------------------------------------
# Timing helpers.
def _cpu_snapshot() -> tuple[float, float, float] | None:
  """(wall s, busy CPU s of the whole host, CPU s of this process), or None without Linux's /proc/stat."""
  try:
    with open('/proc/stat', encoding='ascii') as f:
      ticks = [float(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError):
    return None
  return time.perf_counter(), busy, time.process_time()


def _other_cores(start: tuple[float, float, float] | None, end: tuple[float, float, float] | None) -> float | None:
  """Cores kept busy by OTHER processes between two snapshots (host contention that distorts CPU timings).

  None when unknown or when the window is too short for /proc/stat's clock ticks (``MIN_LOAD_WINDOW_S``).
  """
  if start is None or end is None or end[0] - start[0] < MIN_LOAD_WINDOW_S:
    return None
  return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0]))


def _busy_note(ours: float | None, theirs: float | None = None) -> list[str]:
  """A note when other processes took a noticeable share of the host while timing ours / torch (else empty)."""
  if max(ours or 0.0, theirs or 0.0) < BUSY_CORES:
    return []
  text = f'host busy: other processes used {_fmt(ours, ".1f")} cores while timing ours'
  return [text + (f', {_fmt(theirs, ".1f")} while timing torch' if theirs is not None else '')]


def _time_calls(fn: Callable[[], Any], warmup: int, steps: int) -> tuple[list[float], float | None]:
  """Runs ``fn`` warmup times, then times ``steps`` calls (``fn`` must wait for its own results).

  Returns the times and the cores other processes used meanwhile (None where unknown).
  """
  for _ in range(warmup):
    fn()
  times = []
  start = _cpu_snapshot()
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times, _other_cores(start, _cpu_snapshot())


def _torch_setup(threads: int | None, seed: int) -> torch.device:
  """torch's device (CUDA when available), with the official training's settings.

  Sets the intra-op threads when given, the seed and, on CUDA, ``cudnn.benchmark = True`` as the official
  ``train.py`` does (the autotuning happens in the warm-up steps).
  """
  torch = import_order.import_torch()
  if threads:
    torch.set_num_threads(int(threads))
  torch.manual_seed(seed)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  if device.type == 'cuda':
    torch.backends.cudnn.benchmark = True
  return device


def _torch_sync(device: torch.device) -> None:
  torch = import_order.import_torch()
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def _is_donation_warning(w: warnings.WarningMessage) -> bool:
  return 'donated buffers were not usable' in str(w.message)


def _rewarn(caught: Sequence[warnings.WarningMessage]) -> list[str]:
  """Re-issues the caught warnings except donation ones, which are returned (for the row)."""
  donation = []
  for w in caught:
    if _is_donation_warning(w):
      donation.append(str(w.message).splitlines()[0][:300])
    else:
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
  return donation


# ------------------------------------------------------------------------------------------------
# Training step.
def time_train_step(cfg: ml_collections.ConfigDict, *, warmup: int = 2, steps: int = 5, seed: int = 0,
                    label: str | None = None) -> dict:
  """Times the real training step of ``srvp_jax.train`` at ``cfg`` (batch_size, compute_dtype, ...).

  Returns a row: median_s / min_s of ``steps`` timed steps after ``warmup``, videos_per_s = batch /
  median_s, compile_s (lower + compile), first_step_s, peak memory, program_bytes, flops (per device per
  step), tflops_per_s (all devices), mfu (None when the device's peak is unknown) and the donation
  warnings seen (``warnings``, empty when none).
  """


  batch, nt, nc = int(cfg.batch_size), int(cfg.seq_len), int(cfg.nc)
  mesh = sharding.make_mesh(cfg)
  sharding.check_batch_divisible(batch, mesh)
  n_dev = int(mesh.devices.size)
  model = build_model(cfg, jax.random.key(seed))
  tx = train_step.make_optimizer(cfg)
  graphdef, state = train_step.init_state(model, tx)
  del model
  state = jax.device_put(state, sharding.replicated(mesh))
  key = jax.device_put(jax.random.key(seed + 1), sharding.replicated(mesh))
  videos = np.random.default_rng(seed).uniform(size=(batch, nt, 64, 64, nc)).astype(np.float32)
  x = sharding.shard_local_batch(videos, mesh)
  jitted = train_step.jit_train_step(train_step.make_train_step(graphdef, cfg, tx), mesh)

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    t0 = time.perf_counter()
    lowered = jitted.lower(state, x, key)
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, metrics = compiled(state, x, key)
    jax.block_until_ready((state, metrics))
    first_step_s = time.perf_counter() - t0
    holder = {'state': state}

    def one_step():
      new_state, new_metrics = compiled(holder['state'], x, key)
      holder['state'] = new_state  # The state is donated: thread it through.
      jax.block_until_ready((new_state, new_metrics))

    times, others = _time_calls(one_step, warmup, steps)
  donation = _rewarn(caught)
  loss = float(jax.device_get(metrics['loss']))
  median = statistics.median(times)
  flops = _cost_flops(compiled)
  dev_kind = jax.devices()[0].device_kind
  peak = peak_flops(dev_kind, cfg.compute_dtype, cfg.precision) if jax.default_backend() == 'gpu' else None
  mem, mem_kind = peak_memory()
  row = {
      'kind': 'train', 'config': label or str(cfg.dataset), 'dtype': str(cfg.compute_dtype),
      'precision': str(cfg.precision), 'scan_unroll': scan_unroll(cfg), 'batch': batch, 'seq_len': nt,
      'devices': n_dev, 'warmup': warmup, 'steps': steps, 'median_s': median,
      'min_s': min(times), 'times_s': times, 'videos_per_s': batch / median, 'lower_s': t_lower,
      'compile_s': compile_s, 'first_step_s': first_step_s, 'peak_memory_bytes': mem, 'peak_memory_kind': mem_kind,
      'program_bytes': _program_bytes(compiled), 'flops': flops,
      'tflops_per_s': flops * n_dev / median / 1e12 if flops else None,
      'peak_flops': peak, 'mfu': flops / median / peak if flops and peak else None,
      'first_loss': loss, 'warnings': donation, 'host_other_cores': others,
      'note': '; '.join(donation + _busy_note(others)),
  }
  del holder, state, compiled, jitted
  gc.collect()
  return row


def time_torch_train_step(cfg: ml_collections.ConfigDict, *, warmup: int = 2, steps: int = 5, seed: int = 0,
                          threads: int | None = None) -> dict:
  """Times the official PyTorch training step (``torch_srvp.make_train_step``) at ``cfg`` in float32.

  On CUDA when torch has it (synchronised after each step). Returns torch_s (median), torch_min_s,
  torch_times_s, torch_device, torch_threads and, on CUDA, torch_peak_memory_bytes.
  """
  torch = import_order.import_torch()
  from srvp_jax import torch_srvp  # pylint: disable=import-outside-toplevel  # It imports torch (import_order).
  device = _torch_setup(threads, seed)
  model = torch_srvp.TorchSRVP(cfg).to(device)
  step = torch_srvp.make_train_step(model, cfg)
  batch, nt, nc = int(cfg.batch_size), int(cfg.seq_len), int(cfg.nc)
  videos = np.random.default_rng(seed).uniform(size=(nt, batch, nc, 64, 64)).astype(np.float32)
  x = torch.from_numpy(videos).to(device)
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)

  def one_step():
    step(x)  # Returns loss.item(): already a synchronisation point.
    _torch_sync(device)

  times, others = _time_calls(one_step, warmup, steps)
  out = {'torch_s': statistics.median(times), 'torch_min_s': min(times), 'torch_times_s': times,
         'torch_device': str(device), 'torch_threads': torch.get_num_threads(), 'torch_host_other_cores': others}
  if device.type == 'cuda':
    out['torch_peak_memory_bytes'] = int(torch.cuda.max_memory_allocated(device))
    out['torch_cudnn_benchmark'] = bool(torch.backends.cudnn.benchmark)
    out['torch_tf32'] = {'cudnn': bool(torch.backends.cudnn.allow_tf32),
                         'matmul': bool(torch.backends.cuda.matmul.allow_tf32)}
  del model, step, x
  gc.collect()
  if device.type == 'cuda':
    torch.cuda.empty_cache()
  return out


# ------------------------------------------------------------------------------------------------
# Evaluation protocol.
WARMUP_SAMPLES = 2  # Samples of the evaluation's warm-up call (compilation); the timed call runs them all.


def time_evaluation(cfg: ml_collections.ConfigDict, *, n_videos: int, n_samples: int | None = None,
                    with_lpips: bool = False, model: Any = None, nt_gen: int | None = None, seed: int = 0,
                    label: str | None = None) -> dict:
  """Throughput of ``evaluation.evaluate_videos`` (the paper's protocol) on random uint8 test videos.

  ``nt_gen`` defaults to the dataset's test length and ``n_samples`` to the paper's samples per video
  (100; 1 for deterministic Moving MNIST). A warm-up call of ``WARMUP_SAMPLES`` samples on the first batch
  compiles the programs (warmup_s: what a fresh process pays once more than total_s); the timed call then
  predicts every sample of every video. Returns a row
  with frames_per_s (the steady rate after the first batch when there are several batches, else the
  overall rate), total_s, warmup_s, the protocol's settings and the peak memory.
  """

  dataset = eval_dataset(cfg)
  nt_gen = int(nt_gen or config_lib.PAPER_TEST[dataset]['nt_gen'])
  n_samples = int(n_samples or config_lib.PAPER_TEST[dataset]['n_samples'])
  nt_cond, n_euler = int(cfg.nt_cond), int(cfg.n_euler_steps)
  nt_pred = nt_gen - nt_cond
  batch = min(int(cfg.batch_size_test), int(n_videos))
  metrics = ('psnr', 'ssim', 'lpips') if with_lpips else ('psnr', 'ssim')
  if model is None:
    model = build_model(cfg, jax.random.key(seed))
  lpips_fn = learned_metrics.LpipsOnFrames(None) if with_lpips else None
  videos = np.random.default_rng(seed).integers(0, 256, size=(n_videos, nt_gen, 64, 64, int(cfg.nc)), dtype=np.uint8)
  run = functools.partial(evaluation.evaluate_videos, model, nt_cond=nt_cond, n_euler_steps=n_euler,
                          batch_size=batch, seed=0, metrics=metrics, lpips_fn=lpips_fn, progress=False)
  t0 = time.perf_counter()
  run(videos[:batch], n_samples=min(n_samples, WARMUP_SAMPLES))  # Compiles; sizes the chunks like the timed call.
  warmup_s = time.perf_counter() - t0
  start = _cpu_snapshot()
  t0 = time.perf_counter()
  res = run(videos, n_samples=n_samples)
  total_s = time.perf_counter() - t0
  others = _other_cores(start, _cpu_snapshot())
  chunk = res['sample_chunk']
  steady = res['steady_frames_per_s']
  fps = steady if steady is not None else res['predicted_frames'] / res['sampling_time_s']
  mem, mem_kind = peak_memory()
  row = {
      'kind': 'eval', 'config': label or str(cfg.dataset), 'dtype': str(cfg.compute_dtype),
      'precision': str(cfg.precision), 'scan_unroll': scan_unroll(cfg), 'batch': batch, 'metrics': list(metrics),
      'n_videos': int(n_videos), 'n_samples': n_samples, 'nt_cond': nt_cond, 'nt_gen': nt_gen,
      'n_euler_steps': n_euler, 'sample_chunk': chunk, 'predicted_frames': res['predicted_frames'],
      'frames_per_s': fps, 'frames_per_s_overall': res['predicted_frames'] / res['sampling_time_s'],
      'steady_rate': steady is not None, 'sampling_time_s': res['sampling_time_s'], 'total_s': total_s,
      'warmup_s': warmup_s, 'peak_memory_bytes': mem, 'peak_memory_kind': mem_kind, 'host_other_cores': others,
      'note': '; '.join([f'{n_videos} videos x {n_samples} samples x {nt_pred} frames',
                         f'warm-up (compile) {warmup_s:.1f} s', *([LPIPS_NOTE] if with_lpips else []),
                         *_busy_note(others)]),
  }
  del res, lpips_fn
  gc.collect()
  return row


def _torch_ssim(pred: 'torch.Tensor', target: 'torch.Tensor') -> 'torch.Tensor':
  """SSIM per frame of (N, C, H, W) tensors in [0, 1]: 11x11 Gaussian window (sigma 1.5), valid, k1 .01, k2 .03."""
  torch = import_order.import_torch()
  F = torch.nn.functional
  taps = torch.arange(11, dtype=torch.float32, device=pred.device) - 5
  g = torch.exp(-taps ** 2 / (2 * 1.5 ** 2))
  g = g / g.sum()
  n_c = pred.shape[1]
  window = (g[:, None] * g[None, :]).expand(n_c, 1, 11, 11).contiguous()
  blur = lambda a: F.conv2d(a, window, groups=n_c)
  mu_p, mu_t = blur(pred), blur(target)
  var_p, var_t = blur(pred * pred) - mu_p ** 2, blur(target * target) - mu_t ** 2
  cov = blur(pred * target) - mu_p * mu_t
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  ssim_map = (2 * mu_p * mu_t + c1) * (2 * cov + c2) / ((mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2))
  return ssim_map.mean(dim=(1, 2, 3))


def time_test_py(cfg: ml_collections.ConfigDict, *, n_videos: int, n_samples: int | None = None,
                 lpips_model: Any = None, seed: int = 0, threads: int | None = None) -> dict:
  """The official ``test.py`` algorithm in PyTorch on the same work as ``time_evaluation``.

  For each batch of test videos and each sample, as ``test.py`` does: the inference pass over the
  conditioning frames and the prior rollout (``TorchSRVP.predict``: nt_cond + nt_pred decoded frames), then
  that sample's PSNR, SSIM and, with ``lpips_model`` (the torch module of ``lpips_bridge.LPIPS``), LPIPS of
  its predicted frames; best / worst per video kept as it goes. Random uint8 videos as ``time_evaluation``
  (same seed). Returns test_py_s (total), its per-sample median and the device.
  """
  torch = import_order.import_torch()
  from srvp_jax import torch_srvp  # pylint: disable=import-outside-toplevel  # It imports torch (import_order).
  device = _torch_setup(threads, seed)
  dataset = eval_dataset(cfg)
  nt_gen = int(config_lib.PAPER_TEST[dataset]['nt_gen'])
  n_samples = int(n_samples or config_lib.PAPER_TEST[dataset]['n_samples'])
  nt_cond, n_euler = int(cfg.nt_cond), int(cfg.n_euler_steps)
  nt_pred = nt_gen - nt_cond
  batch = min(int(cfg.batch_size_test), int(n_videos))
  model = torch_srvp.TorchSRVP(cfg).to(device).eval()
  videos = np.random.default_rng(seed).integers(0, 256, size=(n_videos, nt_gen, 64, 64, int(cfg.nc)), dtype=np.uint8)
  ny, nz = int(cfg.ny), int(cfg.nz)
  per_sample = []
  start = _cpu_snapshot()
  t0 = time.perf_counter()
  with torch.no_grad():
    for lo in range(0, n_videos, batch):
      x = torch.from_numpy(videos[lo:lo + batch]).to(device).permute(1, 0, 4, 2, 3).float() / 255
      n = x.shape[1]
      x_cond, target = x[:nt_cond], x[nt_cond:].reshape(nt_pred * n, *x.shape[2:])
      best = {'psnr': torch.full((n,), -math.inf), 'ssim': torch.full((n,), -math.inf),
              'lpips': torch.full((n,), math.inf)}
      for _ in range(n_samples):
        s0 = time.perf_counter()
        pred = model.predict(x_cond, torch.randn(n, ny, device=device), torch.randn(nt_cond - 1, n, nz, device=device),
                             torch.randn(nt_pred, n, nz, device=device), nt_pred, n_euler).x_pred
        pred = pred.reshape(nt_pred * n, *pred.shape[2:])
        mse = ((pred - target) ** 2).mean(dim=(2, 3))
        scores = {'psnr': (10 * torch.log10(1 / mse)).mean(1), 'ssim': _torch_ssim(pred, target)}
        if lpips_model is not None:
          rgb = lambda a: (a.expand(-1, 3, -1, -1) if a.shape[1] == 1 else a) * 2 - 1
          scores['lpips'] = lpips_model(rgb(target), rgb(pred)).reshape(-1)
        for name, values in scores.items():
          per_video = values.reshape(nt_pred, n).mean(0).cpu()
          best[name] = torch.minimum(best[name], per_video) if name == 'lpips' else torch.maximum(best[name], per_video)
        per_sample.append(time.perf_counter() - s0)
  total = time.perf_counter() - t0
  others = _other_cores(start, _cpu_snapshot())
  del model
  gc.collect()
  return {'test_py_s': total, 'test_py_sample_s': statistics.median(per_sample), 'torch_device': str(device),
          'torch_threads': torch.get_num_threads(), 'torch_host_other_cores': others}


# ------------------------------------------------------------------------------------------------
# Layers.
LAYERS = ('encoder', 'decoder', 'dynamics', 'lstm')
MODES = ('fwd', 'fwd+bwd')


def _sum_outputs(tree: Any) -> Any:
  return sum(jnp.sum(a.astype(jnp.float32)) for a in jax.tree.leaves(tree))


def _jax_layer_fns(model: Any, layer: str, cfg: ml_collections.ConfigDict) -> tuple[Callable, Callable, Any, Any]:
  """(fwd, fwd_bwd, params, rest) of one layer: pure jitted functions ``(params, rest, *inputs)``.

  ``params`` are the layer's parameters (differentiated), ``rest`` every other variable. ``fwd`` returns
  the outputs and the layer's updated BatchNorm statistics; ``fwd_bwd`` the gradients w.r.t. parameters
  and inputs of the sum of every output, and the statistics.
  """
  n_euler = int(cfg.n_euler_steps)
  paths = {'encoder': ('encoder',), 'decoder': ('decoder',), 'dynamics': ('p_z', 'dynamics'),
           'lstm': ('inf_z',)}[layer]
  where = nnx.Any(*(nnx.PathContains(p) for p in paths))
  apply = {
      'encoder': lambda m, x: m.encoder(x, True),
      'decoder': lambda m, v, skips: m.decoder(v, skips, True),
      'dynamics': lambda m, y0, eps: m.integrate(y0, eps, n_euler),
      'lstm': lambda m, hx: m.inf_z(hx),
  }[layer]
  graphdef, params, rest = nnx.split(model, nnx.All(nnx.Param, where), ...)
  stats_filter = nnx.All(nnx.BatchStat, where)

  def fwd(params, rest, *inputs):
    m = nnx.merge(graphdef, params, rest, copy=True)
    out = apply(m, *inputs)
    return out, nnx.state(m, stats_filter)

  def loss(params, inputs, rest):
    m = nnx.merge(graphdef, params, rest, copy=True)
    return _sum_outputs(apply(m, *inputs)), nnx.state(m, stats_filter)

  grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
  return jax.jit(fwd), jax.jit(lambda params, rest, *inputs: grad(params, inputs, rest)), params, rest


def _torch_layer_fns(tmodel: Any, layer: str, cfg: ml_collections.ConfigDict, inputs: Sequence[Any],
                     device: torch.device) -> tuple[Callable, Callable]:
  """(fwd, fwd_bwd) closures timing one layer of TorchSRVP (training mode, synchronised)."""
  torch = import_order.import_torch()
  n_euler = int(cfg.n_euler_steps)

  def apply(*xs):
    if layer == 'encoder':
      hx, skips = tmodel.encoder(xs[0])
      return [hx, *skips]
    if layer == 'decoder':
      return [tmodel.decoder(xs[0], list(xs[1:]) if len(xs) > 1 else None)]
    if layer == 'dynamics':
      y0, eps = xs
      y, z, _, p, res = tmodel.generate(y0, None, eps, eps.shape[0] + 1, n_euler)
      return [y[1:], z, p, res]
    return [tmodel.inf_z(xs[0])[0]]

  def fwd():
    with torch.no_grad():
      apply(*inputs)
    _torch_sync(device)

  leaves = [t.detach().clone().requires_grad_(True) for t in inputs]

  def fwd_bwd():
    tmodel.zero_grad(set_to_none=True)
    for t in leaves:
      t.grad = None
    total = sum(o.sum() for o in apply(*leaves))
    total.backward()
    _torch_sync(device)

  return fwd, fwd_bwd


def _layer_inputs(layer: str, data: Mapping[str, np.ndarray], skips: Sequence[np.ndarray] | None
                  ) -> tuple[tuple[Any, ...], list[np.ndarray]]:
  """A layer's inputs in our layout (batch-major, NHWC) and the same values in TorchSRVP's (time-major, NCHW)."""
  nchw = lambda a: a.transpose(0, 3, 1, 2)
  if layer == 'encoder':
    return (data['frames'],), [nchw(data['frames'])]
  if layer == 'decoder':
    return (data['v'], list(skips) if skips is not None else None), [data['v'], *(nchw(s) for s in skips or [])]
  if layer == 'dynamics':
    return (data['y0'], data['eps']), [data['y0'], data['eps'].transpose(1, 0, 2)]
  return (data['hx'],), [data['hx'].transpose(1, 0, 2)]


def time_layers(cfg: ml_collections.ConfigDict, *, warmup: int = 2, steps: int = 5, with_torch: bool = False,
                seed: int = 0, threads: int | None = None, label: str | None = None) -> list[dict]:
  """Per-layer rows (encoder, decoder, dynamics, lstm) x (fwd, fwd+bwd) at the config's batch.

  Shapes: encoder x (B*T, 64, 64, nc); decoder v (B*T, nh_inf + ny) and, with skip connections, the
  encoder's skips of those frames; dynamics y0 (B, ny) and noise (B, T-1, nz) (prior, n_euler_steps);
  LSTM encodings (B, T, nhx). Both frameworks get the same input values. Each row has median_s,
  compile_s and, with ``with_torch`` (float32 rows only), torch_s and ratio = torch_s / median_s for the
  same layer of TorchSRVP.
  """

  b, nt, nc = int(cfg.batch_size), int(cfg.seq_len), int(cfg.nc)
  n = b * nt
  skipco = bool(cfg.skipco)
  rng = np.random.default_rng(seed)
  data = {'frames': rng.uniform(size=(n, 64, 64, nc)), 'v': rng.standard_normal((n, int(cfg.nh_inf) + int(cfg.ny))),
          'y0': rng.standard_normal((b, int(cfg.ny))), 'eps': rng.standard_normal((b, nt - 1, int(cfg.nz))),
          'hx': rng.uniform(-1, 1, size=(b, nt, int(cfg.nhx)))}
  data = {k: np.ascontiguousarray(a, np.float32) for k, a in data.items()}
  shapes = {'encoder': f'{n} frames', 'decoder': f'{n} frames' + (' + skips' if skipco else ''),
            'dynamics': f'B={b}, {nt - 1} frames x {cfg.n_euler_steps} Euler steps', 'lstm': f'B={b}, {nt} frames'}
  model = build_model(cfg, jax.random.key(seed))
  tmodel, to_torch, device = None, None, None
  if with_torch and cfg.compute_dtype == 'float32':
    torch = import_order.import_torch()
    from srvp_jax import torch_srvp  # pylint: disable=import-outside-toplevel  # It imports torch (import_order).
    device = _torch_setup(threads, seed)
    tmodel = torch_srvp.TorchSRVP(cfg).to(device).train()
    to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)

  skips = None  # The encoder's skip outputs (host arrays), inputs of the decoder when skipco.
  rows = []
  for layer in LAYERS:
    fwd, fwd_bwd, params, rest = _jax_layer_fns(model, layer, cfg)
    ours, theirs = _layer_inputs(layer, data, skips if skipco else None)
    inputs = jax.device_put(ours)
    torch_fns = None
    if tmodel is not None:
      torch_fns = _torch_layer_fns(tmodel, layer, cfg, [to_torch(a) for a in theirs], device)
    for mode, jitted in zip(MODES, (fwd, fwd_bwd)):
      _progress(f'layer {label or cfg.dataset} {cfg.compute_dtype} {layer} {mode}')
      t0 = time.perf_counter()
      compiled = jitted.lower(params, rest, *inputs).compile()
      compile_s = time.perf_counter() - t0
      result = {}

      def call():
        result['out'] = compiled(params, rest, *inputs)  # pylint: disable=cell-var-from-loop
        jax.block_until_ready(result['out'])

      times, others = _time_calls(call, warmup, steps)
      if layer == 'encoder' and mode == 'fwd':
        skips = [np.asarray(s, np.float32) for s in result['out'][0][1]]
      median = statistics.median(times)
      row = {'kind': 'layer', 'config': label or str(cfg.dataset), 'dtype': str(cfg.compute_dtype), 'batch': b,
             'layer': layer, 'mode': mode, 'shape': shapes[layer], 'warmup': warmup, 'steps': steps,
             'median_s': median, 'min_s': min(times), 'compile_s': compile_s, 'flops': _cost_flops(compiled),
             'host_other_cores': others, 'note': '; '.join([shapes[layer], *_busy_note(others)])}
      if torch_fns is not None:
        t_times, t_others = _time_calls(torch_fns[MODES.index(mode)], warmup, steps)
        row.update(torch_s=statistics.median(t_times), torch_min_s=min(t_times), torch_device=str(device),
                   ratio=statistics.median(t_times) / median, torch_host_other_cores=t_others,
                   note='; '.join([shapes[layer], *_busy_note(others, t_others)]))
      rows.append(row)
  del model, tmodel
  gc.collect()
  return rows


# ------------------------------------------------------------------------------------------------
# Convolutions, per pass (oneDNN vs XLA vs PyTorch).
CONV_PASSES = ('fwd', 'input grad', 'kernel grad')


def conv_shapes(cfg: ml_collections.ConfigDict) -> list[tuple[bool, int, int, int, int, int, int]]:
  """(transposed, input size, n_in, n_out, kernel, stride, padding) of the convolutions of the config's encoder
  and decoder that the model routes through ``srvp_jax.model.onednn`` (recorded while tracing them)."""

  seen: dict[tuple, None] = {}

  def recorder(transpose):
    def record(x, w, stride, padding, *args, **kwargs):
      del args, kwargs
      k = w.shape[0]
      seen[(transpose, x.shape[-3], w.shape[2], w.shape[3], k, stride, padding)] = None
      size = x.shape[-3]
      size = (size - 1) * stride - 2 * padding + k if transpose else (size + 2 * padding - k) // stride + 1
      return jnp.zeros((*x.shape[:-3], size, size, w.shape[3]), x.dtype)
    return record

  saved = onednn.conv2d, onednn.conv_transpose2d, os.environ.get(onednn.ENV)
  onednn.conv2d, onednn.conv_transpose2d = recorder(False), recorder(True)
  os.environ[onednn.ENV] = '1'
  try:
    enc = nnx.eval_shape(lambda: conv.Encoder(cfg.archi, cfg.nc, cfg.nhx, cfg.nf, rngs=nnx.Rngs(0)))
    n_v = int(cfg.nh_inf) + int(cfg.ny)
    dec = nnx.eval_shape(lambda: conv.Decoder(cfg.archi, cfg.nc, n_v, cfg.nf, cfg.skipco, rngs=nnx.Rngs(0)))
    (enc_def, enc_state), (dec_def, dec_state) = nnx.split(enc), nnx.split(dec)

    def run(frames, enc_state, dec_state):
      _, skips = nnx.merge(enc_def, enc_state)(frames, True)
      return nnx.merge(dec_def, dec_state)(jnp.zeros((frames.shape[0], n_v)), skips, True)

    jax.eval_shape(run, jax.ShapeDtypeStruct((1, 64, 64, int(cfg.nc)), jnp.float32), enc_state, dec_state)
  finally:
    onednn.conv2d, onednn.conv_transpose2d = saved[:2]
    if saved[2] is None:
      os.environ.pop(onednn.ENV, None)
    else:
      os.environ[onednn.ENV] = saved[2]
  return list(seen)


def time_convs(cfg: ml_collections.ConfigDict, *, warmup: int = 2, steps: int = 5, with_torch: bool = False,
               seed: int = 0, threads: int | None = None, label: str | None = None) -> list[dict]:
  """Each convolution of the model (``conv_shapes``) on B*T frames, each pass on its own: oneDNN (``median_s``),
  XLA's form of the layer (``xla_s``; transposed layers: ``ConvTranspose2d.xla_form``) and, with ``with_torch``,
  PyTorch's ``aten.convolution`` / ``convolution_backward`` on NCHW tensors (``torch_s``, ``ratio``)."""

  if not onednn.available():
    raise RuntimeError('oneDNN convolutions unavailable (apt-get install -y libdnnl-dev)')
  n = int(cfg.batch_size) * int(cfg.seq_len)
  rng = np.random.default_rng(seed)
  device = _torch_setup(threads, seed) if with_torch else None
  rows = []
  for transpose, size, n_in, n_out, k, s, p in conv_shapes(cfg):
    if transpose:
      layer = layers.ConvTranspose2d(n_in, n_out, k, s, p, dtype=jnp.float32, rngs=nnx.Rngs(0))
      xla = layer.xla_form
      out = (size - 1) * s - 2 * p + k
    else:
      xla = functools.partial(onednn.xla_conv2d, stride=s, padding=p)
      out = (size + 2 * p - k) // s + 1
    spec = ops.Spec(transpose, s, p, xla)
    x = jnp.asarray(rng.standard_normal((n, size, size, n_in)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, n_in, n_out)) * 0.05, jnp.float32)
    g = jnp.asarray(rng.standard_normal((n, out, out, n_out)), jnp.float32)
    xla_fns = (lambda x, w, g: xla(x, w),
               lambda x, w, g: jax.vjp(lambda x_: xla(x_, w), x)[1](g)[0],
               lambda x, w, g: jax.vjp(lambda w_: xla(x, w_), w)[1](g)[0])
    dnn_fns = (lambda x, w, g: ops._forward(spec, x, w),  # pylint: disable=protected-access
               lambda x, w, g: ops._input_grad(spec, x, w, g),  # pylint: disable=protected-access
               lambda x, w, g: ops._kernel_grad(spec, x, w, g))  # pylint: disable=protected-access
    name = f"{'deconv' if transpose else 'conv'} {size}x{size} {n_in}->{n_out} k{k}s{s}"
    torch_args = None
    if device is not None:
      torch = import_order.import_torch()
      t = lambda a, perm: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(perm))).to(device)
      tx, tg = t(x, (0, 3, 1, 2)), t(g, (0, 3, 1, 2))
      tw = t(w, (2, 3, 0, 1) if transpose else (3, 2, 0, 1))
      conv_args = ([s, s], [p, p], [1, 1], transpose, [0, 0], 1)
      torch_args = (
          lambda: torch.ops.aten.convolution(tx, tw, None, *conv_args),
          lambda: torch.ops.aten.convolution_backward(tg, tx, tw, None, *conv_args, [True, False, False]),
          lambda: torch.ops.aten.convolution_backward(tg, tx, tw, None, *conv_args, [False, True, False]))
    for i, pass_name in enumerate(CONV_PASSES):
      _progress(f'conv {label or cfg.dataset} {name} {pass_name}')
      medians = []
      for fn in (dnn_fns[i], xla_fns[i]):
        compiled = jax.jit(fn).lower(x, w, g).compile()
        times, others = _time_calls(lambda c=compiled: jax.block_until_ready(c(x, w, g)), warmup, steps)
        medians.append(statistics.median(times))
      row = {'kind': 'conv', 'config': label or str(cfg.dataset), 'dtype': 'float32', 'batch': n, 'layer': name,
             'mode': pass_name, 'median_s': medians[0], 'xla_s': medians[1], 'xla_over_onednn': medians[1] / medians[0],
             'host_other_cores': others,
             'note': '; '.join([f'XLA {medians[1]:.4f} s ({medians[1] / medians[0]:.2f}x oneDNN)',
                                *_busy_note(others)])}
      if torch_args is not None:
        with torch.no_grad():
          t_times, t_others = _time_calls(torch_args[i], warmup, steps)
        row.update(torch_s=statistics.median(t_times), ratio=statistics.median(t_times) / medians[0],
                   torch_host_other_cores=t_others)
      rows.append(row)
  gc.collect()
  return rows


# ------------------------------------------------------------------------------------------------
# Output.
def _fmt(value: float | None, spec: str) -> str:
  return '-' if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _gib(n: int | None) -> str:
  return '-' if n is None else f'{n / 2**30:.2f}'


def row_label(row: Mapping[str, Any]) -> str:
  """The measurement's name in the table."""
  if row['kind'] == 'train':
    return 'train step'
  if row['kind'] == 'eval':
    return 'eval ' + ','.join(row.get('metrics', []))
  return f"{row['layer']} {row['mode']}"


def format_table(rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any]) -> str:
  """The readable table: a header line, column names, one line per row."""
  torch_part = (f"torch {info['torch']} ({info['torch_device']}, {info['torch_threads']} threads)"
                if info.get('torch') else 'torch not used')
  load = f" (load {info['load_avg_1m_before']:.2f} before)" if info.get('load_avg_1m_before') is not None else ''
  header = (f"# {info['device']} x{info['n_devices']} ({info['platform']}) | jax {info['jax']} | {torch_part} | "
            f"{info['cpu_count']} CPUs{load} | {info['date']}")
  if info.get('overrides'):
    header += '\n# overrides: ' + ','.join(f'{k}={v}' for k, v in info['overrides'].items())
  cols = [('measurement', 24, '<'), ('config', 21, '<'), ('dtype', 8, '<'), ('batch', 5, '>'),
          ('seconds', 10, '>'), ('rate', 17, '>'), ('compile s', 9, '>'), ('peak GiB', 13, '>'),
          ('TFLOP/s', 8, '>'), ('MFU', 6, '>'), ('torch s', 9, '>'), ('torch/ours', 10, '>')]
  lines = [header, '  '.join(f'{name:{align}{width}}' for name, width, align in cols) + '  note']
  for r in rows:
    if r['kind'] == 'train':
      rate = f"{_fmt(r.get('videos_per_s'), '.2f')} videos/s"
    elif r['kind'] == 'eval':
      rate = f"{_fmt(r.get('frames_per_s'), '.1f')} frames/s"
    else:
      rate = '-'
    mem = '-'
    if r.get('peak_memory_bytes') is not None:
      mem = _gib(r['peak_memory_bytes']) + (' RSS' if 'RSS' in r.get('peak_memory_kind', '') else ' dev')
    median = r.get('median_s', r.get('total_s'))
    mfu = r.get('mfu')
    values = [row_label(r), str(r['config']), str(r['dtype']), str(r['batch']), _fmt(median, '.4f'), rate,
              _fmt(r.get('compile_s'), '.1f'), mem, _fmt(r.get('tflops_per_s'), '.2f'),
              '-' if mfu is None else f'{100 * mfu:.1f}%', _fmt(r.get('torch_s'), '.4f'),
              _fmt(r.get('ratio'), '.2f')]
    note = r.get('note', '')
    if r.get('error'):
      note = f"FAILED: {r['error']}"
    lines.append('  '.join(f'{v:{align}{width}}' for v, (_, width, align) in zip(values, cols)) + '  ' + note)
  lines.append('# seconds: median per step over the timed steps after warm-up (evaluation: the timed run\'s total); '
               'torch/ours > 1: ours faster; TFLOP/s and MFU from XLA\'s cost analysis (per-frame scans counted once)')
  return '\n'.join(lines)


def write_json(path: str, info: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
  """Writes {'device', 'jax', 'torch', 'date', ..., 'rows': [...]} (parent folders created)."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(report.jsonable({**info, 'rows': list(rows)}), f, indent=1)


# ------------------------------------------------------------------------------------------------
# Command line.
def _int_at_least(minimum: int) -> Callable[[str], int]:
  """An argparse type: an integer >= ``minimum``."""
  return cli.number(int, minimum, f'an integer >= {minimum}')


def _names(text: str) -> list[str]:
  names = list(dict.fromkeys(n.strip() for n in text.split(',') if n.strip()))
  if not names:
    raise argparse.ArgumentTypeError(f'empty list {text!r}')
  return names


def _dtypes(text: str) -> list[str]:
  names = _names(text)
  bad = [n for n in names if n not in DTYPES]
  if bad:
    raise argparse.ArgumentTypeError(f'unknown dtype(s) {bad}; valid: {", ".join(DTYPES)}')
  return names


def _onednn_modes(text: str) -> list[str]:
  modes = _names(text)
  bad = [m for m in modes if m not in ('0', '1', 'auto')]
  if bad:
    raise argparse.ArgumentTypeError(f'unknown --onednn setting(s) {bad}; valid: 0, 1, auto')
  return modes


def _unrolls(text: str) -> list[int | bool]:
  values = []
  for name in _names(text):
    if name != 'full' and not (name.isdigit() and int(name) >= 1):
      raise argparse.ArgumentTypeError(f'--scan_unroll {name!r}: expected integers >= 1 or full')
    values.append(True if name == 'full' else int(name))
  return values


def unroll_text(unroll: int | bool) -> str:
  """'full' for a fully unrolled scan, else the number of steps per loop iteration."""
  return 'full' if unroll is True else str(unroll)


def scan_unroll(cfg: Mapping[str, Any], platform: str | None = None) -> int | bool:
  """The scan unrolling a config's model runs with on ``platform`` (default: this process's backend)."""
  return cfg.get('scan_unroll', 0) or backend.SCAN_UNROLL[backend.normalize(platform or jax.default_backend())]


def parse_overrides(text: str) -> dict[str, Any]:
  """'k=v,k=v' -> {k: v} with each value parsed as the type of the key's default (unknown keys: errors)."""
  defaults = config_lib.default_config()
  out = {}
  for item in (s.strip() for s in text.split(',')):
    if not item:
      continue
    key, sep, raw = item.partition('=')
    key = key.strip()
    if not sep:
      raise argparse.ArgumentTypeError(f'override {item!r} is not KEY=VALUE')
    if key not in defaults:
      raise argparse.ArgumentTypeError(f'unknown config key {key!r} in --override')
    default = defaults[key]
    try:
      if isinstance(default, bool):
        if raw.lower() not in ('true', 'false', '1', '0'):
          raise ValueError(raw)
        value = raw.lower() in ('true', '1')
      elif isinstance(default, int):
        value = int(raw)
      elif isinstance(default, float):
        value = float(raw)
      else:
        value = raw
    except ValueError:
      raise argparse.ArgumentTypeError(f'{key}={raw!r}: expected a value of type {type(default).__name__}') from None
    out[key] = value
  return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """Command-line options; raises cli.UsageError on bad input."""
  p = cli.Parser(prog='python -m srvp_jax.benchmark', examples=EXAMPLE,
                 description='Times SRVP training steps (and optionally the evaluation protocol and single layers) '
                             'of the paper configs on random videos, with the official PyTorch code as baseline.')
  p.add_argument('--configs', type=_names, default=['smmnist', 'bair'], metavar='LIST',
                 help=f'Comma-separated paper configs among {",".join(PAPER_CONFIGS)} (or config file paths); '
                      'default: smmnist,bair.')
  p.add_argument('--batch', type=_int_at_least(1), default=None, help='Training batch (default: each config\'s paper batch).')
  p.add_argument('--dtypes', type=_dtypes, default=['float32'], metavar='LIST',
                 help='Compute dtypes among float32,bfloat16 (default: float32).')
  p.add_argument('--steps', type=_int_at_least(1), default=5, help='Timed steps (the median is reported; default 5).')
  p.add_argument('--warmup', type=_int_at_least(0), default=2, help='Untimed steps after compilation (default 2).')
  p.add_argument('--torch', action='store_true',
                 help='Also time the official PyTorch code (float32 rows; with --layers, its layers too).')
  p.add_argument('--layers', action='store_true', help='Per-layer breakdown (encoder, decoder, dynamics, LSTM).')
  p.add_argument('--convs', action='store_true',
                 help='Each convolution of the model, each pass: oneDNN vs XLA (vs PyTorch with --torch).')
  p.add_argument('--onednn', type=_onednn_modes, default=None, metavar='LIST',
                 help='SRVP_ONEDNN settings to measure side by side, e.g. 0,1 (default: the environment\'s).')
  p.add_argument('--eval', action='store_true', help='Evaluation-protocol throughput (PSNR/SSIM, then + LPIPS).')
  p.add_argument('--eval_videos', type=_int_at_least(1), default=None,
                 help='Test videos for --eval (default: 256 on accelerators, 4 on CPU).')
  p.add_argument('--eval_samples', type=_int_at_least(1), default=None,
                 help='Samples per test video for --eval (default: the paper\'s, 100; 1 for mmnist_deterministic).')
  p.add_argument('--threads', type=_int_at_least(1), default=None, help='torch.set_num_threads (default: torch\'s).')
  p.add_argument('--override', type=parse_overrides, default={}, metavar='KEY=VALUE,...',
                 help='Config values to override in every config (e.g. a tiny model for smoke tests).')
  p.add_argument('--scan_unroll', type=_unrolls, default=None, metavar='LIST',
                 help='Scan unrolling of the model (steps per loop iteration, or full) to measure side by side, e.g. '
                      '1,full (default: the backend\'s, 1 on CPUs, full on GPUs).')
  p.add_argument('--precision', default='float32', choices=config_lib.PRECISIONS,
                 help='float32 convolutions and matrix products: float32 (true float32, default) or tensorfloat32.')
  p.add_argument('--target', default=None, choices=sorted(gpu_check.TARGETS),
                 help='Compile (not run) the train step, validation and evaluation cores for this GPU, without one '
                      '(srvp_jax.gpu_check; needs the JAX CUDA plugin): memory, FLOPs and kernel census.')
  p.add_argument('--programs', type=_programs, default=list(gpu_check.PROGRAMS), metavar='LIST',
                 help=f'With --target: programs among {",".join(gpu_check.PROGRAMS)} (default: all).')
  p.add_argument('--json', default=None, metavar='FILE', help='Also write the rows as JSON (parent folders created).')
  p.add_argument('--gpu_table', default=None, metavar='DIR',
                 help='On a GPU machine: the whole GPU table of BENCHMARKS.md (every paper config at its paper batch, '
                      'float32 and bfloat16 beside PyTorch, then 256 BAIR test videos x 100 samples); rows in '
                      'DIR/{train,scan_unroll,eval_bair}.json. Other options are ignored.')
  return p.parse_args(argv)


def _programs(text: str) -> list[str]:
  names = _names(text)
  bad = [n for n in names if n not in gpu_check.PROGRAMS]
  if bad:
    raise argparse.ArgumentTypeError(f'unknown program(s) {bad}; valid: {", ".join(gpu_check.PROGRAMS)}')
  return names


def _attempt(fn: Callable[[], Any], row_base: Mapping[str, Any]) -> tuple[Any, dict | None]:
  """Runs a measurement; a runtime failure (out of memory, ...) becomes a row with 'error'."""
  try:
    return fn(), None
  except (jax.errors.JaxRuntimeError, RuntimeError, MemoryError) as e:
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    _progress(f'failed: {text}')
    gc.collect()
    return None, dict(row_base, error=text, note=f'FAILED: {text}')


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the benchmark; returns the exit status (2: bad input, 1: a measurement failed)."""
  return cli.main(_main, argv)


# The GPU table of BENCHMARKS.md (``--gpu_table``): the train steps, the scan unrolling, then the full BAIR test
# evaluation.
GPU_TABLE = {
    'train': ['--configs', ','.join(PAPER_CONFIGS), '--dtypes', 'float32,bfloat16', '--torch', '--steps', '20',
              '--warmup', '3'],
    # The model's scans rolled (1) and fully unrolled (full, the GPU default) at the targets' dtype.
    'scan_unroll': ['--configs', 'smmnist,bair', '--dtypes', 'bfloat16', '--scan_unroll', '1,full', '--steps', '20',
                    '--warmup', '3'],
    'eval_bair': ['--configs', 'bair', '--dtypes', 'bfloat16', '--steps', '1', '--warmup', '0', '--eval',
                  '--eval_videos', '256'],
}


def _main(argv: Sequence[str] | None) -> int:
  # Other processes' load when we start: they distort CPU timings (torch's OpenMP threads spin-wait and
  # suffer most from cores taken by others), so the table shows it.
  load_before = os.getloadavg()[0]
  started = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
  args = parse_args(argv)
  if args.gpu_table:
    verbose = ['--verbose'] if args.verbose else []
    return max(_main(extra + verbose + ['--json', os.path.join(args.gpu_table, f'{name}.json')])
               for name, extra in GPU_TABLE.items())
  unrolls = args.scan_unroll or [None]
  variants = {name if len(unrolls) == 1 else f'{name} scan_unroll={unroll_text(u)}': (name, u)
              for name in args.configs for u in unrolls}  # Label -> (config, scan unrolling).
  try:
    configs = {(label, dtype): load_config(name, batch=args.batch, dtype=dtype, precision=args.precision,
                                           overrides={**args.override, **({'scan_unroll': u} if u else {})})
               for label, (name, u) in variants.items() for dtype in args.dtypes}
  except config_lib.ConfigError as e:
    raise cli.UsageError(str(e)) from None
  if args.json:
    try:
      os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    except OSError as e:
      raise cli.UsageError(f'cannot create the folder of --json {args.json}: {e.strerror or e}') from None
  if args.target:
    return gpu_check.main(configs, args.target, args.programs, args.json, _progress)
  if args.torch or args.eval:
    # torch shares the accelerator: JAX must not reserve most of its memory up front.
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  cli.start(args.verbose, torch_first=args.torch or args.eval)
  if args.threads and (args.torch or args.eval):
    torch = import_order.import_torch()
    torch.set_num_threads(args.threads)
  try:
    mesh = sharding.make_mesh(next(iter(configs.values())))
    for cfg in configs.values():
      sharding.check_batch_divisible(int(cfg.batch_size), mesh)
  except config_lib.ConfigError as e:
    raise cli.UsageError(str(e)) from None
  on_cpu = jax.default_backend() == 'cpu'
  n_eval = args.eval_videos or (4 if on_cpu else 256)
  rows: list[dict] = []
  failed = False
  modes = args.onednn or [None]
  for name, dnn in [(n, m) for n in variants for m in modes]:
    tag = name if dnn is None or len(modes) == 1 else f'{name} onednn={dnn}'
    if dnn is not None:
      os.environ['SRVP_ONEDNN'] = dnn  # Read when the programs are traced.
    for dtype in args.dtypes:
      cfg = configs[name, dtype]
      what = {'kind': 'train', 'config': tag, 'dtype': dtype, 'batch': int(cfg.batch_size)}
      _progress(f'train {name} {dtype} batch {cfg.batch_size}')
      row, err = _attempt(functools.partial(time_train_step, cfg, warmup=args.warmup, steps=args.steps, label=tag),
                          what)
      row = row or err
      failed |= err is not None
      if args.torch and dtype == 'float32' and not err:
        _progress(f'torch train {name} batch {cfg.batch_size}')
        t_row, t_err = _attempt(functools.partial(time_torch_train_step, cfg, warmup=args.warmup, steps=args.steps,
                                                  threads=args.threads), what)
        if t_err:
          row['note'] = (row['note'] + '; ' if row['note'] else '') + f"torch failed: {t_err['error']}"
          failed = True
        else:
          row.update(t_row, ratio=t_row['torch_s'] / row['median_s'])
          row['note'] = '; '.join(row['warnings'] + _busy_note(row['host_other_cores'], row['torch_host_other_cores']))
      rows.append(row)
      if not err:
        torch_part = f", torch {row['torch_s']:.4f} s" if 'torch_s' in row else ''
        _progress(f"  {row['median_s']:.4f} s/step ({row['videos_per_s']:.2f} videos/s), compile "
                  f"{row['compile_s']:.1f} s{torch_part}")
    if args.layers:
      for dtype in args.dtypes:
        cfg = configs[name, dtype]
        what = {'kind': 'layer', 'layer': 'all', 'mode': 'layers', 'config': tag, 'dtype': dtype,
                'batch': int(cfg.batch_size)}
        l_rows, err = _attempt(functools.partial(time_layers, cfg, warmup=args.warmup, steps=args.steps,
                                                 with_torch=args.torch, threads=args.threads, label=tag), what)
        rows.extend(l_rows or [err])
        failed |= err is not None
    if args.convs and dnn in (None, modes[0]):  # Both backends in each row: once per config.
      what = {'kind': 'conv', 'layer': 'all', 'mode': 'convs', 'config': tag, 'dtype': 'float32',
              'batch': int(configs[name, args.dtypes[0]].batch_size)}
      c_rows, err = _attempt(functools.partial(time_convs, configs[name, args.dtypes[0]], warmup=args.warmup,
                                               steps=args.steps, with_torch=args.torch, threads=args.threads,
                                               label=tag), what)
      rows.extend(c_rows or [err])
      failed |= err is not None
    if args.eval:
      for dtype in args.dtypes:
        cfg = configs[name, dtype]
        model = build_model(cfg, jax.random.key(0))
        for with_lpips in (False, True):
          metrics = ['psnr', 'ssim'] + (['lpips'] if with_lpips else [])
          what = {'kind': 'eval', 'config': tag, 'dtype': dtype, 'batch': min(int(cfg.batch_size_test), n_eval),
                  'metrics': metrics}
          _progress(f"eval {name} {dtype} {','.join(metrics)}: {n_eval} videos")
          row, err = _attempt(functools.partial(time_evaluation, cfg, n_videos=n_eval, n_samples=args.eval_samples,
                                                with_lpips=with_lpips, model=model, label=tag), what)
          rows.append(row or err)
          failed |= err is not None
          if not err:
            _progress(f"  {row['frames_per_s']:.1f} frames/s, {row['total_s']:.1f} s")
          if args.torch and dtype == 'float32' and not err:
            _progress(f"test.py (PyTorch) {name} {','.join(metrics)}: {n_eval} videos")
            lpips_model = learned_metrics.LpipsOnFrames(None).model.model if with_lpips else None
            t_row, t_err = _attempt(functools.partial(time_test_py, cfg, n_videos=n_eval, n_samples=args.eval_samples,
                                                      lpips_model=lpips_model, threads=args.threads), what)
            if t_err:
              row['note'] += f"; test.py failed: {t_err['error']}"
              failed = True
            else:
              row.update(t_row, torch_s=t_row['test_py_s'], ratio=t_row['test_py_s'] / row['total_s'],
                         ratio_with_compile=t_row['test_py_s'] / (row['total_s'] + row['warmup_s']))
              busy = t_row['torch_host_other_cores'] or 0.0
              row['note'] += (f"; torch s: the official test.py algorithm; test.py / ours with our compile "
                              f"(warm-up) {row['ratio_with_compile']:.2f}") + (
                  f'; other processes used {busy:.1f} cores while timing test.py' if busy >= BUSY_CORES else '')
              _progress(f"  test.py {t_row['test_py_s']:.1f} s")
        del model
  info = device_info() | {'overrides': dict(args.override)}  # torch may have been imported since.
  info.update(load_avg_1m_before=load_before, date=started)
  info['tensorflow_imported'] = 'tensorflow' in sys.modules
  print(format_table(rows, info))
  if args.json:
    write_json(args.json, info, rows)
    _progress(f'wrote {args.json}')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
