"""Raw-format readers (srvp_jax.preparation: kth, human, bair) on tiny fixtures in the real raw formats.

References are computed independently inside the tests: the official commands / processing (docs/srvp.md section 6,
official preprocessing scripts) run on the same files, and the known synthetic source frames.
"""

import os
import subprocess
import zipfile

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from srvp_jax.preparation import bair, human, kth, raw
from tests import raw_fixtures as rf

KTH_CLASSES = ('boxing', 'handclapping', 'handwaving', 'jogging', 'running', 'walking')
HUMAN_SUBJECTS = (1, 5, 6, 7, 8, 9, 11)


def _one_line(error: pytest.ExceptionInfo) -> str:
  message = str(error.value)
  assert '\n' not in message and message
  return message


# ---------------------------------------------------------------------------------------------------------------------
# BAIR.
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def bair_dir(tmp_path_factory):
  """DIR with softmotion30_44k/{train,test} TFRecords and a TFDS bair_robot_pushing_small prepared from them."""
  root = tmp_path_factory.mktemp('bair')
  soft = str(root / 'softmotion30_44k')
  train = rf.write_bair_tfrecords(soft, 'train', [2, 3, 2], seed=0)
  test = rf.write_bair_tfrecords(soft, 'test', [2], seed=1)
  rf.prepare_bair_tfds(str(root / 'tfds'), soft)
  return str(root), {'train': train, 'test': test}


def _official_bair_order(soft: str, split: str) -> list[tuple[str, int]]:
  """(file stem, k) in the order the official loader lists processed_data/<split>/<stem>/<k:03d> folders."""
  from srvp_jax import import_order  # pylint: disable=import-outside-toplevel
  tf = import_order.import_tensorflow()
  folders = []
  for f in os.listdir(os.path.join(soft, split)):
    n = sum(1 for _ in tf.data.TFRecordDataset(os.path.join(soft, split, f)))
    folders += [(os.path.splitext(f)[0], f'{k:03d}') for k in range(1, n + 1)]
  return [(d1, int(d2)) for d1, d2 in sorted(folders)]


def test_bair_tfrecord_videos_official_order_and_frames(bair_dir):
  data_dir, expected = bair_dir
  soft = os.path.join(data_dir, 'softmotion30_44k')
  for split, n in (('train', 7), ('test', 2)):
    videos = list(bair.bair_tfrecord_videos(soft, split))
    assert len(videos) == n
    assert all(v.dtype == np.uint8 and v.shape == (30, 64, 64, 3) for v in videos)
    np.testing.assert_array_equal(np.stack(videos), expected[split])
    index = bair.bair_tfrecord_index(soft, split)
    assert index == _official_bair_order(soft, split)
    assert len(index) == n
  # Name order is not index order: traj_1250 comes before traj_500, as in the official folders.
  assert [name for name, k in bair.bair_tfrecord_index(soft, 'train') if k == 1] == [
      'traj_0_to_1', 'traj_1250_to_1251', 'traj_500_to_502']


def test_bair_tfds_videos_same_videos(bair_dir):
  data_dir, expected = bair_dir
  for split in ('train', 'test'):
    videos = np.stack(list(bair.bair_tfds_videos(os.path.join(data_dir, 'tfds'), split)))
    assert videos.dtype == np.uint8 and videos.shape == expected[split].shape
    key = lambda v: v.tobytes()  # pylint: disable=unnecessary-lambda-assignment
    assert sorted(map(key, videos)) == sorted(map(key, expected[split]))


def test_bair_missing_data_one_line(tmp_path):
  with pytest.raises(raw.RawDataMissingError) as e:
    next(bair.bair_tfrecord_videos(str(tmp_path / 'softmotion30_44k'), 'train'))
  message = _one_line(e)
  assert 'softmotion30_44k/train/*.tfrecords' in message and f'download bair --data_dir {tmp_path}' in message
  with pytest.raises(raw.RawDataMissingError) as e:
    next(bair.bair_tfds_videos(str(tmp_path / 'tfds'), 'test'))
  assert 'tfds build bair_robot_pushing_small' in _one_line(e)
  with pytest.raises(ValueError, match='split'):
    next(bair.bair_tfrecord_videos(str(tmp_path), 'val'))


