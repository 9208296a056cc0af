"""Human3.6M: training/validation streams and the official test set, from the official preprocessed data.

On-disk format (what the official ``preprocessing/human/convert.py`` writes, reproduced by ``convert``):
``DATA_DIR/train/S<subject>-<video name>.npz`` (subjects 1, 5, 6, 7, 8) and ``DATA_DIR/test/...npz``
(subjects 9, 11), uncompressed ``np.savez`` files with ``image`` uint8 (frames, 64, 64, 3) at the original
50 fps, ``filename`` and ``subject``. The official test set is the folder ``DATA_DIR/test_set_53_8/`` of
``test_<i>.npz`` files (i = 0..999) holding the same keys plus ``frame`` (start in the source video), with
``image`` the un-subsampled extract of (53 - 1) * 8 + 1 = 417 frames; made by ``make_test_set``.

Videos are memory-mapped rather than loaded (the official code loads the whole dataset in RAM): a clip
only reads the frames it keeps, and the OS page cache does the caching.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import zipfile
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from srvp_jax import config
from srvp_jax.data import pipeline
from srvp_jax.data.kth import CLI, MAKE_TEST_SET_CLI, NX, check_nc, fold_indices

TRAIN_SUBJECTS = (1, 5, 6, 7, 8)
TEST_SUBJECTS = (9, 11)
CROP_BOX = (100, 100, 900, 900)
TEST_LEN = 53
SUBSAMPLING = 8


def load_npz_array(path: str, key: str = 'image') -> np.ndarray:
  """Array ``key`` of an ``.npz`` file, memory-mapped when stored uncompressed (``np.savez``), else loaded."""
  member = f'{key}.npy'
  with zipfile.ZipFile(path) as z:
    info = z.getinfo(member)
    stored = info.compress_type == zipfile.ZIP_STORED
  if stored:
    with open(path, 'rb') as f:
      f.seek(info.header_offset)
      local = f.read(30)
      name_len, extra_len = struct.unpack('<HH', local[26:30])
      f.seek(info.header_offset + 30 + name_len + extra_len)
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
      else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
      offset = f.tell()
    if not dtype.hasobject:
      return np.memmap(path, dtype=dtype, mode='r', offset=offset, shape=shape, order='F' if fortran else 'C')
  with np.load(path) as f:
    return f[key]


def _clip(video: np.ndarray, start: int, length: int, step: int) -> np.ndarray:
  return np.asarray(video[start:start + (length - 1) * step + 1:step])


def _check_video(path: str, video: np.ndarray) -> None:
  if video.ndim != 4 or video.shape[1:] != (NX, NX, 3) or video.dtype != np.uint8:
    raise ValueError(f'{path}: image is {video.dtype} {video.shape}, expected uint8 (frames, 64, 64, 3)')


def _missing_train(data_dir: str) -> FileNotFoundError:
  return FileNotFoundError(
      f'Human3.6M videos not found: expected {os.path.join(data_dir, "train")}/S<subject>-<video>.npz (key image, '
      f'uint8 (frames, 64, 64, 3)); create them with `{CLI} convert human --data_dir {data_dir}` from the original '
      f'S<subject>/Videos/*.mp4 (licensed download from http://vision.imar.ro/human3.6m)')


def _video_frames(path: str) -> Iterator[np.ndarray]:
  """Decoded RGB frames of an original Human3.6M .mp4 (imageio's ffmpeg reader, as the official script)."""
  if importlib.util.find_spec('imageio_ffmpeg') is None:
    raise ImportError('reading Human3.6M .mp4 videos needs imageio-ffmpeg: pip install imageio imageio-ffmpeg')
  import imageio  # pylint: disable=import-outside-toplevel
  reader = imageio.get_reader(path, 'ffmpeg')
  try:
    yield from reader.iter_data()
  finally:
    reader.close()


def convert(data_dir: str) -> None:
  """Writes ``train/`` and ``test/`` npz videos from ``S<n>/Videos/*.mp4`` (official convert.py processing).

  Each frame is cropped to (100, 100, 900, 900) then resized to 64x64 with Lanczos; file names starting
  with '_' (the '_ALL' videos) are skipped.
  """
  for fold, subjects in (('train', TRAIN_SUBJECTS), ('test', TEST_SUBJECTS)):
    save_dir = os.path.join(data_dir, fold)
    os.makedirs(save_dir, exist_ok=True)
    for subject in subjects:
      subject_dir = os.path.join(data_dir, f'S{subject}', 'Videos')
      if not os.path.isdir(subject_dir):
        raise FileNotFoundError(f'Human3.6M videos of subject {subject} not found: expected {subject_dir}/*.mp4 '
                                '(extract the original .tgz archives of every subject into DATA_DIR)')
      for video_file in sorted(os.listdir(subject_dir)):
        if video_file.startswith('_'):
          continue
        frames = np.stack([
            np.array(Image.fromarray(frame).crop(CROP_BOX).resize((NX, NX), resample=Image.LANCZOS))
            for frame in _video_frames(os.path.join(subject_dir, video_file))])
        name = os.path.splitext(video_file)[0]
        np.savez(os.path.join(save_dir, f'S{subject}-{name}'), image=frames, filename=name, subject=subject)


class NpzVideos:
  """Memory-mapped ``image`` arrays of a list of npz videos (opened once; frames read on demand)."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)
    self.videos = [load_npz_array(p) for p in self.paths]
    for path, video in zip(self.paths, self.videos):
      _check_video(path, video)
    self.lengths = np.array([len(v) for v in self.videos], dtype=np.int64)

  def __len__(self) -> int:
    return len(self.videos)


_STORES: dict[str, NpzVideos] = {}


def _training_videos(data_dir: str) -> NpzVideos:
  """All training videos (both folds) in sorted file order, as the official dataset lists them; indexed once."""
  key = os.path.abspath(data_dir)
  if key not in _STORES:
    folder = os.path.join(data_dir, 'train')
    files = sorted(f for f in os.listdir(folder) if f.endswith('.npz')) if os.path.isdir(folder) else []
    if not files:
      raise _missing_train(data_dir)
    _STORES[key] = NpzVideos([os.path.join(folder, f) for f in files])
  return _STORES[key]


def _sampler(cfg: Mapping, fold: str, seq_len: int):
  """``make_batch(rng, b)``: uniform video among those long enough in ``fold``, uniform start, one frame in s."""
  check_nc(cfg, 3, 'Human3.6M')
  videos = _training_videos(cfg['data_dir'])
  step = int(cfg['subsampling'])
  span = (seq_len - 1) * step + 1
  idx = fold_indices(len(videos), fold)
  eligible = idx[videos.lengths[idx] >= span]
  if len(eligible) == 0:
    raise ValueError(f'no Human3.6M {fold} video has the {span} frames that seq_len={seq_len} with subsampling '
                     f'{step} needs')

  def make_batch(rng: np.random.Generator, batch_size: int) -> np.ndarray:
    picks = eligible[rng.integers(len(eligible), size=batch_size)]
    starts = rng.integers(videos.lengths[picks] - span + 1)
    batch = np.stack([_clip(videos.videos[v], int(t), seq_len, step) for v, t in zip(picks, starts)])
    return batch.astype(np.float32) / 255

  return make_batch


def train_batches(cfg: Mapping, *, batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0) -> Iterator[np.ndarray]:
  """Training stream, float32 (B, seq_len, 64, 64, 3) in [0, 1]; batch k is a pure function of (seed, k, process)."""
  make_batch = _sampler(cfg, 'train', int(cfg['seq_len']))
  return pipeline.step_indexed_batches(make_batch, batch_size=batch_size, seed=seed, start_step=start_step,
                                       process_index=process_index,
                                       num_parallel=int(cfg.get('num_data_workers', 4)))


def val_batches(cfg: Mapping, *, batch_size: int, seed: int, n_batches: int) -> Iterator[np.ndarray]:
  """Validation batches (random video and start among the 5% fold, as the official loader), fixed by ``seed``."""
  make_batch = _sampler(cfg, 'val', config.seq_len_test(cfg))
  rng = np.random.default_rng(seed)
  return (make_batch(rng, batch_size) for _ in range(n_batches))


def official_test_dir(data_dir: str, test_len: int = TEST_LEN, subsampling: int = SUBSAMPLING) -> str:
  """Folder of the official test extracts (``test_set_53_8`` by default)."""
  return os.path.join(data_dir, f'test_set_{test_len}_{subsampling}')


def load_test_set(data_dir: str, seq_len: int | None = None, *, test_len: int = TEST_LEN,
                  subsampling: int = SUBSAMPLING) -> np.ndarray:
  """The official test videos, uint8 (N, T, 64, 64, 3): one frame in ``subsampling`` of each stored extract.

  Files are read in sorted name order (test_0, test_1, test_10, ...), the order of the official test loader,
  so per-video results line up with the official ones. ``seq_len`` keeps the first frames (default all 53).
  """
  folder = official_test_dir(data_dir, test_len, subsampling)
  files = sorted(f for f in os.listdir(folder) if f.endswith('.npz')) if os.path.isdir(folder) else []
  if not files:
    raise FileNotFoundError(f'Human3.6M test set not found: expected {folder}/test_<i>.npz; create it with '
                            f'`{MAKE_TEST_SET_CLI} human --data_dir {data_dir}` (needs {data_dir}/test/*.npz)')
  seq_len = test_len if seq_len is None else int(seq_len)
  if seq_len > test_len:
    raise ValueError(f'seq_len={seq_len} exceeds the {test_len} frames of the Human3.6M test extracts in {folder}')
  span = (test_len - 1) * subsampling + 1
  out = np.empty((len(files), seq_len, NX, NX, 3), dtype=np.uint8)
  for i, name in enumerate(files):
    path = os.path.join(folder, name)
    video = load_npz_array(path)
    _check_video(path, video)
    if len(video) < span:
      raise ValueError(f'{path} holds {len(video)} frames, fewer than the {span} of a {test_len}-frame extract '
                       f'with subsampling {subsampling}')
    out[i] = _clip(video, 0, seq_len, subsampling)
  return out


def make_test_set(data_dir: str, *, size: int = 1000, seq_len: int = TEST_LEN, subsampling: int = SUBSAMPLING,
                  seed: int = 42) -> str:
  """Writes the official ``test_set_<seq_len>_<subsampling>/test_<i>.npz`` (official make_test_set.py draws).

  With NumPy's legacy generator seeded ``seed``, each extract draws a video index randint(n_videos) among
  the sorted ``test/`` files, then a start randint(n_frames - ((seq_len - 1) * subsampling + 1) + 1). Each
  file keeps the source video's keys, ``image`` cut to the un-subsampled extract, plus ``frame`` (the start).
  """
  source = os.path.join(data_dir, 'test')
  files = sorted(f for f in os.listdir(source) if f.endswith('.npz')) if os.path.isdir(source) else []
  if not files:
    raise FileNotFoundError(f'Human3.6M test videos not found: expected {source}/S<subject>-<video>.npz; create '
                            f'them with `{CLI} convert human --data_dir {data_dir}`')
  save_dir = official_test_dir(data_dir, seq_len, subsampling)
  os.makedirs(save_dir, exist_ok=True)
  span = (seq_len - 1) * subsampling + 1
  rng = np.random.RandomState(seed)
  for i in range(size):
    path = os.path.join(source, files[rng.randint(len(files))])
    video = load_npz_array(path)
    if len(video) < span:
      raise ValueError(f'{path} has {len(video)} frames, fewer than the {span} of a test extract')
    t0 = rng.randint(len(video) - span + 1)
    with np.load(path) as f:
      data = {k: (np.array(video[t0:t0 + span]) if k == 'image' else f[k]) for k in f.files}
    data['frame'] = t0
    np.savez(os.path.join(save_dir, f'test_{i}'), **data)
  return save_dir
