"""KTH, Human3.6M and BAIR from their official layouts: streams, splits, official test files and draws, errors.

Tiny fake datasets are written in the official on-disk formats. Every frame is random noise, so a frame
identifies its (video, time) and a batch can be traced back to the clips it was cut from.
"""

import io
import os
import tarfile
import urllib.error
import zipfile

import numpy as np
import pytest
from PIL import Image

from srvp_jax import config
from srvp_jax.data import base, get_dataset, pipeline
from srvp_jax.preparation import bair, cli, human, kth, steps

# --------------------------------------------------------------------------------------------------------------------
# Fake datasets.
# --------------------------------------------------------------------------------------------------------------------

KTH_TRAIN = [('boxing', 1, 1, 12), ('boxing', 2, 3, 9), ('handclapping', 3, 1, 11), ('handwaving', 4, 2, 10),
             ('jogging', 5, 1, 13), ('running', 6, 4, 9), ('walking', 7, 1, 12), ('walking', 20, 2, 10),
             ('handwaving', 11, 1, 4)]  # Too short for seq_len 6 (and in the training fold).


def _write_png_video(video_dir, frames):
  os.makedirs(video_dir, exist_ok=True)
  for t, frame in enumerate(frames):
    Image.fromarray(frame).save(os.path.join(video_dir, f'image-{t + 1:03d}.png'))


def _grey_rgb(rng, n):
  grey = rng.integers(0, 256, size=(n, 64, 64), dtype=np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)  # ffmpeg writes grey KTH frames as RGB PNGs.


@pytest.fixture(scope='module')
def kth_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('kth'))
  rng = np.random.default_rng(0)
  for action, person, trial, n in KTH_TRAIN:
    _write_png_video(os.path.join(root, 'processed_64', action, f'person{person:02d}_{action}_d{trial}'),
                     _grey_rgb(rng, n))
  for action in kth.CLASSES:  # Test subjects 21-25: every video the test-set draws can pick.
    for person in range(21, 26):
      for trial in range(1, 5):
        _write_png_video(os.path.join(root, 'processed_64', action, f'person{person:02d}_{action}_d{trial}'),
                         _grey_rgb(rng, int(rng.integers(5, 9))))
  return root


@pytest.fixture(scope='module')
def human_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('human'))
  rng = np.random.default_rng(1)
  for fold, specs in (('train', [(1, 'Directions', 20), (1, 'Eating 1', 25), (5, 'Greeting', 17), (6, 'Phoning', 30),
                                 (7, 'Posing', 22), (8, 'Purchases', 19), (8, 'Sitting', 24), (5, 'Short', 6)]),
                      ('test', [(9, 'Directions', 30), (9, 'Walking 1', 36), (11, 'Eating', 25)])):
    os.makedirs(os.path.join(root, fold))
    for subject, name, n in specs:
      image = rng.integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)
      np.savez(os.path.join(root, fold, f'S{subject}-{name}'), image=image, filename=name, subject=subject)
  return root


@pytest.fixture(scope='module')
def bair_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('bair'))
  rng = np.random.default_rng(2)
  for fold, records in (('train', {'traj_0_to_255': 14, 'traj_256_to_511': 8}), ('test', {'traj_0_to_255': 3})):
    for record, n in records.items():
      for k in range(1, n + 1):
        video_dir = os.path.join(root, 'processed_data', fold, record, f'{k:03d}')
        os.makedirs(video_dir)
        for i, frame in enumerate(rng.integers(0, 256, size=(30, 64, 64, 3), dtype=np.uint8)):
          Image.fromarray(frame).save(os.path.join(video_dir, f'{i:03d}.png'))
  return root


def _cfg(dataset, data_dir, nc, seq_len, seq_len_test=0, subsampling=8):
  cfg = config.default_config()
  cfg.update(dict(dataset=dataset, data_dir=data_dir, nc=nc, seq_len=seq_len, seq_len_test=seq_len_test,
                  subsampling=subsampling, nt_inf=1, nt_cond=1, num_data_workers=2))  # Any clip length validates.
  config.validate(cfg)
  cfg.lock()
  return cfg


# Ground truth, read independently of the code under test: the official video lists and their frames.

