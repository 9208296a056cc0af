"""The data CLI: ``python -m srvp_jax.data {download,prepare,make_test_set,inspect,throughput} DATASET --data_dir DIR``.

- ``download``: the official download URLs (MNIST, KTH, BAIR; Human3.6M is a licensed download).
- ``prepare``: raw data or an official layout -> the video store (KTH, Human3.6M, BAIR; your own clips: videos).
- ``make_test_set``: the official test files (official draws, NumPy legacy seed 42); videos: fixed test extracts.
- ``inspect``: what a folder holds and what is missing, with the command that makes it.
- ``throughput``: the training stream's speed in videos/s next to what a train step consumes.
Errors are one ``error: ...`` line: exit status 2 for usage, 1 for missing or broken data.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

import numpy as np

from srvp_jax import cli
from srvp_jax import config as config_lib
from srvp_jax.data import base, store
from srvp_jax import clips
from srvp_jax.preparation import bair, human, kth, mmnist, store_writer, videos

COMMANDS = ('download', 'prepare', 'make_test_set', 'inspect', 'throughput')
DATASETS = {'mmnist': mmnist.MovingMnist, 'kth': kth.KTH, 'human': human.Human, 'bair': bair.BAIR,
            'videos': videos.Videos}
VIDEO_OPTIONS = ('channels', 'fit', 'fps', 'stride', 'test_fraction', 'min_frames')  # prepare videos.
NAMES = tuple(DATASETS)  # 'smmnist' is accepted as 'mmnist'.
DIGIT_SOURCES = ('auto', 'idx', 'tfds', 'standin')
# Synthetic stores of the real shapes for ``throughput --synthetic N``: frames per video (low, high).
SYNTHETIC_LENGTHS = {'kth': (250, 750), 'human': (1500, 4500), 'bair': (30, 30), 'videos': (50, 500)}

EXAMPLES = '''examples:
  python -m srvp_jax.data download kth --data_dir data/kth
  python -m srvp_jax.data prepare kth --data_dir data/kth
  python -m srvp_jax.data make_test_set kth --data_dir data/kth
  python -m srvp_jax.data make_test_set mmnist --data_dir data/mnist --deterministic
  python -m srvp_jax.data inspect bair --data_dir data/bair
  python -m srvp_jax.data prepare videos --data_dir data/mine --fps 10
  python -m srvp_jax.data throughput bair --data_dir data/bair --batch 192 --steps_per_s 10
  python -m srvp_jax.data throughput bair --data_dir /tmp/synthetic --synthetic 2000'''


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = cli.Parser(prog='python -m srvp_jax.data', description=__doc__.split('\n\n')[0], examples=EXAMPLES)
  p.add_argument('command', choices=COMMANDS)
  p.add_argument('dataset', choices=NAMES + ('smmnist',))
  p.add_argument('--data_dir', required=True, metavar='DIR', help='The dataset folder.')
  p.add_argument('--source', default=None,
                 help='prepare: input to read (kth: png|raw, human: npz|raw, bair: tfrecords|png|tfds; default auto); '
                      'mmnist: digits (auto|idx|tfds|standin, standin = scikit-learn digits, NOT MNIST).')
  p.add_argument('--force', action='store_true', help='prepare: rebuild an existing store.')
  p.add_argument('--tfds_data_dir', default=None, metavar='D', help='prepare bair --source tfds: TFDS data folder.')
  p.add_argument('--no_progress', action='store_true', help='Hide progress bars.')
  g = p.add_argument_group('prepare videos (your clips under DIR/raw/)')
  g.add_argument('--channels', type=int, choices=(1, 3), default=None,
                 help='Grey (1) or RGB (3) frames (default: 3 unless every clip is grey).')
  g.add_argument('--fit', choices=clips.FITS, default=None, help='Centred square crop (default) or stretch to 64x64.')
  g.add_argument('--fps', type=float, default=None, help='Resample every clip to this frame rate (read from the file).')
  g.add_argument('--stride', type=int, default=None, help='Keep one frame in this many (instead of --fps).')
  g.add_argument('--test_fraction', type=float, default=None,
                 help='Share of clips in the test split, drawn by a hash of their path (default 0.1).')
  g.add_argument('--min_frames', type=int, default=None,
                 help=f'Skip clips shorter than this (default {videos.MIN_FRAMES}, the training length).')
  g = p.add_argument_group('make_test_set')
  g.add_argument('--size', type=int, default=None,
                 help='Number of test videos (official: 1000; mmnist 5000; videos 100).')
  g.add_argument('--seq_len', type=int, default=None,
                 help='Frames per test video (official: kth 40, human 53, smmnist 25, deterministic mmnist 100; '
                      'videos 20); throughput: frames per training clip (default: the paper config).')
  g.add_argument('--seed', type=int, default=42, help='Legacy NumPy seed of the draws (42 is the official set).')
  g.add_argument('--subsampling', type=int, default=None, help='human: keep one frame in this many (official 8).')
  g.add_argument('--deterministic', action='store_true', help='mmnist: deterministic bounces (mmnist_test_...).')
  g.add_argument('--ndigits', type=int, default=2, help='mmnist: digits per video (official 2).')
  g.add_argument('--max_speed', type=int, default=4, help='mmnist: maximum speed (official 4).')
  g = p.add_argument_group('throughput')
  g.add_argument('--batch', type=int, default=None, help='Videos per train step (default: the paper config).')
  g.add_argument('--steps_per_s', type=float, default=None,
                 help='Train steps per second the stream must feed (default: the GPU target of the dataset).')
  g.add_argument('--workers', type=int, default=4, help='grain threads building batches.')
  g.add_argument('--processes', type=int, default=0, help='grain worker processes (0: threads only).')
  g.add_argument('--seconds', type=float, default=10.0, help='Measurement time.')
  g.add_argument('--synthetic', type=int, default=0, metavar='N',
                 help='Measure on a store of N random videos of the real shapes written into DIR (an empty folder).')
  args = p.parse_args(argv)
  if args.dataset == 'smmnist':
    args.dataset = 'mmnist'
  usage = _usage_error(args)
  if usage:
    p.error(usage)
  return args


def _usage_error(args) -> str | None:
  """Options that do not apply to the command or dataset (never ignored silently)."""
  name, cmd = args.dataset, args.command
  if args.source is not None:
    allowed = DIGIT_SOURCES if name == 'mmnist' else ('auto', *DATASETS[name](None, '.').sources())
    if name != 'mmnist' and cmd != 'prepare':
      return f'--source applies to prepare (and to mmnist digits), not to {cmd} {name}'
    if args.source not in allowed:
      return f'--source {args.source} is not one of {", ".join(allowed)} for {name}'
  if args.tfds_data_dir and not (cmd == 'prepare' and name == 'bair'):
    return '--tfds_data_dir applies to prepare bair only'
  if args.subsampling is not None and name != 'human':
    return '--subsampling applies to human only'
  if (args.deterministic or args.ndigits != 2 or args.max_speed != 4) and name != 'mmnist':
    return '--deterministic, --ndigits and --max_speed apply to mmnist only'
  if args.synthetic and (cmd != 'throughput' or name == 'mmnist'):
    return '--synthetic applies to throughput of kth, human, bair or videos'
  given = [f'--{k}' for k in VIDEO_OPTIONS if getattr(args, k) is not None]
  if given and (cmd, name) != ('prepare', 'videos'):
    return f'{", ".join(given)} appl{"ies" if len(given) == 1 else "y"} to prepare videos only'
  if args.fps is not None and args.stride is not None:
    return '--fps and --stride both resample in time: give one'
  if args.test_fraction is not None and not 0 <= args.test_fraction < 1:
    return '--test_fraction must be in [0, 1)'
  for flag in ('size', 'seq_len', 'batch', 'steps_per_s', 'subsampling', 'fps', 'stride', 'min_frames'):
    value = getattr(args, flag)
    if value is not None and value <= 0:
      return f'--{flag} must be positive'
  return None


def _config(args, **overrides):
  """A config of the dataset (the CLI's steps need its data settings only)."""
  cls = DATASETS[args.dataset]
  cfg = config_lib.default_config()
  cfg.update(dict(dataset='smmnist' if args.dataset == 'mmnist' else args.dataset, data_dir=args.data_dir,
                  nc=cls(None, args.data_dir).nc,
                  nt_inf=1, deterministic=bool(args.deterministic), ndigits=int(args.ndigits),
                  max_speed=int(args.max_speed), subsampling=int(args.subsampling or 8),
                  digits_source=args.source if args.dataset == 'mmnist' and args.source else 'auto'))
  cfg.update(overrides)
  return cfg


def run(args) -> list[str]:
  """Runs one command; returns the lines to print."""
  cls = DATASETS[args.dataset]
  if os.path.isfile(args.data_dir):
    raise NotADirectoryError(f'--data_dir {args.data_dir} is a file, not a folder: give the folder of the dataset')
  if args.command == 'throughput':
    return throughput(args)
  dataset = cls(_config(args), args.data_dir)
  if args.command == 'download':
    dataset.download()
    return [f'{args.dataset} downloaded into {args.data_dir}; next: '
            f'`{base.command("prepare", args.dataset, args.data_dir)}`']
  if args.command == 'prepare':
    if not os.path.isdir(args.data_dir):
      raise FileNotFoundError(dataset.missing_data_dir())
    kwargs = {'tfds_data_dir': args.tfds_data_dir} if args.tfds_data_dir else {}
    kwargs.update({k: getattr(args, k) for k in VIDEO_OPTIONS if getattr(args, k) is not None})
    return dataset.prepare(args.source or 'auto', force=args.force, progress=not args.no_progress, **kwargs)
  if args.command == 'make_test_set':
    options = {k: getattr(args, k) for k in ('size', 'seq_len', 'subsampling') if getattr(args, k) is not None}
    options['seed'] = args.seed
    if args.dataset == 'mmnist':
      options.update(deterministic=args.deterministic, ndigits=args.ndigits, max_speed=args.max_speed)
    return [f'{args.dataset} test set written to {dataset.make_test_set(**options)}']
  if not os.path.isdir(args.data_dir):
    raise FileNotFoundError(f'data folder {args.data_dir} not found')
  return [f'{args.dataset} in {args.data_dir}:'] + ['  ' + line for line in dataset.inspect()]


def write_synthetic_store(data_dir: str, name: str, n_videos: int, seed: int = 0) -> None:
  """A store of ``n_videos`` random training videos (and a few test ones) of the dataset's real shapes."""
  cls = DATASETS[name]
  low, high = SYNTHETIC_LENGTHS[name]
  rng = np.random.default_rng(seed)

  def items():
    for split, n in (('train', n_videos), ('test', 4)):
      for i in range(n):
        length = int(rng.integers(low, high + 1))
        yield split, f'synthetic_{i:06d}', {}, rng.integers(0, 256, (length, 64, 64, cls.nc), dtype=np.uint8)

  store_writer.write_splits(data_dir, name, cls.nc, ('train', 'test'), items())


def throughput(args) -> list[str]:
  """Measures the training stream (videos/s) against ``batch * steps_per_s``."""
  cls = DATASETS[args.dataset]
  paper = cls.paper
  batch = int(args.batch or paper['batch_size'])
  seq_len = int(args.seq_len or paper['seq_len'])
  steps_per_s = float(args.steps_per_s or paper['steps_per_s'])
  if args.synthetic:
    if any(store.has_split(args.data_dir, s) for s in ('train', 'test')):
      raise ValueError(f'{args.data_dir} already holds a video store; give --synthetic an empty folder')
    os.makedirs(args.data_dir, exist_ok=True)
    write_synthetic_store(args.data_dir, args.dataset, args.synthetic)
  elif not os.path.isdir(args.data_dir) and not (args.dataset == 'mmnist' and args.source == 'standin'):
    raise FileNotFoundError(f'data folder {args.data_dir} not found')
  cfg = _config(args, seq_len=seq_len, num_data_workers=int(args.workers), num_data_processes=int(args.processes),
                batch_size=batch)
  dataset = cls(cfg, args.data_dir)
  stream = dataset.train_batches(batch, seed=0)
  try:
    first = next(stream)  # Start-up (indexing, first batch) is not counted.
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds or n < 2:
      next(stream)
      n += 1
    elapsed = time.perf_counter() - t0
  finally:
    if hasattr(stream, 'close'):
      stream.close()  # Stops grain's threads and worker processes.
  videos_per_s = n * batch / elapsed
  need = batch * steps_per_s
  mb_per_s = videos_per_s * first[0].nbytes / 1e6
  verdict = 'enough' if videos_per_s >= need else f'NOT enough: the stream would hold the GPU at ' \
      f'{videos_per_s / batch:.1f} steps/s'
  return [f'{args.dataset} training stream ({dataset.describe_source()}), batch {batch} x {seq_len} frames, '
          f'{args.workers} grain threads' + (f' x {args.processes} processes' if args.processes else '') +
          f', {os.cpu_count()} CPUs:',
          f'  {videos_per_s:,.0f} videos/s ({videos_per_s / batch:.1f} batches/s, {mb_per_s:,.0f} MB/s of float32)',
          f'  a train step at batch {batch} and {steps_per_s:g} steps/s consumes {need:,.0f} videos/s: {verdict}']


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one command; returns the exit status (2: usage, 1: missing or broken data, 130: interrupted)."""
  return cli.main(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  cli.start(args.verbose)
  try:
    lines = run(args)
  except (FileNotFoundError, ValueError, RuntimeError, ImportError, OSError) as e:  # Incl. DataError, raw's errors.
    raise cli.Failure(cli.first_line(e, limit=None)) from None
  for line in lines:
    print(line)
  return 0
