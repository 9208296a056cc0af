"""Moving MNIST (stochastic and deterministic): trajectories, rendering, the dataset, the official test files.

Two implementations of the trajectory process of docs/srvp.md section 7 (bounces on the frame edges, with new
random speeds at each bounce in the stochastic version):
- ``scalar_trajectory``: one trajectory drawn from a legacy ``numpy.random.RandomState`` (or the
  ``numpy.random`` module) with the official order of draws. The test sets use it so that they are
  byte-identical with the official ones.
- ``trajectories``: the same process vectorised over many trajectories with NumPy masks (the bounce
  loop only runs while some trajectory is still out of the frame); it feeds the training stream.
  Given the same initial states, the deterministic version gives exactly the scalar trajectories.

Layouts: a trajectory tuple is (round(row), round(col), row speed, col speed) as int64; our videos are
(batch, time, H, W, C).
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Mapping, NamedTuple

import numpy as np

from srvp_jax.config import FRAME_SIZE
from srvp_jax.data import DataError, base, mnist
from srvp_jax.data.pipeline import official_val_split, to_float

EPS = 1e-8  # Tolerance of the official bounce computation.


class MovingMnistSample(NamedTuple):
  """Videos (B, T, H, W) uint8 with their trajectories (B, ndigits, T, 4) and digit indices."""
  videos: np.ndarray
  latents: np.ndarray
  digit_index: np.ndarray


# ----------------------------------------------------------------------------------------------------
# Scalar process (official order of random draws).

def scalar_trajectory(rng: Any, seq_len: int, *, deterministic: bool, max_speed: int = 4,
                      frame_size: int = FRAME_SIZE, digit_size: int = mnist.DIGIT_SIZE,
                      init: tuple[int, int, int, int] | None = None) -> np.ndarray:
  """One trajectory (seq_len, 4) int64 drawn with ``rng.randint`` (legacy semantics, official order).

  ``init`` = (row, col, row speed, col speed) replaces the four initial draws.
  """
  lim = frame_size - digit_size
  if init is None:
    row, col = rng.randint(0, lim + 1), rng.randint(0, lim + 1)
    drow, dcol = rng.randint(-max_speed, max_speed + 1), rng.randint(-max_speed, max_speed + 1)
  else:
    row, col, drow, dcol = (int(v) for v in init)
  out = []
  for _ in range(seq_len):
    row, col, drow, dcol = _scalar_bounce(rng, row, col, drow, dcol, lim, deterministic, max_speed)
    out.append((round(row), round(col), drow, dcol))
    row += drow
    col += dcol
  return np.array(out, dtype=np.int64).reshape(seq_len, 4)


def _scalar_bounce(rng, row, col, drow, dcol, lim, deterministic, max_speed):
  """Resolves the bounces of one position that may lie outside [0, lim]^2 (docs/srvp.md section 7)."""
  lo_r, hi_r, lo_c, hi_c = row < -EPS, row > lim + EPS, col < -EPS, col > lim + EPS
  point = None  # Persists across the loop's iterations, as in the official code.
  while lo_r or hi_r or lo_c or hi_c:
    if drow == 0:
      point = (row, 0 if lo_c else lim)
    elif dcol == 0:
      point = (0 if lo_r else lim, col)
    else:
      a = dcol / drow
      b = col - a * row
      if lo_r:
        cross = a * 0 + b
        lo_r = -EPS <= cross <= lim + EPS
        point = (0, cross) if lo_r else point
      if hi_r:
        cross = a * lim + b
        hi_r = -EPS <= cross <= lim + EPS
        point = (lim, cross) if hi_r else point
      if lo_c:
        cross = (0 - b) / a
        lo_c = -EPS <= cross <= lim + EPS
        point = (cross, 0) if lo_c else point
      if hi_c:
        cross = (lim - b) / a
        hi_c = -EPS <= cross <= lim + EPS
        point = (cross, lim) if hi_c else point
    if point is None:
      raise RuntimeError(f'no edge crossing found for position ({row}, {col}) speed ({drow}, {dcol})')
    frac = (row - point[0]) / drow if drow != 0 else (col - point[1]) / dcol
    if not deterministic:
      drow = rng.randint(-max_speed, max_speed + 1)
      dcol = rng.randint(-max_speed, max_speed + 1)
    if lo_r:
      drow = abs(drow)
    if hi_r:
      drow = -abs(drow)
    if lo_c:
      dcol = abs(dcol)
    if hi_c:
      dcol = -abs(dcol)
    row = point[0] + drow * frac
    col = point[1] + dcol * frac
    lo_r, hi_r, lo_c, hi_c = row < -EPS, row > lim + EPS, col < -EPS, col > lim + EPS
  return row, col, drow, dcol


# ----------------------------------------------------------------------------------------------------
# Vectorised process (training).

def _integers(rng: Any, low: int, high: int, size: int) -> np.ndarray:
  """Uniform int64 in [low, high) from a ``Generator`` or a legacy ``RandomState``."""
  draw = rng.integers if hasattr(rng, 'integers') else rng.randint
  return np.asarray(draw(low, high, size=size), dtype=np.int64)


def trajectories(rng: Any, n: int, seq_len: int, *, deterministic: bool, max_speed: int = 4,
                 frame_size: int = FRAME_SIZE, digit_size: int = mnist.DIGIT_SIZE,
                 init: np.ndarray | None = None) -> np.ndarray:
  """``n`` independent trajectories (n, seq_len, 4) int64, vectorised over trajectories.

  ``init`` (n, 4) = initial (row, col, row speed, col speed); drawn from ``rng`` when None.
  """
  lim = frame_size - digit_size
  if init is None:
    init = np.stack([_integers(rng, 0, lim + 1, n), _integers(rng, 0, lim + 1, n),
                     _integers(rng, -max_speed, max_speed + 1, n), _integers(rng, -max_speed, max_speed + 1, n)], 1)
  init = np.asarray(init)
  if init.shape != (n, 4):
    raise ValueError(f'init has shape {init.shape}; expected ({n}, 4) rows of (row, col, row speed, col speed)')
  row, col = init[:, 0].astype(np.float64), init[:, 1].astype(np.float64)
  drow, dcol = init[:, 2].astype(np.int64), init[:, 3].astype(np.int64)
  out = np.empty((n, seq_len, 4), dtype=np.int64)
  for t in range(seq_len):
    _vector_bounce(rng, row, col, drow, dcol, lim, deterministic, max_speed)
    out[:, t, 0] = np.rint(row)
    out[:, t, 1] = np.rint(col)
    out[:, t, 2] = drow
    out[:, t, 3] = dcol
    row += drow
    col += dcol
  return out


def _vector_bounce(rng, row, col, drow, dcol, lim, deterministic, max_speed):
  """In-place vectorised ``_scalar_bounce`` over all trajectories (loops while any is out)."""
  out = (row < -EPS) | (row > lim + EPS) | (col < -EPS) | (col > lim + EPS)
  if not out.any():
    return
  idx = np.flatnonzero(out)
  r, c, dr, dc = row[idx], col[idx], drow[idx], dcol[idx]
  pr, pc = np.zeros_like(r), np.zeros_like(c)
  has_point = np.zeros(len(idx), dtype=bool)
  while True:
    lo_r, hi_r, lo_c, hi_c = r < -EPS, r > lim + EPS, c < -EPS, c > lim + EPS
    active = lo_r | hi_r | lo_c | hi_c
    if not active.any():
      break
    still = ~active  # Trajectories already resolved keep their values.
    vert = active & (dr == 0)
    horiz = active & (dr != 0) & (dc == 0)
    slope = active & (dr != 0) & (dc != 0)
    pr = np.where(vert, r, np.where(horiz, np.where(lo_r, 0.0, float(lim)), pr))
    pc = np.where(vert, np.where(lo_c, 0.0, float(lim)), np.where(horiz, c, pc))
    has_point |= vert | horiz
    with np.errstate(divide='ignore', invalid='ignore'):
      a = np.where(slope, dc / np.where(dr == 0, 1, dr), 1.0)
      b = c - a * r
      for flag, edge, is_row in ((lo_r, 0.0, True), (hi_r, float(lim), True), (lo_c, 0.0, False),
                                 (hi_c, float(lim), False)):
        m = slope & flag
        cross = a * edge + b if is_row else (edge - b) / a
        keep = (cross >= -EPS) & (cross <= lim + EPS)
        flag &= ~(m & ~keep)
        hit = m & keep
        pr = np.where(hit, edge if is_row else cross, pr)
        pc = np.where(hit, cross if is_row else edge, pc)
        has_point |= hit
      if not has_point[active].all():
        raise RuntimeError('no edge crossing found for an out-of-frame trajectory')
      frac = np.where(dr != 0, (r - pr) / np.where(dr == 0, 1, dr), (c - pc) / np.where(dc == 0, 1, dc))
    new_dr, new_dc = dr, dc
    if not deterministic:
      k = int(active.sum())
      new_dr, new_dc = dr.copy(), dc.copy()
      draws = _integers(rng, -max_speed, max_speed + 1, 2 * k)
      new_dr[active], new_dc[active] = draws[:k], draws[k:]
    new_dr = np.where(lo_r, np.abs(new_dr), np.where(hi_r, -np.abs(new_dr), new_dr))
    new_dc = np.where(lo_c, np.abs(new_dc), np.where(hi_c, -np.abs(new_dc), new_dc))
    r = np.where(still, r, pr + new_dr * frac)
    c = np.where(still, c, pc + new_dc * frac)
    dr, dc = new_dr, new_dc
  row[idx], col[idx], drow[idx], dcol[idx] = r, c, dr, dc


# ----------------------------------------------------------------------------------------------------
# Rendering and sampling.

def render(images: np.ndarray, latents: np.ndarray, frame_size: int = FRAME_SIZE) -> np.ndarray:
  """Videos (B, T, H, W) uint8: digits (B, ndigits, h, w) summed at the positions of latents (B, ndigits, T, 4),
  clipped at 255 (the official float sum of uint8 digits, which is integer-valued)."""
  n, ndigits, h, w = images.shape
  seq_len = latents.shape[2]
  canvas = np.zeros((n, seq_len, frame_size, frame_size), dtype=np.uint8)
  # Writable view of every (h, w) window: one fancy-indexed block write per (video, frame, digit).
  windows = np.lib.stride_tricks.sliding_window_view(canvas, (h, w), axis=(2, 3), writeable=True)
  vid, frame = np.meshgrid(np.arange(n), np.arange(seq_len), indexing='ij')
  for d in range(ndigits):
    at = (vid, frame, latents[:, d, :, 0], latents[:, d, :, 1])
    digit = np.asarray(images[:, d, None], dtype=np.uint8)
    if d == 0:
      windows[at] = digit  # The canvas is empty: writing equals adding, without reading it back.
    else:
      # Sums only exceed 255 where this digit lands; clipping as we go equals clipping the total (values >= 0).
      windows[at] = np.minimum(windows[at] + digit.astype(np.uint16), 255)
  return canvas


def sample_videos(rng: np.random.Generator, digits: np.ndarray, batch_size: int, seq_len: int, *,
                  deterministic: bool, ndigits: int = 2, max_speed: int = 4) -> MovingMnistSample:
  """Random Moving MNIST videos: per digit slot a digit drawn uniformly (randint) and its trajectory."""
  if len(digits) == 0:
    raise ValueError('no digits to draw from; check the MNIST source and split')
  index = _integers(rng, 0, len(digits), batch_size * ndigits).reshape(batch_size, ndigits)
  lat = trajectories(rng, batch_size * ndigits, seq_len, deterministic=deterministic, max_speed=max_speed,
                     frame_size=FRAME_SIZE, digit_size=digits.shape[1])
  lat = lat.reshape(batch_size, ndigits, seq_len, 4)
  return MovingMnistSample(render(digits[index], lat), lat, index)


def generate_batch(rng: np.random.Generator, batch_size: int, *, digits: np.ndarray, seq_len: int,
                   deterministic: bool, ndigits: int = 2, max_speed: int = 4) -> np.ndarray:
  """A training batch (B, T, 64, 64, 1) float32 in [0, 1] (the official uint8 / 255)."""
  videos = sample_videos(rng, digits, batch_size, seq_len, deterministic=deterministic, ndigits=ndigits,
                         max_speed=max_speed).videos
  return to_float(videos[..., None])


# ----------------------------------------------------------------------------------------------------
# The dataset.

def is_deterministic(cfg: Mapping[str, Any]) -> bool:
  """Deterministic bounces for dataset 'mmnist' or the official 'smmnist' + deterministic flag."""
  return cfg['dataset'] == 'mmnist' or bool(cfg['deterministic'])


def test_set_filename(deterministic: bool, ndigits: int = 2, standin: bool = False) -> str:
  """Official name (``smmnist_test_2digits_64.npz`` / ``mmnist_...``); stand-in sets are prefixed."""
  name = f"{'' if deterministic else 's'}mmnist_test_{ndigits}digits_{FRAME_SIZE}.npz"
  return f'{mnist.STANDIN_NAME}_{name}' if standin else name


class MovingMnist(base.Dataset):
  """Stochastic ('smmnist') or deterministic ('mmnist') Moving MNIST, generated on the fly from MNIST digits.

  Training batch k is ``generate_batch(step_rng(seed, k, process), ...)`` on the training digits (official
  95/5 split of the MNIST training digits, in IDX order); validation batch k uses ``step_rng(seed, k)`` on
  the validation digits.
  """

  name = 'mmnist'
  title = 'Moving MNIST'
  nc = 1
  paper = dict(batch_size=128, seq_len=15, steps_per_s=100.0)

  def __init__(self, cfg, data_dir=None):
    super().__init__(cfg, data_dir)
    self._digits: dict[str, np.ndarray] = {}

  @property
  def source(self) -> str:
    return str((self.cfg or {}).get('digits_source', 'auto'))

  def digits(self, fold: str) -> np.ndarray:
    """Training or validation digits: the official 95/5 split of the MNIST training digits, in original order."""
    with self._lock:
      if fold not in self._digits:
        images = mnist.load_digits(self.data_dir, 'train', self.source).images
        self._digits[fold] = images[np.sort(official_val_split(len(images), fold == 'train'))]
      return self._digits[fold]

  def check_train(self):
    if int(self.cfg['nc']) != 1:
      raise DataError(f"Moving MNIST videos are grey: set nc=1 (got nc={self.cfg['nc']})")
    self.digits('train')

  def batch(self, rng, batch_size, split):
    return generate_batch(rng, batch_size, digits=self.digits(split), seq_len=self.seq_len(split),
                          deterministic=is_deterministic(self.cfg), ndigits=int(self.cfg['ndigits']),
                          max_speed=int(self.cfg['max_speed']))

  def describe_source(self):
    return f'generated on the fly from the {self.source} MNIST digits of {self.data_dir}'

  # Test sets. ------------------------------------------------------------------------------------------------

  def test_set(self, seq_len=None):
    return load_test_set(self.data_dir, is_deterministic(self.cfg), seq_len, ndigits=int(self.cfg['ndigits']),
                         standin=self.source == 'standin')


DEFAULT_TEST_LEN = {False: 25, True: 100}  # Keyed by ``deterministic`` (the paper's test sets).


def load_test_set(data_dir: str, deterministic: bool, seq_len: int | None = None, *, ndigits: int = 2,
                  standin: bool = False) -> np.ndarray:
  """Test videos (N, T, 64, 64, 1) uint8 from the official file; ``seq_len`` keeps the first frames."""
  path = os.path.join(data_dir, test_set_filename(deterministic, ndigits, standin))
  flags = (' --deterministic' if deterministic else '') + (' --source standin' if standin else '')
  make = base.command('make_test_set', 'mmnist', data_dir, flags)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Moving MNIST test set {path} not found; create it with `{make}`')
  try:
    with np.load(path) as data:
      sequences = data['sequences']
  except KeyError:
    raise DataError(f'{path} has no `sequences` array; create it again with `{make}`') from None
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise DataError(f'Moving MNIST test file {path} is unreadable ({type(e).__name__}: {e}); create it again with '
                    f'`{make}`') from None
  if sequences.ndim != 4 or sequences.shape[2:] != (FRAME_SIZE, FRAME_SIZE) or sequences.dtype != np.uint8:
    raise DataError(f'{path}: sequences are {sequences.dtype} {sequences.shape}, expected uint8 (T, N, 64, 64)')
  if seq_len is not None:
    if seq_len > sequences.shape[0]:
      raise DataError(f'{path} has {sequences.shape[0]} frames per video, fewer than seq_len={seq_len}; '
                      f'create it again with `{make} --seq_len {seq_len}`')
    sequences = sequences[:seq_len]
  return np.ascontiguousarray(sequences.transpose(1, 0, 2, 3))[..., None]