def _kth_videos(root):
  videos = []
  for action in kth.CLASSES:
    for name in sorted(os.listdir(os.path.join(root, 'processed_64', action))):
      if int(name.split('_')[0][-2:]) <= 20:
        d = os.path.join(root, 'processed_64', action, name)
        videos.append(np.stack([np.array(Image.open(os.path.join(d, f)))[:, :, :1] for f in sorted(os.listdir(d))]))
  return videos


def _human_videos(root):
  return [np.load(os.path.join(root, 'train', f))['image'] for f in sorted(os.listdir(os.path.join(root, 'train')))]


def _bair_videos(root, fold):
  base = os.path.join(root, 'processed_data', fold)
  return [np.stack([np.array(Image.open(os.path.join(base, d1, d2, f'{i:03d}.png'))) for i in range(30)])
          for d1 in sorted(os.listdir(base)) for d2 in sorted(os.listdir(os.path.join(base, d1)))]


def _official_folds(n):
  ids = list(range(n))
  np.random.RandomState(42).shuffle(ids)
  cut = int(0.95 * n)
  return set(ids[:cut]), set(ids[cut:])


def _locate(clip_u8, videos, step=1):
  """(video index, start) of a clip of consecutive (or one in ``step``) frames; fails if it is not one."""
  for v, video in enumerate(videos):
    hits = np.flatnonzero((video == clip_u8[0]).all(axis=(1, 2, 3)))
    for t0 in hits:
      seg = video[t0:t0 + (len(clip_u8) - 1) * step + 1:step]
      if len(seg) == len(clip_u8) and np.array_equal(seg, clip_u8):
        return v, int(t0)
  raise AssertionError('batch clip is not a clip of any training video')


def _check_batches(batches, videos, fold_ids, shape, step=1):
  starts = set()
  for batch in batches:
    assert batch.shape == shape and batch.dtype == np.float32
    assert 0.0 <= batch.min() and batch.max() <= 1.0
    u8 = np.round(batch * 255).astype(np.uint8)
    np.testing.assert_array_equal(u8.astype(np.float32) / 255, batch)
    for clip in u8:
      v, t0 = _locate(clip, videos, step)
      assert v in fold_ids
      starts.add(t0)
  return starts


# --------------------------------------------------------------------------------------------------------------------
# Splits and streams.
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('n', [1, 9, 20, 43264])
def test_official_95_5_split(n):
  train, val = _official_folds(n)
  assert set(pipeline.fold_indices(n, 'train')) == train and set(pipeline.fold_indices(n, 'val')) == val
  assert list(pipeline.fold_indices(n, 'train')) == sorted(train)  # Dataset order, as official get_fold keeps it.


def test_natural_frame_order():
  names = ['image-1000.png', 'image-999.png', 'image-001.png', 'image-100.png']
  assert sorted(names, key=base.natural_key) == ['image-001.png', 'image-100.png', 'image-999.png', 'image-1000.png']


def _stream_case(name, kth_dir, human_dir, bair_dir):
  if name == 'kth':
    cfg = _cfg('kth', kth_dir, 1, seq_len=6, seq_len_test=8)
    return cfg, get_dataset(cfg), _kth_videos(kth_dir), 1, 1
  if name == 'human':
    cfg = _cfg('human', human_dir, 3, seq_len=4, seq_len_test=5, subsampling=3)
    return cfg, get_dataset(cfg), _human_videos(human_dir), 3, 3
  cfg = _cfg('bair', bair_dir, 3, seq_len=12, seq_len_test=30)
  return cfg, get_dataset(cfg), _bair_videos(bair_dir, 'train'), 3, 1


@pytest.mark.parametrize('name', ['kth', 'human', 'bair'])
def test_train_stream_shapes_split_and_exact_resume(name, kth_dir, human_dir, bair_dir):
  cfg, dataset, videos, nc, step = _stream_case(name, kth_dir, human_dir, bair_dir)
  train_ids, _ = _official_folds(len(videos))
  it = dataset.train_batches(5, seed=3)
  fresh = [next(it) for _ in range(4)]
  starts = _check_batches(fresh, videos, train_ids, (5, cfg.seq_len, 64, 64, nc), step)
  assert len(starts) > 1  # Random starts, not always the first frame.
  assert not np.array_equal(fresh[0], fresh[1])
  resumed = get_dataset(cfg).train_batches(5, seed=3, start_step=2)
  np.testing.assert_array_equal(next(resumed), fresh[2])
  np.testing.assert_array_equal(next(resumed), fresh[3])
  other = next(dataset.train_batches(5, seed=3, process_index=1, process_count=2))
  assert not np.array_equal(other, fresh[0])