def test_bair_corrupt_files_named(bair_dir, tmp_path):
  from srvp_jax import import_order  # pylint: disable=import-outside-toplevel
  tf = import_order.import_tensorflow()
  soft = tmp_path / 'softmotion30_44k'
  source = os.path.join(bair_dir[0], 'softmotion30_44k', 'test', 'traj_0_to_1.tfrecords')
  (soft / 'test').mkdir(parents=True)
  truncated = soft / 'test' / 'traj_0_to_1.tfrecords'
  truncated.write_bytes(open(source, 'rb').read()[:-1000])
  with pytest.raises(raw.CorruptRawFileError) as e:
    list(bair.bair_tfrecord_videos(str(soft), 'test'))
  assert str(truncated) in _one_line(e) and 'record 1' in str(e.value)
  # A record without the image_aux1 camera, then one with frames of the wrong size.
  for features, match in (({'0/image_main/encoded': b'x' * 12288}, 'unreadable at record 0'),
                          ({f'{t}/image_aux1/encoded': b'x' * 100 for t in range(30)}, 'expected raw 64x64x3')):
    example = tf.train.Example(features=tf.train.Features(feature={
        k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])) for k, v in features.items()}))
    with tf.io.TFRecordWriter(str(truncated)) as writer:
      writer.write(example.SerializeToString())
    with pytest.raises(raw.CorruptRawFileError, match=match) as e:
      list(bair.bair_tfrecord_videos(str(soft), 'test'))
    assert str(truncated) in _one_line(e)


# ---------------------------------------------------------------------------------------------------------------------
# KTH.
# ---------------------------------------------------------------------------------------------------------------------

KTH_VIDEOS = {**{(1, a, 1): 12 for a in KTH_CLASSES}, (2, 'boxing', 3): 9, (21, 'walking', 2): 14,
              (22, 'running', 4): 10}


@pytest.fixture(scope='module')
def kth_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('kth'))
  sources = rf.write_kth(root, KTH_VIDEOS, zipped=('boxing', 'walking'))
  return root, sources


def _official_kth_frames(avi: str, out_dir: str) -> np.ndarray:
  """The official conversion command (preprocessing/kth/convert.py) then the official loader's first channel."""
  os.makedirs(out_dir)
  subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), '-loglevel', 'error', '-i', avi, '-r', '25', '-f', 'image2',
                  '-s', '64x64', os.path.join(out_dir, 'image-%03d.png')], check=True)
  return np.stack([np.array(Image.open(os.path.join(out_dir, f)))[:, :, 0] for f in sorted(os.listdir(out_dir))])


