"""Human3.6M's preparation: the original MP4 reader, the store, the official test set, inspection.

The original videos are the extracted ``S<n>/Videos/<action>.<camera>.mp4`` files: every frame (50 fps)
cropped to (100, 100, 900, 900) then resized to 64x64 with Lanczos, '_'-prefixed files skipped (official
``preprocessing/human/convert.py``). Subsampling happens when clips are drawn, not here. ``prepare``
packs them, or the official npz layout, into the video store. Human3.6M is a licensed download.
"""

from __future__ import annotations

import os
import re
from typing import Iterator, Sequence

import imageio_ffmpeg
import numpy as np
from PIL import Image

from srvp_jax import video_headers
from srvp_jax.data import DataError, base, human, store
from srvp_jax.data.base import NX
from srvp_jax.data.human import (CROP_BOX, SUBSAMPLING, TEST_LEN, TEST_SUBJECTS, TRAIN_SUBJECTS, load_npz_array,
                                 npz_files, official_test_dir)
from srvp_jax.preparation import raw, steps

HUMAN_SUBJECTS = tuple(sorted(TRAIN_SUBJECTS + TEST_SUBJECTS))
HUMAN_URL = 'http://vision.imar.ro/human3.6m'


def _human_sources(root: str, subjects: Sequence[int]) -> list[tuple[dict, str]]:
  """(meta, path) per video in the sorted order of the official npz names ``S<n>-<file stem>``."""
  missing = [s for s in subjects if not os.path.isdir(os.path.join(root, f'S{s}', 'Videos'))]
  if missing:
    listed = ', '.join(f'S{s}' for s in missing)
    raise raw.RawDataMissingError(
        f'Human3.6M videos of {listed} not found: expected {root}/S<n>/Videos/<action>.<camera>.mp4; extract each '
        f"subject's Videos .tgz archive (licensed download from {HUMAN_URL}) into {root}")
  sources = []
  for subject in subjects:
    folder = os.path.join(root, f'S{subject}', 'Videos')
    for file_name in os.listdir(folder):
      stem, ext = os.path.splitext(file_name)
      if file_name.startswith('_') or ext.lower() != '.mp4':
        continue
      action, _, camera = stem.rpartition('.')
      meta = {'subject': subject, 'action': action, 'camera': camera, 'name': f'S{subject}-{stem}'}
      sources.append((meta, os.path.join(folder, file_name)))
  if not sources:
    raise raw.RawDataMissingError(f'no Human3.6M .mp4 video under {root}/S<n>/Videos; extract the Videos .tgz '
                                  f'archives (licensed download from {HUMAN_URL}) into {root}')
  return sorted(sources, key=lambda s: s[0]['name'])


def human_mp4_index(root: str, *, subjects: Sequence[int] = HUMAN_SUBJECTS) -> list[dict]:
  """Metadata of the videos ``human_mp4_videos`` yields, in the same order (nothing decoded)."""
  return [meta for meta, _ in _human_sources(root, subjects)]


def human_process_frame(frame: np.ndarray) -> np.ndarray:
  """The official processing of one RGB frame: crop to (100, 100, 900, 900), then Lanczos resize to 64x64."""
  return np.asarray(Image.fromarray(frame).crop(CROP_BOX).resize((NX, NX), resample=Image.LANCZOS))


def human_decode_mp4(path: str) -> np.ndarray:
  """Every frame of a Human3.6M MP4, processed as the official conversion, uint8 (T, 64, 64, 3).

  Frames are decoded to RGB24 by ffmpeg as imageio's ffmpeg reader does (the official script uses
  ``imageio.get_reader(path, 'ffmpeg').iter_data()``, which reads until the stream ends: every frame). A file
  that decodes to fewer frames than its duration declares (truncated) is an error (``video_headers``).
  """
  frames = []
  reader = imageio_ffmpeg.read_frames(path)
  try:
    meta = next(reader)
    width, height = meta['size']
    for buffer in reader:
      frames.append(human_process_frame(np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 3)))
  except (OSError, RuntimeError, KeyError, ValueError, StopIteration) as e:
    raise raw.CorruptRawFileError(f'Human3.6M video {path} cannot be decoded ({raw.first_line(e)}); extract it again '
                                  'from its .tgz archive') from None
  finally:
    reader.close()
  if not frames:
    raise raw.CorruptRawFileError(f'Human3.6M video {path} holds no frame; extract it again from its .tgz archive')
  missing = video_headers.missing_frames(path, len(frames), duration=meta.get('duration'), fps=meta.get('fps'))
  if missing is not None:
    raise raw.CorruptRawFileError(f'Human3.6M video {path} is truncated: it decodes to {missing}; extract it again '
                                  'from its .tgz archive')
  return np.stack(frames)


def _human_read(entry: tuple[dict, str]) -> tuple[dict, np.ndarray]:
  meta, path = entry
  return dict(meta), human_decode_mp4(path)


