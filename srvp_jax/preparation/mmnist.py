"""Moving MNIST's preparation: the MNIST download, the official test sets, inspection.

Videos are generated on the fly from the digits for training; the test sets are the official files,
byte for byte (NumPy's legacy generator seeded 42, ``srvp_jax.data.mmnist.scalar_trajectory``).
"""

from __future__ import annotations

import os

import numpy as np

from srvp_jax.data import base, mmnist, mnist
from srvp_jax.data.mmnist import DEFAULT_TEST_LEN, FRAME_SIZE, render, scalar_trajectory, test_set_filename
from srvp_jax.preparation import steps

MNIST_MIRRORS = ('https://ossci-datasets.s3.amazonaws.com/mnist/', 'http://yann.lecun.com/exdb/mnist/')
RENDER_CHUNK = 256  # Videos rendered at once.


def official_test_set(images: np.ndarray, labels: np.ndarray, *, deterministic: bool, seq_len: int,
                      ndigits: int = 2, max_speed: int = 4, seed: int = 42,
                      n_videos: int | None = None) -> dict[str, np.ndarray]:
  """The official test-set arrays from test digits in IDX order (``n_videos`` defaults to N // ndigits).

  The official procedure byte for byte: NumPy's legacy generator seeded 42, one permutation of the test
  digits, then for each video and each of its digits (digit ``perm[i * ndigits + n]``) one trajectory
  (docs/srvp.md section 7). Returns ``sequences`` (T, N, 64, 64) uint8, ``latents`` (T, N, ndigits, 4) int64,
  ``labels`` (N, ndigits) uint8 and ``digits`` (N, ndigits, 28, 28) uint8.
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
      latents[i, n] = scalar_trajectory(rng, seq_len, deterministic=deterministic, max_speed=max_speed,
                                        digit_size=images.shape[1])
  digits = np.asarray(images, dtype=np.uint8)[chosen]
  sequences = np.empty((seq_len, n_videos, FRAME_SIZE, FRAME_SIZE), dtype=np.uint8)
  for start in range(0, n_videos, RENDER_CHUNK):  # Chunks bound the float32 canvas memory.
    stop = min(start + RENDER_CHUNK, n_videos)
    sequences[:, start:stop] = render(digits[start:stop], latents[start:stop]).transpose(1, 0, 2, 3)
  return dict(sequences=sequences,
              latents=np.ascontiguousarray(latents.transpose(2, 0, 1, 3)),
              labels=np.asarray(labels, dtype=np.uint8)[chosen], digits=digits)


def write_test_set(data_dir: str, *, deterministic: bool, seq_len: int | None = None, source: str = 'auto',
                   ndigits: int = 2, max_speed: int = 4, seed: int = 42, n_videos: int | None = None) -> str:
  """Writes the official Moving MNIST test file into ``data_dir`` (digits from ``data_dir``); returns its path."""
  seq_len = DEFAULT_TEST_LEN[deterministic] if seq_len is None else seq_len
  test = mnist.load_digits(data_dir, 'test', source)
  arrays = official_test_set(test.images, test.labels, deterministic=deterministic, seq_len=seq_len, ndigits=ndigits,
                             max_speed=max_speed, seed=seed, n_videos=n_videos)
  os.makedirs(data_dir, exist_ok=True)
  standin = test.source == mnist.STANDIN_NAME
  path = os.path.join(data_dir, test_set_filename(deterministic, ndigits, standin))
  np.savez_compressed(path, **arrays)
  return path


class MovingMnist(steps.Preparation, mmnist.MovingMnist):
  """Moving MNIST with the data CLI's steps."""

  def make_test_set(self, deterministic: bool = False, seq_len: int | None = None, ndigits: int = 2,
                    max_speed: int = 4, seed: int = 42, size: int | None = None) -> str:
    """Writes the official test file (digits from ``data_dir`` or the configured source); returns its path."""
    return write_test_set(self.data_dir, deterministic=deterministic, seq_len=seq_len, source=self.source,
                          ndigits=ndigits, max_speed=max_speed, seed=seed, n_videos=size)

  def download(self) -> None:
    """Downloads the MNIST IDX files into ``DIR/MNIST/raw`` (torchvision's mirrors, as the official code)."""
    for stems in mnist.IDX_FILES.values():
      for stem in stems:
        dest = os.path.join(self.data_dir, 'MNIST', 'raw', f'{stem}.gz')
        errors = []
        for mirror in MNIST_MIRRORS:
          try:
            steps.download_file(mirror + f'{stem}.gz', dest)
            break
          except RuntimeError as e:
            errors.append(str(e))
        else:
          raise RuntimeError(errors[-1])
        mnist.read_idx(dest)  # A corrupt download is named now, not at training time.

  def prepare(self, source='auto', force=False, progress=True):
    del source, force, progress
    found = [split for split in mnist.SPLITS if mnist.find_idx_files(self.data_dir, split) is not None]
    missing = [s for s in mnist.SPLITS if s not in found]
    if missing:
      raise FileNotFoundError(f'MNIST IDX files of {" and ".join(missing)} not found in {self.data_dir}; get them with '
                              f'`{base.command("download", "mmnist", self.data_dir)}`')
    for split in found:
      mnist.load_idx(self.data_dir, split)  # Names a corrupt file.
    return [f'Moving MNIST needs no store: videos are generated from the MNIST digits in {self.data_dir}; next: '
            f'`{base.command("make_test_set", "mmnist", self.data_dir)}`']

  def inspect(self):
    lines = []
    for split in mnist.SPLITS:
      paths = mnist.find_idx_files(self.data_dir, split)
      if paths is None:
        lines.append(f'MNIST {split} digits: missing; get them with '
                     f'`{base.command("download", "mmnist", self.data_dir)}`')
        continue
      try:
        n = len(mnist.load_idx(self.data_dir, split).images)
        lines.append(f'MNIST {split} digits: {n} (IDX files {paths[0]}, {paths[1]})')
      except (mnist.IdxFormatError, OSError) as e:
        lines.append(f'MNIST {split} digits: BROKEN: {e}')
    for deterministic in (False, True):
      for standin in (False, True):
        path = os.path.join(self.data_dir, test_set_filename(deterministic, standin=standin))
        flags = (' --deterministic' if deterministic else '') + (' --source standin' if standin else '')
        if os.path.isfile(path):
          with np.load(path) as f:
            shape = f['sequences'].shape
          lines.append(f'test set {os.path.basename(path)}: {shape[1]} videos of {shape[0]} frames')
        elif not standin:
          lines.append(f'test set {os.path.basename(path)}: missing; make it with '
                       f'`{base.command("make_test_set", "mmnist", self.data_dir, flags)}`')
    return lines