def test_training_skips_videos_too_short(kth_dir):
  videos = _kth_videos(kth_dir)
  short = {i for i, v in enumerate(videos) if len(v) < 6}
  train_ids, _ = _official_folds(len(videos))
  assert short & train_ids
  eligible = kth.KTH(_cfg('kth', kth_dir, 1, seq_len=6)).eligible('train', 6)
  assert set(eligible) == train_ids - short
  with pytest.raises(ValueError, match='no KTH train video has 99 frames'):
    get_dataset(_cfg('kth', kth_dir, 1, seq_len=99)).train_batches(2, seed=0)


def test_uncached_clips_equal_cached(kth_dir):
  _, frames = kth.index_videos(kth_dir, train=True)
  cached, uncached = base.PngVideos(frames, nc=1), base.PngVideos(frames, nc=1, cache_bytes=0)
  for v in range(len(frames)):
    if len(frames[v]) >= 4:
      np.testing.assert_array_equal(cached.clip(v, 1, 3), uncached.clip(v, 1, 3))
      assert uncached.clip(v, 1, 3).shape == (3, 64, 64, 1)


@pytest.mark.parametrize('name', ['kth', 'human', 'bair'])
def test_val_batches_deterministic_from_val_fold(name, kth_dir, human_dir, bair_dir):
  cfg, dataset, videos, nc, step = _stream_case(name, kth_dir, human_dir, bair_dir)
  _, val_ids = _official_folds(len(videos))
  first = list(dataset.val_batches(3, seed=7, n_batches=2))
  again = list(get_dataset(cfg).val_batches(3, seed=7, n_batches=2))
  other = list(dataset.val_batches(3, seed=8, n_batches=2))
  assert len(first) == 2
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(first, other))
  _check_batches(first, videos, val_ids, (3, config.seq_len_test(cfg), 64, 64, nc), step)


def test_bair_val_uses_every_video_before_repeating(bair_dir):
  cfg = _cfg('bair', bair_dir, 3, seq_len=12, seq_len_test=10)
  videos = _bair_videos(bair_dir, 'train')
  _, val_ids = _official_folds(len(videos))
  batch = next(get_dataset(cfg).val_batches(len(val_ids), seed=0, n_batches=1))
  seen = {_locate(np.round(c * 255).astype(np.uint8), videos)[0] for c in batch}
  assert seen == val_ids


def test_bair_training_visits_shuffled_epochs(bair_dir):
  """Every training video once per epoch (in a new order each epoch), across steps and processes."""
  cfg = _cfg('bair', bair_dir, 3, seq_len=2)
  videos = _bair_videos(bair_dir, 'train')
  train_ids, _ = _official_folds(len(videos))
  n = len(train_ids)
  dataset = get_dataset(cfg)
  picks = []
  for step in range(3):  # 3 steps x 2 processes x batch 4 = 24 positions: > one epoch of 20 videos.
    for p in range(2):
      batch = dataset.train_batch(5, step, p, 2, 4)
      picks += [_locate(np.round(c * 255).astype(np.uint8), videos)[0] for c in batch]
  assert sorted(picks[:n]) == sorted(train_ids)
  assert len(set(picks[n:2 * n])) == len(picks[n:2 * n])


def test_channel_and_length_mismatches(kth_dir, bair_dir):
  with pytest.raises(ValueError, match='set nc=1'):
    get_dataset(_cfg('kth', kth_dir, 3, seq_len=6)).train_batches(2, seed=0)
  with pytest.raises(ValueError, match='30 frames'):
    get_dataset(_cfg('bair', bair_dir, 3, seq_len=31)).train_batches(2, seed=0)


def test_training_on_official_png_layout_hints_prepare(kth_dir, capsys):
  next(get_dataset(_cfg('kth', kth_dir, 1, seq_len=6)).train_batches(2, seed=0))
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and f'python -m srvp_jax.data prepare kth --data_dir {kth_dir}' in err[0]


# --------------------------------------------------------------------------------------------------------------------
# Official test files.
# --------------------------------------------------------------------------------------------------------------------

