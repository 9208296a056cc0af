"""Readers of the raw datasets as their owners distribute them, yielding whole videos as uint8 arrays.

Each reader gives, video for video, exactly what the official preprocessing script would store, without
writing its intermediate files (``prepare`` turns these videos into the video store):

- BAIR: ``softmotion30_44k/{train,test}/*.tfrecords`` (or a prepared TFDS ``bair_robot_pushing_small``),
  camera ``image_aux1``, 30 raw 64x64 RGB frames per video (official ``preprocessing/bair/convert.py``,
  which writes ``processed_data/<split>/<tfrecord name>/<k:03d>/<t:03d>.png``).
- KTH: the class archives ``<action>.zip`` or their ``person<PP>_<action>_d<S>_uncomp.avi`` files, one
  video per AVI file, decoded by ``ffmpeg -i AVI -r 25 -s 64x64`` to PNG and the first channel kept
  (official ``preprocessing/kth/convert.py`` and loader; docs/srvp.md section 6), with the ffmpeg binary of the
  ``imageio-ffmpeg`` wheel.
- Human3.6M: the extracted ``S<n>/Videos/<action>.<camera>.mp4`` files, every frame (50 fps) cropped to
  (100, 100, 900, 900) then resized to 64x64 with Lanczos, '_'-prefixed files skipped (official
  ``preprocessing/human/convert.py``; docs/srvp.md section 6). Subsampling happens when clips are drawn, not here.

Missing data raises ``RawDataMissingError`` and an unreadable file ``CorruptRawFileError``, both with a
one-line message naming the path and the fix. TensorFlow is imported only by the BAIR readers.
"""

from __future__ import annotations

import glob
import io
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zipfile
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from srvp_jax.data import base
from srvp_jax.data.human import CROP_BOX, TEST_SUBJECTS, TRAIN_SUBJECTS
from srvp_jax.data.kth import CLASSES as KTH_CLASSES
from srvp_jax.data.kth import NX

CLI = base.CLI
SPLITS = ('train', 'test')

BAIR_FRAMES = 30
BAIR_FRAME_KEY = '{t}/image_aux1/encoded'
BAIR_TFDS_NAME = 'bair_robot_pushing_small'
BAIR_VIDEOS = {'train': 43264, 'test': 256}  # Videos of the complete dataset (docs/srvp.md section 6).

KTH_FRAME_RATE = 25
KTH_AVI = re.compile(r'^person(\d{2})_([a-z]+)_(d\d)_uncomp\.avi$')
HUMAN_SUBJECTS = tuple(sorted(TRAIN_SUBJECTS + TEST_SUBJECTS))
HUMAN_URL = 'http://vision.imar.ro/human3.6m'

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


class RawDataMissingError(FileNotFoundError):
  """Raw data not found where expected; the message names what is missing and how to get it."""


class CorruptRawFileError(ValueError):
  """A raw file exists but cannot be read; the message names the file."""


def _first_line(text: str) -> str:
  lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
  return lines[0] if lines else 'unknown error'


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')


def _ffmpeg_exe() -> str:
  try:
    import imageio_ffmpeg  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError('decoding KTH / Human3.6M videos needs the ffmpeg of imageio-ffmpeg: '
                      'pip install imageio-ffmpeg') from None
  return imageio_ffmpeg.get_ffmpeg_exe()


# ---------------------------------------------------------------------------------------------------------------------
# BAIR.
# ---------------------------------------------------------------------------------------------------------------------

def bair_tfrecord_files(root: str, split: str) -> list[str]:
  """``root/<split>/*.tfrecords`` (root is ``DIR/softmotion30_44k``) in the official video order.

  The official dataset lists its PNG folders ``<tfrecord name>/<k>`` sorted, i.e. files sorted by name.
  """
  _check_split(split)
  folder = os.path.join(root, split)
  files = glob.glob(os.path.join(glob.escape(folder), '*.tfrecords'))
  if not files:
    data_dir = os.path.dirname(os.path.abspath(root))
    raise RawDataMissingError(f'BAIR {split} TFRecords not found: expected {folder}/*.tfrecords; get them with '
                              f'`{CLI} download bair --data_dir {data_dir}`')
  return sorted(files, key=lambda p: os.path.splitext(os.path.basename(p))[0])


def _bair_parser(tf):
  keys = [BAIR_FRAME_KEY.format(t=t) for t in range(BAIR_FRAMES)]
  spec = {k: tf.io.FixedLenFeature([], tf.string) for k in keys}

  def parse(record):
    features = tf.io.parse_single_example(record, spec)
    return tf.stack([features[k] for k in keys])

  return parse


