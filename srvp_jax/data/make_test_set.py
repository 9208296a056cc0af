"""Builds the fixed test sets: ``python -m srvp_jax.data.make_test_set DATASET --data_dir DIR [options]``.

The first positional argument picks the dataset's handler in ``HANDLERS`` (name -> function of the
remaining command-line arguments, returning None or an exit status); add a dataset by adding its handler
there. ``kth`` and ``human`` are the handlers of ``srvp_jax.data.video_datasets_cli`` (official draws with
NumPy's legacy generator seeded 42, SPEC section 6): ``kth`` writes DIR/svg_test_set_40.npz from
DIR/processed_64, ``human`` writes DIR/test_set_53_8/test_<i>.npz from DIR/test/*.npz.

Moving MNIST (``mmnist``) reproduces the official procedure byte for byte: NumPy's legacy generator
seeded 42, one permutation of the MNIST test digits, then for each video and each of its digits
(digit ``perm[i * ndigits + n]``) one trajectory (SPEC section 7). The paper's sets have 25 frames
(stochastic) and 100 frames (deterministic); those are the default lengths.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

import numpy as np

from srvp_jax.data import mmnist, mnist, video_datasets_cli

DEFAULT_SEQ_LEN = {False: 25, True: 100}  # Keyed by ``deterministic``.
RENDER_CHUNK = 256  # Videos rendered at once.


def mmnist_test_set(images: np.ndarray, labels: np.ndarray, *, deterministic: bool, seq_len: int,
                    ndigits: int = 2, max_speed: int = 4, seed: int = 42,
                    n_videos: int | None = None) -> dict[str, np.ndarray]:
  """The official test-set arrays from test digits in IDX order (``n_videos`` defaults to N // ndigits).

  Returns ``sequences`` (T, N, 64, 64) uint8, ``latents`` (T, N, ndigits, 4) int64, ``labels``
  (N, ndigits) uint8 and ``digits`` (N, ndigits, 28, 28) uint8.
  """
  rng = np.random.RandomState(seed)  # The same stream as the official np.random.seed(seed).
  perm = rng.permutation(len(images))
  n_videos = len(images) // ndigits if n_videos is None else n_videos
  if n_videos * ndigits > len(images):
    raise ValueError(f'{n_videos} videos of {ndigits} digits need {n_videos * ndigits} digits; '
                     f'only {len(images)} given')
  chosen = perm[:n_videos * ndigits].reshape(n_videos, ndigits)
  latents = np.empty((n_videos, ndigits, seq_len, 4), dtype=np.int64)
  for i in range(n_videos):
    for n in range(ndigits):
      latents[i, n] = mmnist.scalar_trajectory(rng, seq_len, deterministic=deterministic, max_speed=max_speed,
                                               digit_size=images.shape[1])
  digits = np.asarray(images, dtype=np.uint8)[chosen]
  sequences = np.empty((seq_len, n_videos, mmnist.FRAME_SIZE, mmnist.FRAME_SIZE), dtype=np.uint8)
  for start in range(0, n_videos, RENDER_CHUNK):  # Chunks bound the float32 canvas memory.
    stop = min(start + RENDER_CHUNK, n_videos)
    sequences[:, start:stop] = mmnist.render(digits[start:stop], latents[start:stop]).transpose(1, 0, 2, 3)
  return dict(sequences=sequences,
              latents=np.ascontiguousarray(latents.transpose(2, 0, 1, 3)),
              labels=np.asarray(labels, dtype=np.uint8)[chosen], digits=digits)


def write_mmnist_test_set(data_dir: str, *, deterministic: bool, seq_len: int | None = None, source: str = 'auto',
                          ndigits: int = 2, max_speed: int = 4, seed: int = 42) -> str:
  """Writes the official Moving MNIST test file into ``data_dir`` (digits from ``data_dir``); returns its path."""
  seq_len = DEFAULT_SEQ_LEN[deterministic] if seq_len is None else seq_len
  test = mnist.load_digits(data_dir, 'test', source)
  arrays = mmnist_test_set(test.images, test.labels, deterministic=deterministic, seq_len=seq_len, ndigits=ndigits,
                           max_speed=max_speed, seed=seed)
  os.makedirs(data_dir, exist_ok=True)
  standin = test.source == mnist.STANDIN_NAME
  path = os.path.join(data_dir, mmnist.test_set_filename(deterministic, ndigits, standin))
  np.savez_compressed(path, **arrays)
  return path


def mmnist_main(argv: Sequence[str]) -> None:
  """Command line of the Moving MNIST handler."""
  parser = argparse.ArgumentParser(prog='python -m srvp_jax.data.make_test_set mmnist',
                                   description='Generates the official (stochastic or deterministic) Moving MNIST '
                                               'test set from the MNIST test digits.')
  parser.add_argument('--data_dir', required=True, metavar='DIR',
                      help='Folder with the MNIST IDX files; the test set is written there.')
  parser.add_argument('--deterministic', action='store_true', help='Deterministic bounces (mmnist_test_...).')
  parser.add_argument('--seq_len', type=int, default=None, metavar='T',
                      help='Frames per video (default: 25 stochastic, 100 deterministic, as in the paper).')
  parser.add_argument('--source', choices=mnist.SOURCES, default='auto',
                      help="Digits: 'auto' (IDX files in data_dir, else TFDS), 'idx', 'tfds', or 'standin' "
                           '(scikit-learn digits, NOT MNIST; writes a separately named file).')
  parser.add_argument('--ndigits', type=int, default=2, help='Digits per video (official: 2).')
  parser.add_argument('--max_speed', type=int, default=4, help='Maximum speed (official: 4).')
  parser.add_argument('--seed', type=int, default=42, help='Seed of the legacy NumPy generator (official: 42).')
  args = parser.parse_args(argv)
  try:
    path = write_mmnist_test_set(args.data_dir, deterministic=args.deterministic, seq_len=args.seq_len,
                                 source=args.source, ndigits=args.ndigits, max_speed=args.max_speed, seed=args.seed)
  except (mnist.MnistNotFoundError, mnist.IdxFormatError) as e:
    raise SystemExit(f'error: {e}') from None
  print(f'Saved the Moving MNIST test set at {path}')


# Dataset name -> handler of the remaining command-line arguments.
HANDLERS: dict[str, Callable[[Sequence[str]], int | None]] = {
    'mmnist': mmnist_main,
    'kth': video_datasets_cli.make_test_set_kth,
    'human': video_datasets_cli.make_test_set_human,
}


def main(argv: Sequence[str] | None = None) -> None:
  """Dispatches on the first argument (the dataset) to its handler."""
  argv = list(sys.argv[1:] if argv is None else argv)
  names = ', '.join(sorted(HANDLERS))
  if not argv or argv[0] in ('-h', '--help'):
    print(f'usage: python -m srvp_jax.data.make_test_set DATASET [options]   (DATASET: {names}; '
          'DATASET --help for its options)')
    raise SystemExit(0 if argv else 2)
  if argv[0] not in HANDLERS:
    raise SystemExit(f'error: unknown dataset {argv[0]!r}; choose one of: {names}')
  status = HANDLERS[argv[0]](argv[1:])
  if status:
    raise SystemExit(status)


if __name__ == '__main__':
  main()