def _kth_reference_test_set(kth_dir, size, seq_len):
  """Straightforward reimplementation of the procedure of docs/srvp.md section 6 with NumPy's global generator,
  on the PNG frames."""
  state = np.random.get_state()
  np.random.seed(42)
  sequences, persons, actions = [], [], []
  try:
    for _ in range(size):
      action = kth.CLASSES[np.random.randint(6)]
      person = np.random.randint(21, 26)
      trial = np.random.randint(1, 5)
      d = os.path.join(kth_dir, 'processed_64', action, f'person{person:02d}_{action}_d{trial}')
      names = sorted(os.listdir(d))
      t0 = np.random.randint(len(names) - seq_len + 1)
      sequences.append(np.stack([np.array(Image.open(os.path.join(d, n)))[:, :, 0] for n in names[t0:t0 + seq_len]]))
      persons.append(person)
      actions.append(action)
  finally:
    np.random.set_state(state)
  return np.array(sequences), np.array(persons), np.array(actions)


def test_kth_make_test_set_matches_spec_procedure(kth_dir):
  size, seq_len = 25, 5
  dataset = kth.KTH(None, kth_dir)
  path = dataset.make_test_set(size=size, seq_len=seq_len)
  assert path == os.path.join(kth_dir, 'svg_test_set_5.npz')
  sequences, persons, actions = _kth_reference_test_set(kth_dir, size, seq_len)
  with np.load(path) as f:
    assert sorted(f.files) == ['actions', 'persons', 'sequences']
    assert f['sequences'].dtype == np.uint8 and f['sequences'].shape == (size, seq_len, 64, 64)
    np.testing.assert_array_equal(f['sequences'], sequences)
    np.testing.assert_array_equal(f['persons'], persons)
    np.testing.assert_array_equal(f['actions'], actions)
  loaded = dataset.test_set(seq_len)
  assert loaded.shape == (size, seq_len, 64, 64, 1) and loaded.dtype == np.uint8
  np.testing.assert_array_equal(loaded[..., 0], sequences)
  # --nt_gen N reads the file made for N frames, never a cut of another one.
  with pytest.raises(FileNotFoundError, match=r'svg_test_set_3\.npz.*make_test_set kth --data_dir .* --seq_len 3'):
    dataset.test_set(3)


def test_kth_load_official_file(tmp_path):
  rng = np.random.default_rng(0)
  sequences = rng.integers(0, 256, size=(4, 40, 64, 64), dtype=np.uint8)
  np.savez_compressed(tmp_path / 'svg_test_set_40.npz', sequences=sequences, persons=[21, 22, 23, 24],
                      actions=['boxing', 'running', 'walking', 'handclapping'])
  loaded = kth.KTH(None, str(tmp_path)).test_set()
  assert loaded.shape == (4, 40, 64, 64, 1) and loaded.dtype == np.uint8
  np.testing.assert_array_equal(loaded[..., 0], sequences)
  (tmp_path / 'svg_test_set_40.npz').write_bytes(b'PK\x03\x04 truncated')
  with pytest.raises(ValueError, match=r'svg_test_set_40\.npz is unreadable'):
    kth.KTH(None, str(tmp_path)).test_set()


def test_human_make_test_set_matches_spec_procedure(human_dir):
  size, seq_len, sub = 12, 6, 3
  span = (seq_len - 1) * sub + 1
  dataset = human.Human(_cfg('human', human_dir, 3, 4, subsampling=sub))
  out_dir = dataset.make_test_set(size=size, seq_len=seq_len)
  assert out_dir == os.path.join(human_dir, 'test_set_6_3')
  state = np.random.get_state()
  np.random.seed(42)
  expected = {}
  try:
    files = sorted(os.listdir(os.path.join(human_dir, 'test')))
    for i in range(size):
      name = files[np.random.randint(len(files))]
      source = dict(np.load(os.path.join(human_dir, 'test', name)))
      t0 = np.random.randint(source['image'].shape[0] - span + 1)
      expected[f'test_{i}.npz'] = dict(source, image=source['image'][t0:t0 + span], frame=t0)
  finally:
    np.random.set_state(state)
  assert sorted(os.listdir(out_dir)) == sorted(expected)
  for name, want in expected.items():
    with np.load(os.path.join(out_dir, name)) as f:
      assert f.files == ['image', 'filename', 'subject', 'frame']
      for key, value in want.items():
        np.testing.assert_array_equal(f[key], value)
  loaded = dataset.test_set(seq_len)
  order = sorted(expected)  # Official loader order: test_0, test_1, test_10, test_11, test_2, ...
  assert order[2] == 'test_10.npz'
  assert loaded.shape == (size, seq_len, 64, 64, 3) and loaded.dtype == np.uint8
  for j, name in enumerate(order):
    np.testing.assert_array_equal(loaded[j], expected[name]['image'][::sub])
  np.testing.assert_array_equal(dataset.test_set(2, test_len=seq_len), loaded[:, :2])
  with pytest.raises(FileNotFoundError, match=r'test_set_7_3/test_<i>\.npz.*make_test_set human .*--seq_len 7 '
                                              r'--subsampling 3'):
    dataset.test_set(7)


