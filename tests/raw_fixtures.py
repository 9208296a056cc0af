"""Tiny datasets in the real raw formats, written inside a test's tmp folder.

- BAIR: ``softmotion30_44k/{train,test}/traj_<a>_to_<b>.tfrecords`` of ``tf.train.Example`` records with the
  real feature keys (``<t>/image_aux1/encoded`` and ``<t>/image_main/encoded`` raw 64x64x3 bytes,
  ``<t>/action`` 4 floats, ``<t>/endeffector_pos`` 3 floats, t = 0..29); a TFDS ``bair_robot_pushing_small``
  prepared from them by the TFDS builder's own example generator.
- KTH: 160x120 grey ``person<PP>_<action>_d<S>_uncomp.avi`` files (MPEG-4 part 2, as the originals), in
  ``<action>.zip`` archives or extracted under ``raw/<action>/``.
- Human3.6M: 1000x1002 ``S<n>/Videos/<action>.<camera>.mp4`` files (H.264), plus a '_ALL' video to skip.

Frames are smooth synthetic patterns (known exactly, so decoded values can be checked tightly), written
with the ffmpeg binary of imageio-ffmpeg.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from typing import Mapping, Sequence

import imageio_ffmpeg
import numpy as np

from srvp_jax import import_order

KTH_SIZE = (160, 120)  # (width, height) of the original KTH videos.
HUMAN_SIZE = (1000, 1002)  # (width, height) of the original Human3.6M videos.
BAIR_FRAMES = 30


def smooth_video(n_frames: int, height: int, width: int, channels: int, seed: int) -> np.ndarray:
  """uint8 (T, H, W, C): moving low-frequency waves, different per channel and seed (survive lossy codecs)."""
  rng = np.random.default_rng(seed)
  y = np.arange(height, dtype=np.float64)[:, None] / height
  x = np.arange(width, dtype=np.float64)[None, :] / width
  video = np.empty((n_frames, height, width, channels), dtype=np.uint8)
  params = rng.uniform([0.5, 0.5, 0.0, 0.02], [1.5, 1.5, 2 * np.pi, 0.08], size=(channels, 4))
  for c, (fy, fx, phase, speed) in enumerate(params):
    for t in range(n_frames):
      wave = np.sin(2 * np.pi * (fy * y + fx * x + speed * t) + phase) * np.cos(2 * np.pi * 0.7 * x - phase)
      video[t, :, :, c] = np.round(128 + 90 * wave).astype(np.uint8)
  return video


def write_video(path: str, frames: np.ndarray, *, fps: float, codec: str, quality: float | None = None,
                output_params: Sequence[str] = ()) -> None:
  """Writes uint8 (T, H, W, 3) frames with imageio-ffmpeg's ffmpeg (no resizing, yuv420p)."""
  frames = np.asarray(frames)
  writer = imageio_ffmpeg.write_frames(path, (frames.shape[2], frames.shape[1]), fps=fps, codec=codec,
                                       quality=quality, macro_block_size=1, output_params=list(output_params),
                                       ffmpeg_log_level='error')
  writer.send(None)
  for frame in frames:
    writer.send(np.ascontiguousarray(frame))
  writer.close()


# ---------------------------------------------------------------------------------------------------------------------
# BAIR.
# ---------------------------------------------------------------------------------------------------------------------

def bair_videos(n: int, seed: int) -> np.ndarray:
  """``n`` synthetic BAIR videos, uint8 (n, 30, 64, 64, 3), each distinct."""
  return np.stack([smooth_video(BAIR_FRAMES, 64, 64, 3, seed=seed * 1000 + i) for i in range(n)])


def _bair_example(tf, aux1: np.ndarray, main: np.ndarray, rng: np.random.Generator):
  feature = {}
  for t in range(BAIR_FRAMES):
    feature[f'{t}/action'] = tf.train.Feature(float_list=tf.train.FloatList(value=rng.normal(size=4)))
    feature[f'{t}/endeffector_pos'] = tf.train.Feature(float_list=tf.train.FloatList(value=rng.normal(size=3)))
    feature[f'{t}/image_aux1/encoded'] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[aux1[t].tobytes()]))
    feature[f'{t}/image_main/encoded'] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[main[t].tobytes()]))
  return tf.train.Example(features=tf.train.Features(feature=feature))


def write_bair_tfrecords(root: str, split: str, videos_per_file: Sequence[int], *, seed: int = 0,
                         first_index: int = 0) -> np.ndarray:
  """Writes ``root/<split>/traj_<a>_to_<b>.tfrecords`` (root is ``DIR/softmotion30_44k``).

  Files are named by their first and last video index like the originals (``traj_0_to_255``), so that their
  name order (the official order) differs from their index order once an index has more digits. Returns
  the ``image_aux1`` videos in the official order (files sorted by name, records in file order),
  uint8 (N, 30, 64, 64, 3). ``image_main`` holds other frames, so reading the wrong camera is caught.
  """
  tf = import_order.import_tensorflow()
  folder = os.path.join(root, split)
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  total = int(sum(videos_per_file))
  aux1 = bair_videos(total, seed=seed)
  main = 255 - aux1
  by_name, start = {}, 0
  for count in videos_per_file:
    index = first_index + start * 250  # Sparse indices: e.g. traj_0, traj_500, traj_1250 sort as 0, 1250, 500.
    name = f'traj_{index}_to_{index + count - 1}'
    with tf.io.TFRecordWriter(os.path.join(folder, f'{name}.tfrecords')) as writer:
      for i in range(start, start + count):
        writer.write(_bair_example(tf, aux1[i], main[i], rng).SerializeToString())
    by_name[name] = aux1[start:start + count]
    start += count
  return np.concatenate([by_name[name] for name in sorted(by_name)])


