"""Command-line handlers for the KTH, Human3.6M and BAIR data: download, convert, make the official test sets.

``make_test_set_kth`` and ``make_test_set_human`` are the ``kth`` / ``human`` subcommands of
``python -m srvp_jax.data.make_test_set``. The preparation steps run as
``python -m srvp_jax.data.video_datasets_cli {download,convert,make_test_set} DATASET --data_dir DIR``.
Each handler takes the argument list (without the subcommand) and returns an exit status.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from typing import Callable, Sequence

Handler = Callable[[Sequence[str]], int]


def _one_line_errors(handler: Handler) -> Handler:
  """Data errors become one 'error: ...' line on stderr and exit status 1 instead of a traceback."""

  @functools.wraps(handler)
  def wrapped(argv: Sequence[str]) -> int:
    try:
      return handler(argv)
    except (FileNotFoundError, ValueError, RuntimeError, ImportError) as e:
      print(f'error: {e}', file=sys.stderr)
      return 1

  return wrapped


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=prog, description=description)
  parser.add_argument('--data_dir', required=True, metavar='DIR', help='Dataset folder.')
  return parser


@_one_line_errors
def make_test_set_kth(argv: Sequence[str]) -> int:
  """Writes DIR/svg_test_set_40.npz from DIR/processed_64 (official procedure, NumPy seed 42)."""
  from srvp_jax.data import kth  # pylint: disable=import-outside-toplevel
  parser = _parser('make_test_set kth', make_test_set_kth.__doc__)
  parser.add_argument('--size', type=int, default=1000, help='Number of extracts.')
  parser.add_argument('--seq_len', type=int, default=kth.TEST_LEN, help='Frames per extract.')
  parser.add_argument('--seed', type=int, default=42, help='NumPy legacy seed (42 gives the official set).')
  args = parser.parse_args(argv)
  path = kth.make_test_set(args.data_dir, size=args.size, seq_len=args.seq_len, seed=args.seed)
  print(f'KTH test set written to {path}')
  return 0


@_one_line_errors
def make_test_set_human(argv: Sequence[str]) -> int:
  """Writes DIR/test_set_53_8/test_<i>.npz from DIR/test/*.npz (official procedure, NumPy seed 42)."""
  from srvp_jax.data import human  # pylint: disable=import-outside-toplevel
  parser = _parser('make_test_set human', make_test_set_human.__doc__)
  parser.add_argument('--size', type=int, default=1000, help='Number of extracts.')
  parser.add_argument('--seq_len', type=int, default=human.TEST_LEN, help='Frames per extract after subsampling.')
  parser.add_argument('--subsampling', type=int, default=human.SUBSAMPLING, help='Keep one frame in this many.')
  parser.add_argument('--seed', type=int, default=42, help='NumPy legacy seed (42 gives the official set).')
  args = parser.parse_args(argv)
  path = human.make_test_set(args.data_dir, size=args.size, seq_len=args.seq_len, subsampling=args.subsampling,
                             seed=args.seed)
  print(f'Human3.6M test set written to {path}')
  return 0


def _data_dir_step(step: str, dataset: str, doc: str) -> Handler:
  """A handler ``--data_dir DIR`` -> ``srvp_jax.data.<dataset>.<step>(DIR)``, with one-line errors."""

  @_one_line_errors
  def handler(argv: Sequence[str]) -> int:
    module = importlib.import_module(f'srvp_jax.data.{dataset}')
    getattr(module, step)(_parser(f'{step} {dataset}', doc).parse_args(argv).data_dir)
    return 0

  handler.__name__ = handler.__qualname__ = f'{step}_{dataset}'
  handler.__doc__ = doc
  return handler


download_kth = _data_dir_step('download', 'kth', 'Downloads the original KTH videos into DIR/raw/<action>/.')
download_bair = _data_dir_step('download', 'bair', 'Downloads and unpacks the BAIR tfrecords into DIR/softmotion30_44k/.')
convert_kth = _data_dir_step('convert', 'kth', 'Extracts 64x64 frames at 25 fps of DIR/raw/<action>/*.avi into '
                             'DIR/processed_64/ (needs ffmpeg).')
convert_human = _data_dir_step('convert', 'human', 'Crops and resizes DIR/S<n>/Videos/*.mp4 into DIR/train/*.npz and '
                               'DIR/test/*.npz (needs imageio-ffmpeg).')
convert_bair = _data_dir_step('convert', 'bair', 'Writes DIR/processed_data/{train,test}/<record>/<k>/<i>.png from '
                              'DIR/softmotion30_44k/ (needs TensorFlow).')


HANDLERS: dict[str, dict[str, Handler]] = {
    'download': {'kth': download_kth, 'bair': download_bair},
    'convert': {'kth': convert_kth, 'human': convert_human, 'bair': convert_bair},
    'make_test_set': {'kth': make_test_set_kth, 'human': make_test_set_human},
}


def main(argv: Sequence[str] | None = None) -> int:
  """``{download,convert,make_test_set} DATASET --data_dir DIR``."""
  argv = list(sys.argv[1:] if argv is None else argv)
  usage = '; '.join(f"{step} {{{','.join(h)}}}" for step, h in HANDLERS.items())
  if len(argv) < 2 or argv[0] not in HANDLERS or argv[1] not in HANDLERS[argv[0]]:
    print(f'usage: python -m srvp_jax.data.video_datasets_cli STEP DATASET --data_dir DIR ({usage})', file=sys.stderr)
    return 2
  return HANDLERS[argv[0]][argv[1]](argv[2:])


if __name__ == '__main__':
  sys.exit(main())