def test_human_load_official_folder(tmp_path):
  folder = tmp_path / 'test_set_53_8'
  folder.mkdir()
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, size=(417, 64, 64, 3), dtype=np.uint8) for _ in range(2)]
  np.savez(folder / 'test_0', image=images[0], filename='Walking', subject=9, frame=3)
  np.savez_compressed(folder / 'test_1', image=images[1], filename='Eating', subject=11, frame=0)  # Not memmapped.
  loaded = human.Human(_cfg('human', str(tmp_path), 3, 4)).test_set(53)
  assert loaded.shape == (2, 53, 64, 64, 3)
  for j in range(2):
    np.testing.assert_array_equal(loaded[j], images[j][::8])
  assert isinstance(human.load_npz_array(str(folder / 'test_0.npz')), np.memmap)
  (folder / 'test_1.npz').write_bytes(b'not a zip')
  with pytest.raises(ValueError, match=r'test_1\.npz is not a readable npz'):
    human.Human(_cfg('human', str(tmp_path), 3, 4)).test_set(53)


def test_bair_load_test_set(bair_dir):
  expected = np.stack(_bair_videos(bair_dir, 'test'))
  dataset = bair.BAIR(None, bair_dir)
  loaded = dataset.test_set()
  assert loaded.shape == (3, 30, 64, 64, 3) and loaded.dtype == np.uint8
  np.testing.assert_array_equal(loaded, expected)
  np.testing.assert_array_equal(dataset.test_set(12), expected[:, :12])


# --------------------------------------------------------------------------------------------------------------------
# Download (network mocked).
# --------------------------------------------------------------------------------------------------------------------

def _fake_urlopen(payloads, seen):
  def urlopen(url, timeout=None):
    seen.append(url)
    return io.BytesIO(payloads[url])
  return urlopen


def test_kth_download_uses_official_urls(tmp_path, monkeypatch):
  payloads = {}
  for action in kth.CLASSES:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w') as z:
      z.writestr(f'person01_{action}_d1_uncomp.avi', b'avi')
    payloads[f'http://www.nada.kth.se/cvap/actions/{action}.zip'] = buf.getvalue()
  seen = []
  monkeypatch.setattr(steps.urllib.request, 'urlopen', _fake_urlopen(payloads, seen))
  kth.KTH(None, str(tmp_path)).download()
  assert seen == list(payloads)
  for action in kth.CLASSES:
    assert os.listdir(tmp_path / 'raw' / action) == [f'person01_{action}_d1_uncomp.avi']
  assert sorted(os.listdir(tmp_path / 'raw')) == sorted(kth.CLASSES)


def test_bair_download_uses_official_url(tmp_path, monkeypatch):
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode='w') as tar:
    info = tarfile.TarInfo('softmotion30_44k/test/traj_0_to_255.tfrecords')
    info.size = 3
    tar.addfile(info, io.BytesIO(b'abc'))
  seen = []
  url = 'http://rail.eecs.berkeley.edu/datasets/bair_robot_pushing_dataset_v0.tar'
  monkeypatch.setattr(steps.urllib.request, 'urlopen', _fake_urlopen({url: buf.getvalue()}, seen))
  bair.BAIR(None, str(tmp_path)).download()
  assert seen == [url]
  assert (tmp_path / 'softmotion30_44k' / 'test' / 'traj_0_to_255.tfrecords').read_bytes() == b'abc'
  assert sorted(os.listdir(tmp_path)) == ['softmotion30_44k']