def test_kth_avi_videos_as_official_conversion(kth_dir, tmp_path):
  root, sources = kth_dir
  assert sorted(os.listdir(root)) == ['boxing.zip', 'raw', 'walking.zip']
  out = list(kth.kth_avi_videos(root))
  names = [meta['name'] for meta, _ in out]
  assert names == [f'person{p:02d}_{a}_d{s}' for a in KTH_CLASSES
                   for p, aa, s in sorted(KTH_VIDEOS) if aa == a]
  assert [m for m, _ in out] == kth.kth_avi_index(root)
  assert out[1][0] == {'person': 2, 'action': 'boxing', 'setting': 'd3', 'name': 'person02_boxing_d3'}
  for meta, video in out:
    name = meta['name']
    assert video.dtype == np.uint8 and video.shape == (KTH_VIDEOS[(meta['person'], meta['action'],
                                                                   int(meta['setting'][1]))], 64, 64, 1)
    # Close to the source frames scaled to 64x64 (MPEG-4 and the scaler differ only slightly).
    reference = np.stack([np.asarray(Image.fromarray(f).resize((64, 64), Image.BICUBIC)) for f in sources[name]])
    error = np.abs(video[..., 0].astype(int) - reference)
    assert error.mean() < 3 and error.max() <= 12, name
    # Exactly the official command's PNG frames (same ffmpeg binary), first channel.
    avi = os.path.join(tmp_path, f'{name}_uncomp.avi')
    if meta['action'] in ('boxing', 'walking'):
      with zipfile.ZipFile(os.path.join(root, f'{meta["action"]}.zip')) as z:
        open(avi, 'wb').write(z.read(f'{name}_uncomp.avi'))
    else:
      avi = os.path.join(root, 'raw', meta['action'], f'{name}_uncomp.avi')
    np.testing.assert_array_equal(video[..., 0], _official_kth_frames(avi, os.path.join(tmp_path, name)))
  # Threads keep the order.
  for (m1, v1), (m2, v2) in zip(out, kth.kth_avi_videos(root, workers=2)):
    assert m1 == m2
    np.testing.assert_array_equal(v1, v2)


def test_kth_official_frame_rate(tmp_path):
  """-r 25: a 50 fps video is resampled to 25 fps (about one frame in two), exactly as the official command."""
  frames = rf.kth_source_video(3, 'jogging', 1, 40)
  avi = str(tmp_path / 'person03_jogging_d1_uncomp.avi')
  rf.write_kth_avi(avi, frames, fps=50)
  video = kth.kth_decode_avi(avi)
  assert video.dtype == np.uint8 and video.shape[1:] == (64, 64, 1) and 20 <= len(video) <= 22
  np.testing.assert_array_equal(video[..., 0], _official_kth_frames(avi, str(tmp_path / 'official')))


def test_kth_png_listing_order(tmp_path):
  n = 1003
  for i in range(1, n + 1):
    (tmp_path / f'image-{i:03d}.png').touch()
  listed = [int(f[len('image-'):-len('.png')]) - 1 for f in sorted(os.listdir(tmp_path))]
  order = kth.kth_png_listing_order(n)
  assert order.tolist() == listed and order[99:103].tolist() == [99, 999, 1000, 1001]
  np.testing.assert_array_equal(kth.kth_png_listing_order(999), np.arange(999))


def test_kth_missing_and_corrupt(kth_dir, tmp_path):
  with pytest.raises(raw.RawDataMissingError) as e:
    list(kth.kth_avi_videos(str(tmp_path / 'nowhere')))
  assert f'download kth --data_dir {tmp_path / "nowhere"}' in _one_line(e)
  rf.write_kth(str(tmp_path), {(1, 'boxing', 1): 3})
  with pytest.raises(raw.RawDataMissingError) as e:
    list(kth.kth_avi_videos(str(tmp_path)))
  message = _one_line(e)
  assert 'handclapping, handwaving, jogging, running, walking' in message and 'boxing' not in message.split('under')[0]
  assert [m['name'] for m, _ in kth.kth_avi_videos(str(tmp_path), classes=('boxing',))] == ['person01_boxing_d1']
  # A damaged AVI is named.
  bad = tmp_path / 'raw' / 'boxing' / 'person02_boxing_d1_uncomp.avi'
  bad.write_bytes(b'RIFF' + b'\0' * 500)
  with pytest.raises(raw.CorruptRawFileError) as e:
    list(kth.kth_avi_videos(str(tmp_path), classes=('boxing',)))
  assert str(bad) in _one_line(e)
  bad.unlink()
  # A damaged archive is named.
  archive = tmp_path / 'walking.zip'
  archive.write_bytes(b'PK\x03\x04 not a zip archive')
  with pytest.raises(raw.CorruptRawFileError) as e:
    list(kth.kth_avi_videos(str(tmp_path), classes=('boxing', 'walking')))
  assert str(archive) in _one_line(e)


# ---------------------------------------------------------------------------------------------------------------------
# Human3.6M.
# ---------------------------------------------------------------------------------------------------------------------

