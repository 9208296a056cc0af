"""Sources of 28x28 uint8 MNIST digits (and labels), always in the order of the original IDX files.

Why the order matters: the official Moving MNIST test sets index the test digits through a seeded
permutation, so the same permutation only picks the same digits if the digits are in IDX order.

Sources:
- ``idx``: the standard IDX files (``train-images-idx3-ubyte``, ``t10k-images-idx3-ubyte``, labels
  likewise), plain or ``.gz``, in ``data_dir`` or in torchvision's ``data_dir/MNIST/raw`` (where the
  official code downloads them).
- ``tfds``: TensorFlow Datasets' ``mnist`` (downloaded and prepared when online). TFDS stores the
  examples shuffled by the MD5 hash of their key; the key is the IDX index, so the IDX order is
  restored exactly.
- ``standin``: ``sklearn_digits_standin``, scikit-learn's bundled 8x8 handwritten digits upscaled and
  centred like MNIST. It needs no download (quick start, tests) but it is NOT MNIST: results on it
  are not comparable with the paper.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import socket
import zlib
from typing import NamedTuple

import numpy as np
from PIL import Image

from srvp_jax import import_order
from srvp_jax.data import DataError

SPLITS = ('train', 'test')
SOURCES = ('auto', 'idx', 'tfds', 'standin')
STANDIN_NAME = 'sklearn_digits_standin'
DIGIT_SIZE = 28
# IDX file stems per split: (images, labels).
IDX_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
# Number of stand-in training digits; the remaining 297 of the 1797 are its test split.
STANDIN_N_TRAIN = 1500
TFDS_HOST = 'storage.googleapis.com'

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
               0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}

log = logging.getLogger(__name__)


class MnistNotFoundError(FileNotFoundError):
  """No MNIST digits could be obtained from the requested source."""


class IdxFormatError(DataError):
  """A file is not a valid IDX file of the expected kind."""


class Digits(NamedTuple):
  """Digit images (N, 28, 28) uint8, their labels (N,) uint8 and the name of their source."""
  images: np.ndarray
  labels: np.ndarray
  source: str


def read_idx(path: str) -> np.ndarray:
  """Parses an IDX file (plain or gzipped): magic number, big-endian dimensions, then the data."""
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise IdxFormatError(f'cannot read {path} ({type(e).__name__}: {e}); delete it and download it again '
                         f'(python -m srvp_jax.data download mmnist --data_dir DIR)') from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise IdxFormatError(f'{path} is not an IDX file (bad magic number {raw[:4].hex()}); '
                         'use the original MNIST files')
  dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise IdxFormatError(f'{path} is truncated (incomplete IDX header); re-download it')
  shape = tuple(int(d) for d in np.frombuffer(raw, dtype='>u4', count=ndim, offset=4))
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(raw) - header != expected:
    raise IdxFormatError(f'{path} holds {len(raw) - header} data bytes but its header announces {expected} '
                         f'(shape {shape}); re-download it')
  data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
  return data.astype(dtype.newbyteorder('='), copy=True)


def find_idx_files(data_dir: str, split: str) -> tuple[str, str] | None:
  """Paths of the (images, labels) IDX files of ``split`` in ``data_dir`` (or its MNIST/raw), or None."""
  _check_split(split)
  found = []
  for stem in IDX_FILES[split]:
    candidates = [os.path.join(folder, stem + ext) for folder in (data_dir, os.path.join(data_dir, 'MNIST', 'raw'))
                  for ext in ('', '.gz')]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
      return None
    found.append(path)
  return found[0], found[1]


def load_idx(data_dir: str, split: str) -> Digits:
  """MNIST digits of ``split`` from the IDX files in ``data_dir``."""
  paths = find_idx_files(data_dir, split)
  if paths is None:
    stems = ', '.join(f'{s}[.gz]' for s in IDX_FILES[split])
    raise MnistNotFoundError(f'MNIST IDX files ({stems}) not found in {data_dir!r}; get them with '
                             f'`python -m srvp_jax.data download mmnist --data_dir {data_dir}`')
  images, labels = read_idx(paths[0]), read_idx(paths[1])
  if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE):
    raise IdxFormatError(f'{paths[0]} holds {images.dtype} images of shape {images.shape}, '
                         'not 28x28 uint8 MNIST digits; use the original MNIST image file')
  if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
    raise IdxFormatError(f'{paths[1]} holds {labels.dtype} labels of shape {labels.shape} for {len(images)} '
                         'images; use the matching MNIST label file')
  return Digits(images, labels, 'idx')


def tfds_order(split: str, n: int) -> np.ndarray:
  """Original IDX index of each example of a prepared TFDS ``mnist`` split, in TFDS file order.

  TFDS writes examples sorted by the 128-bit MD5 hash of (split name, example key); the ``mnist``
  builder uses the IDX index as key.
  """
  salted = hashlib.md5(split.encode('utf-8'))

  def key_hash(i):
    md5 = salted.copy()
    md5.update(str(i).encode('utf-8'))
    return int(md5.hexdigest(), 16)

  return np.array(sorted(range(n), key=key_hash), dtype=np.int64)


def _reachable(host: str, port: int = 443, timeout: float = 5.0) -> bool:
  """Whether a TCP connection to ``host`` opens (TFDS otherwise retries for minutes when offline)."""
  try:
    with socket.create_connection((host, port), timeout=timeout):
      return True
  except OSError:
    return False


def load_tfds(split: str, tfds_data_dir: str | None = None, download: bool = True) -> Digits:
  """MNIST digits of ``split`` from TensorFlow Datasets, restored to IDX order."""
  _check_split(split)
  hint = 'put the MNIST IDX files (train-images-idx3-ubyte.gz, ...) in data_dir instead'
  try:
    tfds = import_order.import_tensorflow_datasets()
  except ImportError as e:
    raise MnistNotFoundError(f'TensorFlow Datasets is unavailable ({e}); {hint}') from None
  try:
    builder = tfds.builder('mnist', data_dir=tfds_data_dir)
    if not builder.is_prepared():
      if not download:
        raise MnistNotFoundError(f'TFDS mnist is not prepared in {builder.data_dir} and downloading is disabled; '
                                 f'{hint}')
      if not _reachable(TFDS_HOST):
        raise MnistNotFoundError(f'TFDS mnist is not prepared and {TFDS_HOST} is unreachable (offline?); {hint}')
      builder.download_and_prepare()
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
  except MnistNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise MnistNotFoundError(f'TFDS mnist failed ({type(e).__name__}: {str(e)[:200]}); {hint}') from None
  images = np.asarray(data['image'], dtype=np.uint8)[..., 0]
  labels = np.asarray(data['label']).astype(np.uint8)
  if not builder.info.disable_shuffling:
    order = tfds_order(split, len(images))
    restored_images, restored_labels = np.empty_like(images), np.empty_like(labels)
    restored_images[order], restored_labels[order] = images, labels
    images, labels = restored_images, restored_labels
  return Digits(images, labels, 'tfds')


def load_standin(split: str) -> Digits:
  """``sklearn_digits_standin``: scikit-learn's 8x8 digits upscaled to 20x20, centred in 28x28, 0..255.

  Needs no download. It is NOT MNIST (1797 coarse digits): use it to try the code, not for results.
  """
  _check_split(split)
  try:
    from sklearn import datasets  # pylint: disable=import-outside-toplevel  # Seconds to import; stand-in only.
  except ImportError as e:
    raise MnistNotFoundError(f'the stand-in digits need scikit-learn ({e}): pip install scikit-learn') from None
  log.warning('Using %s: scikit-learn 8x8 digits upscaled to 28x28. This is NOT MNIST; '
              'results are not comparable with the paper.', STANDIN_NAME)
  bunch = datasets.load_digits()
  sel = slice(0, STANDIN_N_TRAIN) if split == 'train' else slice(STANDIN_N_TRAIN, None)
  small, labels = bunch.images[sel], bunch.target[sel]
  images = np.zeros((len(small), DIGIT_SIZE, DIGIT_SIZE), dtype=np.uint8)
  for i, img in enumerate(small):
    big = np.asarray(Image.fromarray(img.astype(np.float32)).resize((20, 20), Image.BICUBIC))
    images[i, 4:24, 4:24] = np.clip(np.rint(big * (255.0 / 16.0)), 0, 255).astype(np.uint8)
  return Digits(images, labels.astype(np.uint8), STANDIN_NAME)


@functools.lru_cache(maxsize=8)
def _load_cached(data_dir: str, split: str, source: str, tfds_data_dir: str | None) -> Digits:
  if source == 'standin':
    digits = load_standin(split)
  elif source == 'idx':
    digits = load_idx(data_dir, split)
  elif source == 'tfds':
    digits = load_tfds(split, tfds_data_dir)
  elif find_idx_files(data_dir, split) is not None:
    digits = load_idx(data_dir, split)
  else:
    try:
      digits = load_tfds(split, tfds_data_dir)
    except MnistNotFoundError as e:
      raise MnistNotFoundError(f'no MNIST IDX files in {data_dir!r} and {e}') from None
  digits.images.setflags(write=False)
  digits.labels.setflags(write=False)
  return digits


def load_digits(data_dir: str, split: str, source: str = 'auto', tfds_data_dir: str | None = None) -> Digits:
  """MNIST digits of ``split`` ('train' or 'test') in IDX order, from ``source``.

  'auto' reads the IDX files in ``data_dir`` when present, else TFDS ``mnist``. 'standin' is the
  offline ``sklearn_digits_standin`` (not MNIST). ``tfds_data_dir`` defaults to TFDS's own. Results are
  cached and read-only.
  """
  _check_split(split)
  if source not in SOURCES:
    raise ValueError(f'unknown digit source {source!r}; expected one of {SOURCES}')
  return _load_cached(os.path.abspath(data_dir or '.'), split, source, tfds_data_dir)


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"unknown MNIST split {split!r}; expected 'train' or 'test'")