def _bair_file_videos(tf, path: str, parse) -> Iterator[np.ndarray]:
  """Videos of one TFRecord file, in record order, uint8 (30, 64, 64, 3)."""
  frame_bytes = NX * NX * 3
  ds = tf.data.TFRecordDataset(path).map(parse)
  it = ds.as_numpy_iterator()
  k = 0
  while True:
    try:
      frames = next(it)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      raise CorruptRawFileError(f'BAIR TFRecord {path} is unreadable at record {k} ({_first_line(e.message)}); '
                                'download it again') from None
    sizes = {len(f) for f in frames}
    if sizes != {frame_bytes}:
      raise CorruptRawFileError(f'BAIR TFRecord {path}, record {k}: image_aux1 frames of {sorted(sizes)} bytes, '
                                f'expected raw 64x64x3 ({frame_bytes} bytes); download it again')
    yield np.frombuffer(b''.join(frames), dtype=np.uint8).reshape(BAIR_FRAMES, NX, NX, 3)
    k += 1


def bair_tfrecord_videos(root: str, split: str) -> Iterator[np.ndarray]:
  """BAIR videos of ``split`` from the original TFRecords, uint8 (30, 64, 64, 3), in the official order.

  ``root`` is ``DIR/softmotion30_44k``. Frames are the raw bytes of ``<t>/image_aux1/encoded`` read as a
  64x64 RGB image (as the official conversion's ``Image.frombytes``); files in name order, records in file
  order: video ``k`` (from 1) of ``<name>.tfrecords`` is the official ``processed_data/<split>/<name>/<k:03d>``.
  """
  files = bair_tfrecord_files(root, split)
  from srvp_jax.data import tf_utils  # pylint: disable=import-outside-toplevel
  tf = tf_utils.import_tensorflow()
  parse = _bair_parser(tf)
  for path in files:
    yield from _bair_file_videos(tf, path, parse)


def bair_tfrecord_index(root: str, split: str) -> list[tuple[str, int]]:
  """(tfrecord name, k) of each video ``bair_tfrecord_videos`` yields, k from 1 (official folder names).

  Counts the records of every file (reads the files, decodes nothing).
  """
  files = bair_tfrecord_files(root, split)
  from srvp_jax.data import tf_utils  # pylint: disable=import-outside-toplevel
  tf = tf_utils.import_tensorflow()
  index = []
  for path in files:
    try:
      n = int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda count, _: count + 1))
    except tf.errors.OpError as e:
      raise CorruptRawFileError(f'BAIR TFRecord {path} is unreadable ({_first_line(e.message)}); '
                                'download it again') from None
    name = os.path.splitext(os.path.basename(path))[0]
    index.extend((name, k) for k in range(1, n + 1))
  return index


def bair_tfrecord_count(root: str, split: str) -> int:
  """Number of videos of ``split`` in the original TFRecords (43,264 train, 256 test when complete)."""
  return len(bair_tfrecord_index(root, split))


def bair_tfds_videos(data_dir: str, split: str) -> Iterator[np.ndarray]:
  """BAIR videos of ``split`` from a prepared TFDS ``bair_robot_pushing_small``, uint8 (30, 64, 64, 3).

  Same videos and frames as the TFRecords (TFDS stores ``image_aux1`` losslessly as PNG), in TFDS's own
  order (examples hashed by key at preparation), not the official one. Nothing is downloaded.
  """
  _check_split(split)
  from srvp_jax.data import tf_utils  # pylint: disable=import-outside-toplevel
  tf_utils.import_tensorflow()
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError('reading TFDS bair_robot_pushing_small needs tensorflow-datasets: '
                      'pip install tensorflow-datasets') from None
  builder = tfds.builder(BAIR_TFDS_NAME, data_dir=data_dir)
  if not builder.is_prepared():
    raise RawDataMissingError(
        f'TFDS {BAIR_TFDS_NAME} is not prepared in {data_dir} (expected {builder.data_dir}/dataset_info.json); '
        f'prepare it with `tfds build {BAIR_TFDS_NAME} --data_dir {data_dir}`, or read the original TFRecords '
        f'(`{CLI} download bair --data_dir DIR`)')
  if split not in builder.info.splits:
    raise RawDataMissingError(f'TFDS {BAIR_TFDS_NAME} in {builder.data_dir} has no {split!r} split (has '
                              f'{sorted(builder.info.splits)}); prepare it again with `tfds build {BAIR_TFDS_NAME} '
                              f'--data_dir {data_dir}`')
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders={'image_main': tfds.decode.SkipDecoding()})
  for example in ds.as_numpy_iterator():
    video = example['image_aux1']
    if video.shape != (BAIR_FRAMES, NX, NX, 3) or video.dtype != np.uint8:
      raise CorruptRawFileError(f'TFDS {BAIR_TFDS_NAME} in {builder.data_dir}: image_aux1 is {video.dtype} '
                                f'{video.shape}, expected uint8 (30, 64, 64, 3); prepare it again')
    yield video