def prepare_bair_tfds(data_dir: str, softmotion_root: str) -> None:
  """Prepares TFDS ``bair_robot_pushing_small`` in ``data_dir`` from TFRecords at ``softmotion_root``.

  Runs the TFDS builder's own ``_generate_examples`` on the fixture files (only the download is replaced),
  so the result is the real TFDS on-disk format.
  """
  import_order.import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  official = type(tfds.builder('bair_robot_pushing_small', data_dir=data_dir))

  class LocalBair(official, skip_registration=True):  # pylint: disable=missing-class-docstring
    name = 'bair_robot_pushing_small'

    def _split_generators(self, dl_manager):
      del dl_manager
      return [tfds.core.SplitGenerator(name=split, gen_kwargs={'filedir': os.path.join(softmotion_root, split)})
              for split in ('train', 'test')]

  config = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
  LocalBair(data_dir=data_dir).download_and_prepare(download_config=config)


# ---------------------------------------------------------------------------------------------------------------------
# KTH.
# ---------------------------------------------------------------------------------------------------------------------

def kth_source_video(person: int, action: str, setting: int, n_frames: int) -> np.ndarray:
  """Grey synthetic source frames of a KTH video, uint8 (T, 120, 160)."""
  seed = zlib.crc32(f'{person} {action} {setting}'.encode())
  return smooth_video(n_frames, KTH_SIZE[1], KTH_SIZE[0], 1, seed=seed)[..., 0]


def write_kth_avi(path: str, frames: np.ndarray, *, fps: float = 25) -> None:
  """A grey KTH-like AVI (MPEG-4 part 2 at the finest quantiser, yuv420p) from uint8 (T, H, W) frames."""
  write_video(path, np.repeat(frames[..., None], 3, axis=-1), fps=fps, codec='mpeg4',
              output_params=['-qscale:v', '1'])


def write_kth(root: str, videos: Mapping[tuple[int, str, int], int], *, zipped: Sequence[str] = (),
              fps: float = 25) -> dict[str, np.ndarray]:
  """Writes KTH videos {(person, action, setting): n_frames} under ``root``.

  Classes in ``zipped`` go to ``root/<action>.zip`` (AVI files at the archive's top level, as the originals),
  the others to ``root/raw/<action>/``. Returns the source frames by video name (``person01_boxing_d1``).
  """
  sources = {}
  for (person, action, setting), n_frames in sorted(videos.items()):
    name = f'person{person:02d}_{action}_d{setting}'
    frames = kth_source_video(person, action, setting, n_frames)
    folder = os.path.join(root, 'raw', action)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f'{name}_uncomp.avi')
    write_kth_avi(path, frames, fps=fps)
    if action in zipped:
      with zipfile.ZipFile(os.path.join(root, f'{action}.zip'), 'a') as z:
        z.write(path, arcname=os.path.basename(path))
      os.remove(path)
    sources[name] = frames
  for action in zipped:
    folder = os.path.join(root, 'raw', action)
    if os.path.isdir(folder) and not os.listdir(folder):
      os.rmdir(folder)
  return sources


# ---------------------------------------------------------------------------------------------------------------------
# Human3.6M.
# ---------------------------------------------------------------------------------------------------------------------

def human_source_video(subject: int, action: str, camera: str, n_frames: int) -> np.ndarray:
  """RGB synthetic source frames of a Human3.6M video, uint8 (T, 1002, 1000, 3)."""
  seed = zlib.crc32(f'{subject} {action} {camera}'.encode())
  return smooth_video(n_frames, HUMAN_SIZE[1], HUMAN_SIZE[0], 3, seed=seed)


def write_human(root: str, videos: Mapping[tuple[int, str, str], int], *, fps: float = 50,
                with_all_video: bool = True) -> dict[str, np.ndarray]:
  """Writes ``root/S<n>/Videos/<action>.<camera>.mp4`` for {(subject, action, camera): n_frames} (H.264, near
  lossless), plus a small ``_ALL.<camera>.mp4`` per subject (the official conversion skips it) when asked.

  Returns the source frames by official npz name (``S1-Directions 1.54138969``).
  """
  sources = {}
  for (subject, action, camera), n_frames in sorted(videos.items()):
    folder = os.path.join(root, f'S{subject}', 'Videos')
    os.makedirs(folder, exist_ok=True)
    frames = human_source_video(subject, action, camera, n_frames)
    write_video(os.path.join(folder, f'{action}.{camera}.mp4'), frames, fps=fps, codec='libx264',
                output_params=['-crf', '4', '-preset', 'ultrafast'])
    sources[f'S{subject}-{action}.{camera}'] = frames
    if with_all_video and not os.path.exists(os.path.join(folder, f'_ALL.{camera}.mp4')):
      write_video(os.path.join(folder, f'_ALL.{camera}.mp4'), frames[:2, :64, :64], fps=fps, codec='libx264',
                  output_params=['-preset', 'ultrafast'])
  return sources