HUMAN_VIDEOS = {**{(s, 'Walking', '54138969'): 3 for s in HUMAN_SUBJECTS}, (1, 'Directions 1', '55011271'): 6,
                (11, 'Eating', '60457274'): 5}


@pytest.fixture(scope='module')
def human_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('human'))
  return root, rf.write_human(root, HUMAN_VIDEOS)


def _official_human_frames(mp4: str) -> np.ndarray:
  """RGB24 frames from the ffmpeg binary, then the official crop + Lanczos resize (preprocessing/human/convert.py)."""
  meta = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), '-i', mp4, '-f', 'rawvideo', '-pix_fmt', 'rgb24', '-'],
                        check=True, capture_output=True)
  frames = np.frombuffer(meta.stdout, dtype=np.uint8).reshape(-1, rf.HUMAN_SIZE[1], rf.HUMAN_SIZE[0], 3)
  return np.stack([np.asarray(Image.fromarray(f).crop((100, 100, 900, 900)).resize((64, 64), Image.LANCZOS))
                   for f in frames])


def test_human_mp4_videos_as_official_conversion(human_dir):
  root, sources = human_dir
  assert '_ALL.54138969.mp4' in os.listdir(os.path.join(root, 'S1', 'Videos'))
  out = list(human.human_mp4_videos(root))
  names = [meta['name'] for meta, _ in out]
  assert names == sorted(sources) and names[:3] == ['S1-Directions 1.55011271', 'S1-Walking.54138969',
                                                   'S11-Eating.60457274']
  assert [m for m, _ in out] == human.human_mp4_index(root)
  assert out[0][0] == {'subject': 1, 'action': 'Directions 1', 'camera': '55011271',
                       'name': 'S1-Directions 1.55011271'}
  for meta, video in out:
    source = sources[meta['name']]
    assert video.dtype == np.uint8 and video.shape == (len(source), 64, 64, 3)  # Every frame (50 fps) kept.
    action, camera = meta['name'].split('-', 1)[1].rsplit('.', 1)
    mp4 = os.path.join(root, f'S{meta["subject"]}', 'Videos', f'{action}.{camera}.mp4')
    np.testing.assert_array_equal(video, _official_human_frames(mp4))
    # Close to the official processing of the exact source frames; far from a resize without the crop.
    cropped = np.stack([np.asarray(Image.fromarray(f).crop((100, 100, 900, 900)).resize((64, 64), Image.LANCZOS))
                        for f in source])
    uncropped = np.stack([np.asarray(Image.fromarray(f).resize((64, 64), Image.LANCZOS)) for f in source])
    error = np.abs(video.astype(int) - cropped)
    assert error.mean() < 2.5 and error.max() <= 10, meta['name']
    assert np.abs(video.astype(int) - uncropped).mean() > 5 * error.mean()
  subset = list(human.human_mp4_videos(root, subjects=(9, 11), workers=2))
  assert [m['name'] for m, _ in subset] == ['S11-Eating.60457274', 'S11-Walking.54138969', 'S9-Walking.54138969']


def test_human_missing_and_corrupt(tmp_path):
  rf.write_human(str(tmp_path), {(1, 'Walking', '54138969'): 2, (5, 'Walking', '54138969'): 2},
                 with_all_video=False)
  with pytest.raises(raw.RawDataMissingError) as e:
    list(human.human_mp4_videos(str(tmp_path)))
  message = _one_line(e)
  assert 'S6, S7, S8, S9, S11' in message and 'vision.imar.ro' in message
  bad = tmp_path / 'S5' / 'Videos' / 'Greeting.54138969.mp4'
  bad.write_bytes(b'\0\0\0\x18ftypmp42' + b'\0' * 300)
  with pytest.raises(raw.CorruptRawFileError) as e:
    list(human.human_mp4_videos(str(tmp_path), subjects=(1, 5)))
  assert str(bad) in _one_line(e)