# ---------------------------------------------------------------------------------------------------------------------
# KTH.
# ---------------------------------------------------------------------------------------------------------------------

def _kth_meta(file_name: str) -> dict | None:
  match = KTH_AVI.match(file_name)
  if match is None:
    return None
  person, action, setting = match.groups()
  return {'person': int(person), 'action': action, 'setting': setting, 'name': file_name[:-len('_uncomp.avi')]}


def _kth_sources(root: str, classes: Sequence[str]) -> list[tuple[dict, str, str | None]]:
  """(meta, path, zip member or None) per video, by class (``classes`` order) then name; extracted files first."""
  if not os.path.isdir(root):
    raise RawDataMissingError(f'KTH data folder {root} not found; get the videos with '
                              f'`{CLI} download kth --data_dir {root}`')
  found: dict[str, tuple[dict, str, str | None]] = {}
  for folder in (root, *(os.path.join(root, a) for a in classes), *(os.path.join(root, 'raw', a) for a in classes)):
    if os.path.isdir(folder):
      for file_name in sorted(os.listdir(folder)):
        meta = _kth_meta(file_name)
        if meta is not None and meta['action'] in classes:
          found.setdefault(meta['name'], (meta, os.path.join(folder, file_name), None))
  for action in classes:
    for archive in (os.path.join(root, f'{action}.zip'), os.path.join(root, 'raw', f'{action}.zip')):
      if not os.path.isfile(archive):
        continue
      try:
        with zipfile.ZipFile(archive) as z:
          members = z.namelist()
      except (zipfile.BadZipFile, OSError) as e:
        raise CorruptRawFileError(f'KTH archive {archive} is unreadable ({e}); download it again') from None
      for member in members:
        meta = _kth_meta(os.path.basename(member))
        if meta is not None and meta['action'] == action:
          found.setdefault(meta['name'], (meta, archive, member))
  missing = [a for a in classes if not any(m['action'] == a for m, _, _ in found.values())]
  if missing:
    raise RawDataMissingError(
        f'KTH videos of {", ".join(missing)} not found under {root}: expected <action>.zip or '
        f'[raw/]<action>/person<PP>_<action>_d<S>_uncomp.avi; get them with `{CLI} download kth --data_dir {root}`')
  rank = {a: i for i, a in enumerate(classes)}
  return sorted(found.values(), key=lambda s: (rank[s[0]['action']], s[0]['name']))


def kth_avi_index(root: str, *, classes: Sequence[str] = KTH_CLASSES) -> list[dict]:
  """Metadata of the videos ``kth_avi_videos`` yields, in the same order (nothing decoded)."""
  return [meta for meta, _, _ in _kth_sources(root, classes)]


def split_png_stream(data: bytes, source: str) -> list[bytes]:
  """The PNG files of a concatenated PNG stream (ffmpeg ``-f image2pipe -c:v png``)."""
  images, pos = [], 0
  while pos < len(data):
    if data[pos:pos + 8] != _PNG_SIGNATURE:
      raise CorruptRawFileError(f'ffmpeg output for {source} is not a PNG stream at byte {pos}')
    end = pos + 8
    while True:
      if end + 8 > len(data):
        raise CorruptRawFileError(f'ffmpeg output for {source} ends inside a PNG image')
      length, kind = struct.unpack('>I4s', data[end:end + 8])
      end += 12 + length
      if kind == b'IEND':
        break
    images.append(data[pos:end])
    pos = end
  return images


def kth_decode_avi(path: str, *, source: str | None = None, frame_rate: int = KTH_FRAME_RATE) -> np.ndarray:
  """Frames of a KTH AVI as the official conversion stores them, uint8 (T, 64, 64, 1).

  Runs the official ``ffmpeg -i AVI -r 25 -f image2 -s 64x64 image-%03d.png`` with the PNG images piped
  instead of written (same encoder, so the same pixel format and scaling), then keeps the first channel as
  the official loader does. ``source`` names the file in errors (e.g. ``walking.zip:person01_..avi``).
  """
  source = source or path
  cmd = [_ffmpeg_exe(), '-nostdin', '-loglevel', 'error', '-i', path, '-r', str(frame_rate),
         '-s', f'{NX}x{NX}', '-f', 'image2pipe', '-c:v', 'png', 'pipe:1']
  result = subprocess.run(cmd, check=False, capture_output=True)
  if result.returncode != 0:
    raise CorruptRawFileError(f'KTH video {source} cannot be decoded '
                              f'({_first_line(result.stderr.decode(errors="replace"))}); download it again')
  frames = []
  for png in split_png_stream(result.stdout, source):
    with Image.open(io.BytesIO(png)) as img:
      frame = np.asarray(img)
    frames.append(frame if frame.ndim == 2 else frame[:, :, 0])
  if not frames:
    raise CorruptRawFileError(f'KTH video {source} holds no frame; download it again')
  video = np.stack(frames)[..., None]
  if video.shape[1:] != (NX, NX, 1) or video.dtype != np.uint8:
    raise CorruptRawFileError(f'KTH video {source} decodes to {video.dtype} {video.shape[1:]} frames, expected uint8 '
                              '64x64')
  return video


