"""BAIR's preparation: download, the TFRecord and TFDS readers, the store, inspection.

The original videos are ``softmotion30_44k/{train,test}/*.tfrecords`` (or a prepared TFDS
``bair_robot_pushing_small``), camera ``image_aux1``, 30 raw 64x64 RGB frames per video (official
``preprocessing/bair/convert.py``, which writes ``processed_data/<split>/<tfrecord name>/<k:03d>/<t:03d>.png``).
``prepare`` packs them, or the official PNG layout, into the video store. TensorFlow is imported by these
readers only, through ``srvp_jax.import_order``.
"""

from __future__ import annotations

import glob
import os
import tarfile
from typing import Iterator

import numpy as np

from srvp_jax import import_order
from srvp_jax.data import DataError, bair, base, store
from srvp_jax.data.bair import index_videos
from srvp_jax.data.base import NX
from srvp_jax.preparation import raw, steps

# Official download script (edenton/svg data/download_bair.sh, called by srvp preprocessing/bair/download.sh).
URL = 'http://rail.eecs.berkeley.edu/datasets/bair_robot_pushing_dataset_v0.tar'
BAIR_FRAMES = bair.N_FRAMES
BAIR_FRAME_KEY = '{t}/image_aux1/encoded'
BAIR_TFDS_NAME = 'bair_robot_pushing_small'
BAIR_VIDEOS = {'train': 43264, 'test': 256}  # Videos of the complete dataset (docs/srvp.md section 6).


def bair_tfrecord_files(root: str, split: str) -> list[str]:
  """``root/<split>/*.tfrecords`` (root is ``DIR/softmotion30_44k``) in the official video order.

  The official dataset lists its PNG folders ``<tfrecord name>/<k>`` sorted, i.e. files sorted by name.
  """
  raw.check_split(split)
  folder = os.path.join(root, split)
  files = glob.glob(os.path.join(glob.escape(folder), '*.tfrecords'))
  if not files:
    data_dir = os.path.dirname(os.path.abspath(root))
    raise raw.RawDataMissingError(f'BAIR {split} TFRecords not found: expected {folder}/*.tfrecords; get them with '
                                  f'`{base.CLI} download bair --data_dir {data_dir}`')
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
      raise raw.CorruptRawFileError(f'BAIR TFRecord {path} is unreadable at record {k} ({raw.first_line(e.message)}); '
                                    'download it again') from None
    sizes = {len(f) for f in frames}
    if sizes != {frame_bytes}:
      raise raw.CorruptRawFileError(f'BAIR TFRecord {path}, record {k}: image_aux1 frames of {sorted(sizes)} bytes, '
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
  tf = import_order.import_tensorflow()
  parse = _bair_parser(tf)
  for path in files:
    yield from _bair_file_videos(tf, path, parse)


def bair_tfrecord_index(root: str, split: str) -> list[tuple[str, int]]:
  """(tfrecord name, k) of each video ``bair_tfrecord_videos`` yields, k from 1 (official folder names).

  Counts the records of every file (reads the files, decodes nothing).
  """
  files = bair_tfrecord_files(root, split)
  tf = import_order.import_tensorflow()
  index = []
  for path in files:
    try:
      n = int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda count, _: count + 1))
    except tf.errors.OpError as e:
      raise raw.CorruptRawFileError(f'BAIR TFRecord {path} is unreadable ({raw.first_line(e.message)}); '
                                    'download it again') from None
    name = os.path.splitext(os.path.basename(path))[0]
    index.extend((name, k) for k in range(1, n + 1))
  return index


def bair_tfds_videos(data_dir: str, split: str) -> Iterator[np.ndarray]:
  """BAIR videos of ``split`` from a prepared TFDS ``bair_robot_pushing_small``, uint8 (30, 64, 64, 3).

  Same videos and frames as the TFRecords (TFDS stores ``image_aux1`` losslessly as PNG), in TFDS's own
  order (examples hashed by key at preparation), not the official one. Nothing is downloaded.
  """
  raw.check_split(split)
  import_order.import_tensorflow()
  try:
    tfds = import_order.import_tensorflow_datasets()
  except ImportError:
    raise ImportError('reading TFDS bair_robot_pushing_small needs tensorflow-datasets: '
                      'pip install tensorflow-datasets') from None
  builder = tfds.builder(BAIR_TFDS_NAME, data_dir=data_dir)
  if not builder.is_prepared():
    raise raw.RawDataMissingError(
        f'TFDS {BAIR_TFDS_NAME} is not prepared in {data_dir} (expected {builder.data_dir}/dataset_info.json); '
        f'prepare it with `tfds build {BAIR_TFDS_NAME} --data_dir {data_dir}`, or read the original TFRecords '
        f'(`{base.CLI} download bair --data_dir DIR`)')
  if split not in builder.info.splits:
    raise raw.RawDataMissingError(f'TFDS {BAIR_TFDS_NAME} in {builder.data_dir} has no {split!r} split (has '
                                  f'{sorted(builder.info.splits)}); prepare it again with `tfds build {BAIR_TFDS_NAME} '
                                  f'--data_dir {data_dir}`')
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders={'image_main': tfds.decode.SkipDecoding()})
  for example in ds.as_numpy_iterator():
    video = example['image_aux1']
    if video.shape != (BAIR_FRAMES, NX, NX, 3) or video.dtype != np.uint8:
      raise raw.CorruptRawFileError(f'TFDS {BAIR_TFDS_NAME} in {builder.data_dir}: image_aux1 is {video.dtype} '
                                    f'{video.shape}, expected uint8 (30, 64, 64, 3); prepare it again')
    yield video


