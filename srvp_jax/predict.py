"""SRVP on your own clips: ``python -m srvp_jax.predict {future,swap,interpolate} CKPT_DIR ...``.

* ``future --input CLIP --n_future M``: S samples of the M frames after the first nt_cond frames of the
  clip (official test protocol, ``SRVP.predict``), with per-frame PSNR / SSIM of each sample against the
  clip's next frames when it has them.
* ``swap --content A --motion B``: the content variable w and the decoder skips come from the last nt_inf
  frames of A (the last one for skips), the states y from B: y_1 and the posterior z's are inferred from
  all of B's frames, then the prior continues for ``--n_future`` frames. With A = B this is B's
  reconstruction followed by a prediction, exactly (``SRVP.predict(x_content=...)``).
* ``interpolate --input CLIP --factor K``: the clip's latent trajectory (y_1 and posterior z's over all its
  frames, then ``--n_future`` prior frames) decoded at times t + j / K, i.e. K times the frame rate. The
  dynamics are integrated with lcm(K, n_euler_steps) Euler steps per frame (z constant over a frame, as in
  training) and every lcm / K-th state is decoded: for K dividing the model's n_euler_steps these are the
  model's own Euler states (K = 1 is the plain reconstruction, K = n_euler_steps all its Euler states);
  otherwise the step is refined (for K a multiple of n_euler_steps, K steps per frame, all decoded).

Clips: a GIF, a video (``.mp4 .avi ...`` through imageio-ffmpeg's ffmpeg), a folder of image frames or a
``.npy`` / ``.npz`` array, fitted to 64x64 and the model's channels as ``srvp_jax.clips`` says
(``--fit crop``: centred square crop, Lanczos resize; nc=1: luminance; nc=3 from grey: repeated).
``--start`` / ``--stride`` / ``--n_frames`` pick the frames.

The S samples are computed together in one compiled call (nnx.jit); sample s uses the noise of key
fold_in(fold_in(key(seed), 0), s), as the evaluation does, so it does not depend on S.
Outputs in ``--out`` (default ``predictions``): ``<command>.gif`` (green: given frames, blue: the clip's
next frames, orange: decoded from states inferred from the clip, red: from the prior, grey: held last
frame), ``<command>.npz`` (what ``future`` / ``swap`` / ``interpolate`` return, frames float32 in [0, 1],
and ``fps``), and for interpolate ``interpolate.mp4``. Errors are one ``error: ...`` line: exit status 2
before any work (arguments, checkpoint, clips, output folder), 1 if the computation or writing fails.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
import warnings
from typing import Any, Sequence

import imageio_ffmpeg
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from srvp_jax import checkpoints, cli, clips, config, visualize
from srvp_jax.metrics import image
from srvp_jax.model import rsample

DEFAULT_FPS = 4.  # Frame rate of clips whose file does not tell it (arrays, image folders).
DEFAULT_OUT = 'predictions'
MIN_GIF_FRAME_MS = 20  # Browsers show shorter GIF delays at 100 ms.
RECON_COLOR = (235, 140, 20)
HOLD_COLOR = (170, 170, 170)
GRID_COLUMNS = 6

EXAMPLES = '''examples:
  python -m srvp_jax.predict future runs/quickstart --input clip.gif --n_future 10 --n_samples 4
  python -m srvp_jax.predict swap runs/quickstart --content a.npy --motion b.mp4 --n_future 5
  python -m srvp_jax.predict interpolate runs/quickstart --input frames/ --factor 4 --out out/
'''


_positive = cli.number(int, 1, 'a positive integer')
_non_negative = cli.number(int, 0, '>= 0')
_positive_float = cli.number(float, 0, '> 0', strict=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = cli.Parser(prog='python -m srvp_jax.predict', examples=EXAMPLES, verbose=False,
                 description='SRVP on your own clips: future frames, content / dynamics swap, higher frame rate.')
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('ckpt_dir', metavar='CKPT_DIR',
                      help='Checkpoint folder of ours, or an official experiment folder (config.json + model.pt).')
  common.add_argument('--checkpoint', default='latest', help="'latest' (default), 'best' or a step number.")
  common.add_argument('--model_name', default=None,
                      help="Official folders: the weights file, 'model.pt' (default) or 'model_best.pt'.")
  common.add_argument('--start', type=_non_negative, default=0, help='First frame of the clip(s) (default 0).')
  common.add_argument('--stride', type=_positive, default=1, help='Keep one frame in STRIDE (default 1).')
  common.add_argument('--n_frames', type=_positive, default=None, help='Read at most this many frames.')
  common.add_argument('--fit', choices=clips.FITS, default='crop',
                      help='crop: centred square crop then resize (default); stretch: resize the whole frame.')
  common.add_argument('--n_samples', type=_positive, default=None,
                      help='Samples, computed together (default: 4 for future, 1 for swap and interpolate).')
  common.add_argument('--seed', type=int, default=0, help='Seed of the noise (default 0).')
  common.add_argument('--fps', type=_positive_float, default=None,
                      help=f'Frame rate of the clip (default: the file\'s, else {DEFAULT_FPS:g}), divided by --stride.')
  common.add_argument('--out', default=DEFAULT_OUT, metavar='DIR', help=f'Output folder (default {DEFAULT_OUT}).')
  sub = p.add_subparsers(dest='command', required=True, metavar='{future,swap,interpolate}')
  f = sub.add_parser('future', parents=[common], help='Sample the next frames of a clip.', examples=EXAMPLES,
                     verbose=True)
  f.add_argument('--input', required=True, metavar='CLIP', help=clips.supported() + '.')
  f.add_argument('--n_future', type=_positive, required=True, metavar='M', help='Frames to predict.')
  f.add_argument('--nt_cond', type=_positive, default=None, help='Conditioning frames (default: the model\'s).')
  f.add_argument('--n_euler_steps', type=_positive, default=None,
                 help='Euler steps per predicted frame (default: the training value, also used over the clip).')
  s = sub.add_parser('swap', parents=[common], help="A's content moving like B.", examples=EXAMPLES,
                     verbose=True)
  s.add_argument('--content', required=True, metavar='A', help='Clip giving the content (its last nt_inf frames).')
  s.add_argument('--motion', required=True, metavar='B', help='Clip giving the dynamics (all its frames).')
  s.add_argument('--n_future', type=_non_negative, default=0, metavar='M',
                 help='Frames continued by the prior after B\'s (default 0).')
  s.add_argument('--n_euler_steps', type=_positive, default=None,
                 help='Euler steps per prior frame (default: the training value, also used over B).')
  i = sub.add_parser('interpolate', parents=[common], help='The clip at K times its frame rate.', examples=EXAMPLES,
                     verbose=True)
  i.add_argument('--input', required=True, metavar='CLIP', help=clips.supported() + '.')
  i.add_argument('--factor', type=_positive, required=True, metavar='K', help='Frame-rate multiplier.')
  i.add_argument('--n_future', type=_non_negative, default=0, metavar='M',
                 help='Frames continued by the prior after the clip, also at K times the rate (default 0).')
  args = p.parse_args(argv)
  if args.n_samples is None:
    args.n_samples = 4 if args.command == 'future' else 1
  return args


# ----------------------------------------------------------------------------------------------------------------
# Compiled computations (the model is an argument of nnx.jit; integers are static).


def _noise(model, key, sample_ids, nt_obs, nt_pred):
  return model.sample_pred_noise_per_sample(key, jnp.zeros((1,), jnp.int32), sample_ids, nt_obs, nt_pred)


def _predict_kernel(model, key, x_cond, x_content, sample_ids, *, nt_pred, n_euler_steps, cond_euler_steps):
  """(S, nt_cond) frames decoded from the inferred states, (S, nt_pred) predicted frames of one clip."""
  noise = _noise(model, key, sample_ids, x_cond.shape[1], nt_pred)
  out = model.predict(x_cond, noise, n_euler_steps=n_euler_steps, cond_euler_steps=cond_euler_steps,
                      reconstruct_cond=True, x_content=x_content)
  return out.x_cond_rec[:, 0], out.x_pred[:, 0]


def _interpolate_kernel(model, key, x, sample_ids, *, n_future, n_steps, every):
  """(S, 1 + (T - 1 + n_future) * n_steps / every) frames decoded from every ``every``-th Euler state, and
  those states, from the clip x (1, T, ...) integrated with ``n_steps`` Euler steps per frame."""
  noise = _noise(model, key, sample_ids, x.shape[1], n_future)
  s = sample_ids.shape[0]
  cond = model.condition(x)

  def tile(a):  # (1, ...) -> (S, ...)
    return jnp.broadcast_to(a, (s, *a.shape[1:]))

  y0 = rsample(tile(cond.q_y0), noise.eps_y0[:, 0])
  path = jnp.concatenate([y0[:, None], model.integrate_path(y0, noise.eps_z_post[:, 0], n_steps, tile(cond.q_z))], 1)
  if n_future:
    path = jnp.concatenate([path, model.integrate_path(path[:, -1], noise.eps_z_prior[:, 0], n_steps)], 1)
  states = path[:, ::every]
  skips = [tile(sk) for sk in cond.skips] if cond.skips is not None else None
  return jnp.clip(model.decode(tile(cond.w), states, skips, train=False), 0., 1.), states


def _metrics_kernel(pred, truth):
  truth = truth.astype(pred.dtype)
  return image.psnr(pred, truth), image.ssim(pred, truth)


@functools.lru_cache(maxsize=None)
def compiled(name: str):
  """The jitted kernel ``name`` (cached: one compilation per model structure and static arguments)."""
  if name == 'predict':
    return nnx.jit(_predict_kernel, static_argnames=('nt_pred', 'n_euler_steps', 'cond_euler_steps'))
  if name == 'interpolate':
    return nnx.jit(_interpolate_kernel, static_argnames=('n_future', 'n_steps', 'every'))
  if name == 'metrics':
    return jax.jit(_metrics_kernel)
  raise KeyError(name)


def _as_batch(frames: np.ndarray):
  return jnp.asarray(frames[None], jnp.float32) / 255.


def _sample_ids(n_samples: int):
  return jnp.arange(n_samples, dtype=jnp.int32)


def future(model, cfg, frames: np.ndarray, *, nt_cond: int, n_future: int, n_samples: int, seed: int,
           n_euler_steps: int | None = None) -> dict[str, np.ndarray]:
  """Samples of the n_future frames after frames[:nt_cond] (uint8 (T, 64, 64, nc)).

  Returns float32 arrays: cond (nt_cond, ...) the given frames, cond_rec (S, nt_cond, ...) their
  reconstruction, samples (S, n_future, ...), and when frames has more than nt_cond frames truth
  (n_truth, ...) with psnr / ssim (S, n_truth) of each sample's first n_truth frames.
  """
  train_steps = int(cfg.n_euler_steps)
  x = _as_batch(frames[:nt_cond + n_future])
  rec, pred = compiled('predict')(model, jax.random.key(seed), x[:, :nt_cond], None, _sample_ids(n_samples),
                                  nt_pred=n_future, n_euler_steps=int(n_euler_steps or train_steps),
                                  cond_euler_steps=train_steps)
  out = {'cond': x[0, :nt_cond], 'cond_rec': rec, 'samples': pred}
  n_truth = x.shape[1] - nt_cond
  if n_truth:
    truth = x[0, nt_cond:]
    out['truth'] = truth
    out['psnr'], out['ssim'] = compiled('metrics')(pred[:, :n_truth], jnp.broadcast_to(truth, pred[:, :n_truth].shape))
  return {k: np.asarray(v, np.float32) for k, v in jax.device_get(out).items()}


def swap(model, cfg, content: np.ndarray, motion: np.ndarray, *, n_future: int, n_samples: int, seed: int,
         n_euler_steps: int | None = None) -> dict[str, np.ndarray]:
  """A's content with B's dynamics: samples (S, T_B + n_future, ...) float32, the first T_B frames decoded
  from the states inferred from B, the rest from the prior; content / motion the given frames."""
  train_steps = int(cfg.n_euler_steps)
  xa, xb = _as_batch(content), _as_batch(motion)
  # At least one prior frame is predicted (the noise of B's frames does not depend on how many); extras are dropped.
  rec, pred = compiled('predict')(model, jax.random.key(seed), xb, xa, _sample_ids(n_samples),
                                  nt_pred=max(n_future, 1), n_euler_steps=int(n_euler_steps or train_steps),
                                  cond_euler_steps=train_steps)
  samples = jnp.concatenate([jnp.clip(rec, 0., 1.), pred[:, :n_future]], axis=1)
  out = {'content': xa[0], 'motion': xb[0], 'samples': samples}
  return {k: np.asarray(v, np.float32) for k, v in jax.device_get(out).items()}


def euler_plan(factor: int, n_euler_steps: int) -> tuple[int, int]:
  """(Euler steps per frame, decode every n-th state) for a frame-rate factor: lcm(K, n), lcm / K."""
  steps = math.lcm(int(factor), int(n_euler_steps))
  return steps, steps // int(factor)


def interpolate(model, cfg, frames: np.ndarray, *, factor: int, n_future: int, n_samples: int,
                seed: int) -> dict[str, np.ndarray]:
  """The clip decoded at K times its frame rate: samples (S, 1 + (T - 1 + n_future) K, ...) float32 at times
  ``times`` (in input frames), their states y, and input the given frames."""
  steps, every = euler_plan(factor, int(cfg.n_euler_steps))
  x = _as_batch(frames)
  samples, states = compiled('interpolate')(model, jax.random.key(seed), x, _sample_ids(n_samples),
                                            n_future=n_future, n_steps=steps, every=every)
  out = jax.device_get({'input': x[0], 'samples': samples, 'y': states})
  out = {k: np.asarray(v, np.float32) for k, v in out.items()}
  out['times'] = np.arange(out['samples'].shape[1], dtype=np.float64) / factor
  out['euler_steps_per_frame'] = np.int64(steps)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Figures and files.


def _byte(x: np.ndarray) -> np.ndarray:
  return np.round(np.clip(x, 0., 1.) * 255.).astype(np.uint8)


def _panel(*segments: tuple[np.ndarray, tuple[int, int, int]]) -> np.ndarray:
  """A bordered video from segments of float frames (T_i, H, W, C), each with its border colour."""
  segments = [(f, c) for f, c in segments if len(f)]
  frames = np.concatenate([_byte(f) for f, _ in segments])
  return visualize.bordered(frames, [c for f, c in segments for _ in range(len(f))])


def _hold(frame: np.ndarray, n: int) -> tuple[np.ndarray, tuple[int, int, int]]:
  return np.repeat(frame[None], n, axis=0), HOLD_COLOR


def gif_ms(fps: float) -> int:
  return max(MIN_GIF_FRAME_MS, int(round(1000. / fps)))


def future_figure(res: dict[str, np.ndarray]) -> np.ndarray:
  cond, samples = res['cond'], res['samples']
  truth = res.get('truth', cond[:0])
  clip = _panel((cond, visualize.COND_COLOR), (truth, visualize.TRUTH_COLOR),
                _hold(np.concatenate([cond, truth])[-1], samples.shape[1] - len(truth)))
  panels = [('clip', clip)] + [(f'sample {s + 1}', _panel((cond, visualize.COND_COLOR), (p, visualize.PRED_COLOR)))
                               for s, p in enumerate(samples)]
  return visualize.panel_grid(panels, GRID_COLUMNS)


def swap_figure(res: dict[str, np.ndarray]) -> np.ndarray:
  t_b = len(res['motion'])
  panels = [('content A', _panel((res['content'], visualize.COND_COLOR))),
            ('motion B', _panel((res['motion'], visualize.COND_COLOR)))]
  for s, video in enumerate(res['samples']):
    panels.append((f'swap {s + 1}', _panel((video[:t_b], RECON_COLOR), (video[t_b:], visualize.PRED_COLOR))))
  return visualize.panel_grid(panels, GRID_COLUMNS)


def interpolate_figure(res: dict[str, np.ndarray], factor: int) -> np.ndarray:
  frames, samples = res['input'], res['samples']
  n_obs = 1 + (len(frames) - 1) * factor  # Output frames over the observed span.
  held = np.repeat(frames, factor, axis=0)[:n_obs]
  panels = [(f'input x{factor}', _panel((held, visualize.COND_COLOR), _hold(frames[-1], samples.shape[1] - n_obs)))]
  for s, video in enumerate(samples):
    panels.append((f'sample {s + 1}', _panel((video[:n_obs], RECON_COLOR), (video[n_obs:], visualize.PRED_COLOR))))
  return visualize.panel_grid(panels, GRID_COLUMNS)


def save_mp4(path: str, frames: np.ndarray, fps: float) -> None:
  """(T, H, W, 3) uint8 frames as an H.264 MP4 through imageio-ffmpeg (padded white to multiples of 16)."""
  t, h, w, _ = frames.shape
  ph, pw = -h % 16, -w % 16
  frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), constant_values=255)
  writer = imageio_ffmpeg.write_frames(path, (w + pw, h + ph), fps=fps, macro_block_size=16, ffmpeg_log_level='error')
  with warnings.catch_warnings():  # JAX warns on fork; subprocess execs ffmpeg at once, which is safe.
    warnings.filterwarnings('ignore', message='os.fork', category=RuntimeWarning)
    writer.send(None)
  for frame in frames:
    writer.send(np.ascontiguousarray(frame).tobytes())
  writer.close()


# ----------------------------------------------------------------------------------------------------------------
# Entry point.


def _load_model(args):
  try:
    return checkpoints.load_model(args.ckpt_dir, str(args.checkpoint), compute_dtype='float32',
                                  model_name=args.model_name)
  except (checkpoints.CheckpointNotFoundError, config.ConfigError) as e:
    raise cli.UsageError(str(e)) from None
  except (OSError, ValueError, KeyError, RuntimeError) as e:
    first = cli.first_line(e)
    raise cli.UsageError(f'cannot load the checkpoint {args.ckpt_dir}: {first}') from None


def _load_clip(path, cfg, args, n_frames=None, need=1, what='clip'):
  try:
    clip = clips.load(path, int(cfg.nc), start=args.start, stride=args.stride, n_frames=n_frames, mode=args.fit)
  except clips.ClipError as e:
    raise cli.UsageError(str(e)) from None
  if len(clip.frames) < need:
    raise cli.UsageError(f'{what} {path} has {len(clip.frames)} frame(s) (after --start {args.start} --stride '
                         f'{args.stride}) but {need} are needed: give a longer clip or lower --start / --stride')
  return clip


def _startup(args) -> dict[str, Any]:
  """Loads the model and the clips, checks the numbers, creates the output folder."""
  if not os.path.isdir(args.ckpt_dir):
    raise cli.UsageError(f'checkpoint folder {args.ckpt_dir} not found')
  model, cfg, step = _load_model(args)
  nt_inf = int(cfg.nt_inf)
  setup = dict(model=model, cfg=cfg, step=step)
  if args.command == 'future':
    nt_cond = int(args.nt_cond or cfg.nt_cond)
    if nt_cond < nt_inf:
      raise cli.UsageError(f'--nt_cond {nt_cond} is smaller than the model\'s nt_inf={nt_inf}: '
                           f'give --nt_cond >= {nt_inf}')
    n_read = min(args.n_frames or nt_cond + args.n_future, nt_cond + args.n_future)
    setup['clip'] = _load_clip(args.input, cfg, args, n_read, nt_cond, f'the clip (nt_cond={nt_cond})')
    setup['nt_cond'] = nt_cond
  elif args.command == 'swap':
    setup['content'] = _load_clip(args.content, cfg, args, args.n_frames, nt_inf, f'content clip (nt_inf={nt_inf})')
    setup['clip'] = _load_clip(args.motion, cfg, args, args.n_frames, nt_inf, f'motion clip (nt_inf={nt_inf})')
  else:
    setup['clip'] = _load_clip(args.input, cfg, args, args.n_frames, nt_inf, f'the clip (nt_inf={nt_inf})')
  try:
    os.makedirs(args.out, exist_ok=True)
  except OSError as e:
    raise cli.UsageError(f'cannot create the output folder {args.out}: {e.strerror or e}') from None
  setup['fps'] = (args.fps or DEFAULT_FPS) / args.stride if args.fps or not setup['clip'].fps else setup['clip'].fps
  return setup


def run(args, setup) -> list[str]:
  """Computes and writes the outputs of the command; returns the written paths."""
  model, cfg, fps = setup['model'], setup['cfg'], setup['fps']
  base = os.path.join(args.out, args.command)
  written = [base + '.gif', base + '.npz']
  if args.command == 'future':
    res = future(model, cfg, setup['clip'].frames, nt_cond=setup['nt_cond'], n_future=args.n_future,
                 n_samples=args.n_samples, seed=args.seed, n_euler_steps=args.n_euler_steps)
    grid = future_figure(res)
  elif args.command == 'swap':
    res = swap(model, cfg, setup['content'].frames, setup['clip'].frames, n_future=args.n_future,
               n_samples=args.n_samples, seed=args.seed, n_euler_steps=args.n_euler_steps)
    grid = swap_figure(res)
  else:
    res = interpolate(model, cfg, setup['clip'].frames, factor=args.factor, n_future=args.n_future,
                      n_samples=args.n_samples, seed=args.seed)
    grid = interpolate_figure(res, args.factor)
    fps *= args.factor
    written.append(base + '.mp4')
    save_mp4(written[-1], grid, fps)
  visualize.save_gif(written[0], grid, gif_ms(fps))
  np.savez_compressed(written[1], **res, fps=np.float64(fps))
  if 'psnr' in res:
    print(f'{"sample":>8}{"PSNR (dB)":>12}{"SSIM":>10}   mean over the {res["psnr"].shape[1]} frame(s) with ground '
          'truth')
    for s in range(len(res['psnr'])):
      print(f'{s + 1:>8}{res["psnr"][s].mean():>12.2f}{res["ssim"][s].mean():>10.4f}')
  return written


def _describe(args, setup) -> str:
  clip = setup['clip'].frames
  if args.command == 'future':
    return (f'future: {args.n_samples} sample(s) of {args.n_future} frame(s) after {setup["nt_cond"]} of '
            f'{args.input} ({len(clip)} frames read)')
  if args.command == 'swap':
    return (f'swap: content of {args.content} ({len(setup["content"].frames)} frames), dynamics of {args.motion} '
            f'({len(clip)} frames) + {args.n_future} prior frame(s), {args.n_samples} sample(s)')
  steps, _ = euler_plan(args.factor, int(setup['cfg'].n_euler_steps))
  return (f'interpolate: {args.input} ({len(clip)} frames) x{args.factor} frame rate ({steps} Euler step(s) per '
          f'frame) + {args.n_future} prior frame(s), {args.n_samples} sample(s)')


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one command; returns the exit status (2: error before any work, 1: failure while running)."""
  return cli.main(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  cli.start(args.verbose, cache_compilations=True)
  setup = _startup(args)
  start = time.perf_counter()
  print(f'{_describe(args, setup)}; model {args.ckpt_dir} (step {setup["step"]}) on '
        f'{jax.devices()[0].platform}: compiling and running...', file=sys.stderr, flush=True)
  try:
    written = run(args, setup)
  except jax.errors.JaxRuntimeError as e:
    first = cli.first_line(e)
    hint = ': lower --n_samples or --n_frames' if 'RESOURCE_EXHAUSTED' in first else ''
    raise cli.Failure(f'prediction failed ({first}){hint}') from None
  except OSError as e:
    raise cli.Failure(f'cannot write the outputs in {args.out}: {e.strerror or e}') from None
  print(f'done in {time.perf_counter() - start:.1f} s: ' + ', '.join(written), file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