def kth_png_listing_order(n_frames: int) -> np.ndarray:
  """Frame indices in the order ``sorted(os.listdir())`` lists the official ``image-%03d.png`` files (1..n).

  The official loader and test-set script read a video's PNG frames in that plain string order, which
  differs from time order past frame 999 (``image-1000.png`` sorts before ``image-101.png``);
  ``video[kth_png_listing_order(len(video))]`` is the frame sequence they see.
  """
  return np.array(sorted(range(n_frames), key=lambda i: f'image-{i + 1:03d}.png'), dtype=np.int64)


def _kth_read(entry: tuple[dict, str, str | None]) -> tuple[dict, np.ndarray]:
  meta, path, member = entry
  if member is None:
    return dict(meta), kth_decode_avi(path)
  source = f'{path}:{member}'
  with tempfile.TemporaryDirectory(prefix='srvp_kth_') as tmp:
    avi = os.path.join(tmp, os.path.basename(member))
    try:
      with zipfile.ZipFile(path) as z, z.open(member) as src, open(avi, 'wb') as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise CorruptRawFileError(f'KTH archive member {source} is unreadable ({e}); download {path} again') from None
    return dict(meta), kth_decode_avi(avi, source=source)


def kth_avi_videos(root: str, *, classes: Sequence[str] = KTH_CLASSES,
                   workers: int = 1) -> Iterator[tuple[dict, np.ndarray]]:
  """KTH videos from the class archives or AVI files under ``root``: (meta, uint8 (T, 64, 64, 1)).

  Looked up: ``root/[raw/]<action>.zip`` (members ``person<PP>_<action>_d<S>_uncomp.avi``) and AVI files
  in ``root``, ``root/<action>/`` and ``root/raw/<action>/`` (the ``download`` layout); an extracted file
  wins over the same video in an archive. One video per AVI file, as the official PNG layout
  ``processed_64/<action>/<name>/`` holds (the ``00sequences.txt`` ranges are not used by SRVP). Yields in
  class order then name order (the order of ``kth.index_videos``), meta ``{'person': int, 'action': str,
  'setting': 'd1'..'d4', 'name': 'person01_boxing_d1'}``. Every class of ``classes`` must have a video.
  ``workers`` decodes that many videos at once (order kept).
  """
  yield from base.ordered_map(_kth_read, _kth_sources(root, classes), workers)


# ---------------------------------------------------------------------------------------------------------------------
# Human3.6M.
# ---------------------------------------------------------------------------------------------------------------------

def _human_sources(root: str, subjects: Sequence[int]) -> list[tuple[dict, str]]:
  """(meta, path) per video in the sorted order of the official npz names ``S<n>-<file stem>``."""
  missing = [s for s in subjects if not os.path.isdir(os.path.join(root, f'S{s}', 'Videos'))]
  if missing:
    listed = ', '.join(f'S{s}' for s in missing)
    raise RawDataMissingError(
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
    raise RawDataMissingError(f'no Human3.6M .mp4 video under {root}/S<n>/Videos; extract the Videos .tgz '
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
  ``imageio.get_reader(path, 'ffmpeg').iter_data()``, which reads until the stream ends: every frame).
  """
  _ffmpeg_exe()
  import imageio_ffmpeg  # pylint: disable=import-outside-toplevel
  frames = []
  reader = imageio_ffmpeg.read_frames(path)
  try:
    meta = next(reader)
    width, height = meta['size']
    for raw in reader:
      frames.append(human_process_frame(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)))
  except (OSError, RuntimeError, KeyError, ValueError, StopIteration) as e:
    raise CorruptRawFileError(f'Human3.6M video {path} cannot be decoded ({_first_line(e)}); extract it again from '
                              'its .tgz archive') from None
  finally:
    reader.close()
  if not frames:
    raise CorruptRawFileError(f'Human3.6M video {path} holds no frame; extract it again from its .tgz archive')
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