def test_download_offline_is_one_clear_line(tmp_path, monkeypatch, capsys):
  def offline(url, timeout=None):
    raise urllib.error.URLError('Name or service not known')
  monkeypatch.setattr(steps.urllib.request, 'urlopen', offline)
  with pytest.raises(RuntimeError, match=r'cannot download http://www.nada.kth.se/cvap/actions/boxing.zip') as e:
    kth.KTH(None, str(tmp_path)).download()
  assert '\n' not in str(e.value)
  with pytest.raises(RuntimeError, match='bair_robot_pushing_dataset_v0.tar'):
    bair.BAIR(None, str(tmp_path)).download()
  for name in ('mmnist', 'kth', 'bair'):  # The CLI: one line, exit status 1, the URL named.
    assert cli.main(['download', name, '--data_dir', str(tmp_path / name)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: cannot download http') and '\n' not in err
  assert not [f for f in os.listdir(tmp_path) if f.endswith('.part')]
  for action in kth.CLASSES:  # Archives copied by hand are used as they are.
    with zipfile.ZipFile(tmp_path / 'raw' / f'{action}.zip', 'w') as z:
      z.writestr(f'person21_{action}_d1_uncomp.avi', b'avi')
  kth.KTH(None, str(tmp_path)).download()
  assert os.listdir(tmp_path / 'raw' / 'walking') == ['person21_walking_d1_uncomp.avi']


# --------------------------------------------------------------------------------------------------------------------
# Missing data.
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('call, expected', [
    (lambda d: get_dataset(_cfg('kth', d, 1, 6)).train_batches(2, seed=0),
     r'KTH train videos not found.*processed_64.*download kth --data_dir .* prepare kth'),
    (lambda d: get_dataset(_cfg('kth', d, 1, 6)).val_batches(2, seed=0, n_batches=1), r'processed_64'),
    (lambda d: kth.KTH(None, d).test_set(), r'svg_test_set_40\.npz.*make_test_set kth'),
    (lambda d: kth.KTH(None, d).make_test_set(), r'KTH test videos not found.*prepare kth'),
    (lambda d: get_dataset(_cfg('human', d, 3, 6)).train_batches(2, seed=0),
     r'Human3.6M train videos not found.*train/S<subject>.*prepare human'),
    (lambda d: human.Human(None, d).test_set(), r'test_set_53_8/test_<i>\.npz.*make_test_set human'),
    (lambda d: human.Human(None, d).make_test_set(), r'test/S<subject>.*prepare human'),
    (lambda d: get_dataset(_cfg('bair', d, 3, 12)).train_batches(2, seed=0),
     r'processed_data.*download bair.*prepare bair'),
    (lambda d: bair.BAIR(None, d).test_set(), r'BAIR test videos not found.*download bair.*prepare bair'),
    (lambda d: bair.BAIR(None, d).prepare(progress=False), r'softmotion30_44k/.*download bair'),
])
def test_missing_data_errors(tmp_path, call, expected):
  with pytest.raises(FileNotFoundError, match=expected) as e:
    call(str(tmp_path))
  assert '\n' not in str(e.value)
  assert not os.listdir(tmp_path)  # Nothing half-written.


def test_cli_make_test_set(kth_dir, human_dir, tmp_path, capsys):
  assert cli.main(['make_test_set', 'kth', '--data_dir', str(tmp_path)]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: KTH test videos not found') and '\n' not in err
  assert cli.main(['make_test_set', 'kth', '--data_dir', kth_dir, '--size', '3', '--seq_len', '4']) == 0
  with np.load(os.path.join(kth_dir, 'svg_test_set_4.npz')) as f:
    assert f['sequences'].shape == (3, 4, 64, 64)
  assert cli.main(['make_test_set', 'human', '--data_dir', human_dir, '--size', '2', '--seq_len', '3',
                   '--subsampling', '2']) == 0
  assert sorted(os.listdir(os.path.join(human_dir, 'test_set_3_2'))) == ['test_0.npz', 'test_1.npz']
  assert cli.main(['make_test_set', 'human', '--data_dir', str(tmp_path)]) == 1
  assert capsys.readouterr().err.startswith('error: Human3.6M test videos not found')
  for argv, expected in ((['make_test_set', 'mnist', '--data_dir', 'x'], "invalid choice: 'mnist'"),
                         (['make_test_set', 'kth', '--data_dir', 'x', '--subsampling', '2'],
                          '--subsampling applies to human only')):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and expected in err and err.count('\n') == 1, err