class BAIR(steps.ClipPreparation, bair.BAIR):
  """BAIR with the data CLI's steps."""

  def make_test_set(self, **options) -> str:
    raise DataError('the BAIR test set is the first frames of the test split: nothing to make '
                    f'(`{base.command("prepare", "bair", self.data_dir)}` makes the test split)')

  def inspect(self):
    lines = super().inspect()
    for split in self.splits:
      if self.has_store(split):
        n = len(store.StoreVideos(self.data_dir, split, self.name))
        if n != BAIR_VIDEOS[split]:
          lines.append(f'store {split} is incomplete: {n} of the {BAIR_VIDEOS[split]:,} official videos; '
                       f'download the whole archive (`{base.command("download", "bair", self.data_dir)}`) and run '
                       f'`{base.command("prepare", "bair", self.data_dir, " --force")}`')
    root = os.path.join(self.data_dir, 'softmotion30_44k')
    for split in self.splits:
      try:
        lines.append(f'original TFRecords {split}: {len(bair_tfrecord_files(root, split))} files in {root}/{split}')
      except (FileNotFoundError, ValueError):
        lines.append(f'original TFRecords {split}: not found (`{base.command("download", "bair", self.data_dir)}`)')
    return lines

  def download(self) -> None:
    """Downloads and unpacks the original archive into ``DIR/softmotion30_44k/`` (official URL, ~30 GB)."""
    os.makedirs(self.data_dir, exist_ok=True)
    archive = os.path.join(self.data_dir, os.path.basename(URL))
    steps.download_file(URL, archive)
    try:
      with tarfile.open(archive) as tar:
        tar.extractall(self.data_dir, filter='data')
    except tarfile.TarError as e:
      raise DataError(f'{archive} is not a readable tar archive ({e}); delete it and download again') from None
    os.remove(archive)

  def sources(self) -> dict:
    return {'tfrecords': 'original TFRecords (softmotion30_44k/)', 'png': 'official PNG frames (processed_data/)',
            'tfds': 'TFDS bair_robot_pushing_small (TFDS order, not the official one)'}

  def auto_source(self, tfds_data_dir: str | None = None):
    if os.path.isdir(os.path.join(self.data_dir, 'softmotion30_44k')):
      return 'tfrecords'
    if index_videos(self.data_dir, 'train') is not None:
      return 'png'
    if tfds_data_dir:
      return 'tfds'
    raise FileNotFoundError(f'BAIR data not found in {self.data_dir}: expected softmotion30_44k/{{train,test}}/'
                            f'*.tfrecords (or processed_data/ PNG frames); get them with '
                            f'`{base.command("download", "bair", self.data_dir)}`')

  def items(self, source, tfds_data_dir: str | None = None):
    if source == 'tfds':
      return self._tfds_items(tfds_data_dir)
    return self._tfrecord_items() if source == 'tfrecords' else self._png_items()

  def _tfrecord_items(self) -> Iterator[tuple]:
    root = os.path.join(self.data_dir, 'softmotion30_44k')
    for split in self.splits:
      names = [f'{record}/{k:03d}' for record, k in bair_tfrecord_index(root, split)]
      for name, video in zip(names, bair_tfrecord_videos(root, split)):
        yield split, name, {}, video

  def _png_items(self) -> Iterator[tuple]:
    for split in self.splits:
      found = index_videos(self.data_dir, split)
      if found is None:
        raise FileNotFoundError(f'BAIR {split} PNG frames not found: expected {self.data_dir}/processed_data/{split}/'
                                '<tfrecord>/<k>/000.png..029.png')
      read = lambda frames: np.stack([base.read_frame(p, 3) for p in frames])
      for name, video in zip(found[0], base.ordered_map(read, found[1])):
        yield split, name, {}, video

  def _tfds_items(self, tfds_data_dir: str | None) -> Iterator[tuple]:
    if not tfds_data_dir:
      raise DataError('--source tfds needs --tfds_data_dir (the folder where bair_robot_pushing_small is prepared)')
    for split in self.splits:
      for i, video in enumerate(bair_tfds_videos(tfds_data_dir, split)):
        yield split, f'tfds/{i:05d}', {}, video