def human_mp4_videos(root: str, *, subjects: Sequence[int] = HUMAN_SUBJECTS,
                     workers: int = 1) -> Iterator[tuple[dict, np.ndarray]]:
  """Human3.6M videos from ``root/S<n>/Videos/*.mp4``: (meta, uint8 (T, 64, 64, 3)) at the original 50 fps.

  Exactly the ``image`` array the official conversion saves in ``train/`` or ``test/S<n>-<stem>.npz``
  (every camera; '_'-prefixed files such as '_ALL' skipped). Yields in sorted order of those npz names,
  so each split's videos come in the order of the official sorted file lists. Meta: ``{'subject': int,
  'action': 'Directions 1', 'camera': '54138969', 'name': 'S1-Directions 1.54138969'}``. Every subject of
  ``subjects`` must be there. ``workers`` decodes that many videos at once (order kept).
  """
  yield from base.ordered_map(_human_read, _human_sources(root, subjects), workers)


class Human(steps.ClipPreparation, human.Human):
  """Human3.6M with the data CLI's steps."""

  def make_test_set(self, size: int = 1000, seq_len: int = TEST_LEN, subsampling: int | None = None,
                    seed: int = 42) -> str:
    """Writes ``test_set_<seq_len>_<subsampling>/test_<i>.npz`` with the official draws (official make_test_set.py).

    With NumPy's legacy generator seeded ``seed``, each extract draws a video index randint(n_videos) among
    the sorted test videos, then a start randint(n_frames - ((seq_len - 1) * subsampling + 1) + 1). Each file
    keeps the source video's keys, ``image`` cut to the un-subsampled extract, plus ``frame`` (the start).
    Reads the official ``test/*.npz`` files when present, else the store's test split.
    """
    subsampling = self.step if subsampling is None else int(subsampling)
    folder = os.path.join(self.data_dir, 'test')
    files = npz_files(folder)
    if files:
      def source(i):
        path = os.path.join(folder, files[i])
        with np.load(path) as f:
          keys = {k: f[k] for k in f.files if k != 'image'}
        return path, load_npz_array(path), keys
      n_videos = len(files)
    elif self.has_store('test'):
      videos = store.StoreVideos(self.data_dir, 'test', self.name)

      def source(i):
        meta = videos.meta[i]
        return videos.names[i], videos.video(i), {'filename': meta['filename'], 'subject': meta['subject']}
      n_videos = len(videos)
    else:
      raise FileNotFoundError(self.missing('test'))
    save_dir = official_test_dir(self.data_dir, seq_len, subsampling)
    os.makedirs(save_dir, exist_ok=True)
    span = (seq_len - 1) * subsampling + 1
    rng = np.random.RandomState(seed)
    for i in range(size):
      name, video, keys = source(rng.randint(n_videos))
      if len(video) < span:
        raise DataError(f'Human3.6M test video {name} has {len(video)} frames, fewer than the {span} of a test '
                        'extract')
      t0 = rng.randint(len(video) - span + 1)
      np.savez(os.path.join(save_dir, f'test_{i}'), image=np.array(video[t0:t0 + span]), **keys, frame=t0)
    return save_dir

  def inspect(self):
    lines = super().inspect()
    folders = sorted(f for f in os.listdir(self.data_dir) if re.match(r'^test_set_\d+_\d+$', f))
    for f in folders:
      lines.append(f'test set {f}/: {len(npz_files(os.path.join(self.data_dir, f)))} extracts')
    if f'test_set_{TEST_LEN}_{SUBSAMPLING}' not in folders:
      lines.append(f'test set test_set_{TEST_LEN}_{SUBSAMPLING}/: missing; make it with '
                   f'`{base.command("make_test_set", "human", self.data_dir)}`')
    try:
      lines.append(f'original videos: {len(human_mp4_index(self.data_dir))} MP4 files (S<n>/Videos/)')
    except (FileNotFoundError, ValueError):
      lines.append('original videos: not found (S<n>/Videos/*.mp4 of every subject)')
    return lines

  def download(self) -> None:
    raise RuntimeError('Human3.6M is a licensed download: get the Videos .tgz archive of every subject from '
                       f'http://vision.imar.ro/human3.6m, extract them into {self.data_dir}, then run '
                       f'`{base.command("prepare", "human", self.data_dir)}`')

  def sources(self) -> dict:
    return {'npz': 'official npz files (train/, test/)', 'raw': 'original MP4 videos (S<n>/Videos/)'}

  def auto_source(self, **options):
    return 'npz' if all(self.official_videos(s) is not None for s in self.splits) else 'raw'

  def items(self, source, **options):
    return self._npz_items() if source == 'npz' else self._raw_items()

  def _npz_items(self) -> Iterator[tuple]:
    for split in self.splits:
      videos = self.official_videos(split)
      if videos is None:
        raise FileNotFoundError(f'Human3.6M official {split} files not found: expected '
                                f'{self.data_dir}/{split}/S<subject>-<video>.npz')
      for i in range(len(videos)):
        yield split, videos.names[i], videos.meta[i], np.asarray(videos.video(i))

  def _raw_items(self) -> Iterator[tuple]:
    for meta, video in human_mp4_videos(self.data_dir, workers=2):
      subject = int(meta['subject'])
      split = 'train' if subject in TRAIN_SUBJECTS else 'test'
      filename = meta['name'].split('-', 1)[1]
      yield split, meta['name'], {'subject': subject, 'filename': filename}, video
