"""Moving MNIST: digit sources, the trajectory process of docs/srvp.md section 7, the training stream, test sets."""

from __future__ import annotations

import gzip
import os
import struct
from unittest import mock

import numpy as np
import pytest

from srvp_jax import config
from srvp_jax.data import get_dataset, mmnist, mnist, pipeline
from srvp_jax.preparation import cli
from srvp_jax.preparation import mmnist as mmnist_prep

LIM = 36  # 64 - 28.


def write_idx(path, arr):
  """Writes ``arr`` (uint8) as a real IDX file (gzipped when the name ends with .gz)."""
  header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack('>' + 'I' * arr.ndim, *arr.shape)
  with (gzip.open if path.endswith('.gz') else open)(path, 'wb') as f:
    f.write(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


def fake_digits(n, seed):
  """Distinct fake 28x28 digits (a bright random blob; pixel [0, 0] encodes the index) and labels."""
  rng = np.random.default_rng(seed)
  images = np.zeros((n, 28, 28), dtype=np.uint8)
  images[:, 4:24, 6:22] = rng.integers(0, 256, (n, 20, 16), dtype=np.uint8)
  images[:, 0, 0] = np.arange(n) % 256
  images[:, 0, 1] = np.arange(n) // 256
  return images, rng.integers(0, 10, n).astype(np.uint8)


def write_fake_mnist(folder, n_train, n_test, gz=True, seed=0):
  """Fake MNIST IDX files in ``folder``; returns {split: (images, labels)}."""
  os.makedirs(folder, exist_ok=True)
  ext = '.gz' if gz else ''
  out = {}
  for split, n, s in (('train', n_train, seed), ('test', n_test, seed + 1)):
    images, labels = fake_digits(n, s)
    write_idx(os.path.join(folder, mnist.IDX_FILES[split][0] + ext), images)
    write_idx(os.path.join(folder, mnist.IDX_FILES[split][1] + ext), labels)
    out[split] = images, labels
  return out


# --------------------------------------------------------------------------------------------------
# Digit sources.


@pytest.mark.parametrize('gz', [True, False])
def test_idx_files_parse(tmp_path, gz):
  expected = write_fake_mnist(str(tmp_path), 30, 20, gz=gz)
  for split in ('train', 'test'):
    digits = mnist.load_digits(str(tmp_path), split)  # 'auto' picks the IDX files.
    assert digits.source == 'idx'
    assert digits.images.dtype == np.uint8 and digits.images.shape == expected[split][0].shape
    np.testing.assert_array_equal(digits.images, expected[split][0])
    np.testing.assert_array_equal(digits.labels, expected[split][1])


def test_idx_torchvision_layout_and_errors(tmp_path):
  expected = write_fake_mnist(str(tmp_path / 'MNIST' / 'raw'), 5, 4, gz=False)
  np.testing.assert_array_equal(mnist.load_idx(str(tmp_path), 'test').images, expected['test'][0])
  bad = tmp_path / 'bad.gz'
  with gzip.open(bad, 'wb') as f:
    f.write(b'\x12\x34\x08\x03' + b'\0' * 12)
  with pytest.raises(mnist.IdxFormatError, match='magic'):
    mnist.read_idx(str(bad))
  short = tmp_path / 'short'
  short.write_bytes(bytes([0, 0, 8, 3]) + struct.pack('>III', 2, 28, 28) + b'\0' * 100)
  with pytest.raises(mnist.IdxFormatError, match='announces'):
    mnist.read_idx(str(short))
  with pytest.raises(mnist.MnistNotFoundError, match='not found'):
    mnist.load_digits(str(tmp_path / 'empty'), 'train', source='idx')


def test_tfds_offline_fails_with_one_clear_line(tmp_path):
  empty = str(tmp_path / 'no_idx')
  tfds_dir = str(tmp_path / 'tfds')
  with mock.patch.object(mnist, '_reachable', lambda *a, **k: False):
    for source in ('tfds', 'auto'):
      with pytest.raises(mnist.MnistNotFoundError) as err:
        mnist.load_digits(empty, 'test', source=source, tfds_data_dir=tfds_dir)
      message = str(err.value)
      assert '\n' not in message and 'IDX files' in message and 'data_dir' in message
  with pytest.raises(mnist.MnistNotFoundError, match='downloading is disabled.*IDX files'):
    mnist.load_tfds('test', tfds_dir, download=False)
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  with mock.patch.object(mnist, '_reachable', lambda *a, **k: True), \
       mock.patch.object(tfds.core.DatasetBuilder, 'download_and_prepare', side_effect=ConnectionError('no route')):
    with pytest.raises(mnist.MnistNotFoundError, match='ConnectionError.*IDX files'):
      mnist.load_digits(empty, 'test', source='tfds', tfds_data_dir=tfds_dir)


def test_tfds_restores_idx_order(tmp_path):
  """A dataset prepared by the real TFDS mnist builder (download mocked) reads back in IDX order."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.image_classification import mnist as tfds_mnist  # pylint: disable=import-outside-toplevel
  raw = str(tmp_path / 'raw')
  expected = write_fake_mnist(raw, 40, 30, gz=False)
  paths = {f'{split}_{kind}': os.path.join(raw, mnist.IDX_FILES[split][i])
           for split in ('train', 'test') for i, kind in enumerate(('data', 'labels'))}
  assert not np.array_equal(mnist.tfds_order('test', 30), np.arange(30))  # TFDS really shuffles.
  with mock.patch.object(tfds_mnist, '_TRAIN_EXAMPLES', 40), mock.patch.object(tfds_mnist, '_TEST_EXAMPLES', 30), \
       mock.patch.object(tfds.download.DownloadManager, 'download_and_extract', lambda self, urls: paths), \
       mock.patch.object(mnist, '_reachable', lambda *a, **k: True):
    for split in ('test', 'train'):
      digits = mnist.load_digits(str(tmp_path / 'no_idx'), split, source='auto', tfds_data_dir=str(tmp_path / 'tfds'))
      assert digits.source == 'tfds'
      np.testing.assert_array_equal(digits.images, expected[split][0])
      np.testing.assert_array_equal(digits.labels, expected[split][1])


def test_standin_digits():
  for split, n in (('train', mnist.STANDIN_N_TRAIN), ('test', 1797 - mnist.STANDIN_N_TRAIN)):
    digits = mnist.load_digits('', split, source='standin')
    assert digits.source == mnist.STANDIN_NAME
    assert digits.images.shape == (n, 28, 28) and digits.images.dtype == np.uint8
    assert digits.images.max() == 255 and digits.labels.max() == 9
    # Centred 20x20 digits: the 4-pixel border is empty.
    assert not digits.images[:, :4].any() and not digits.images[:, :, 24:].any()


# --------------------------------------------------------------------------------------------------
# Trajectory process (docs/srvp.md section 7).


def random_inits(rng, n):
  return np.stack([rng.integers(0, LIM + 1, n), rng.integers(0, LIM + 1, n), rng.integers(-4, 5, n),
                   rng.integers(-4, 5, n)], 1)


def check_bounces(lat, deterministic):
  """Positions stay in [0, 36]; speeds change only at bounces, pointing back inside the frame."""
  pos, speed = lat[..., :2], lat[..., 2:]
  assert pos.min() >= 0 and pos.max() <= LIM
  assert np.abs(speed).max() <= 4
  prev = pos[:, :-1]
  pre = prev + speed[:, :-1]  # Rounded position before bounces (within 0.5 of the exact one).
  new = speed[:, 1:]
  # Out on one edge only (the other coordinate stays far from its edges): that component points back in.
  other_safe = ((np.minimum(prev, pre) >= 5) & (np.maximum(prev, pre) <= LIM - 5))[..., ::-1]
  assert np.all(new[(pre <= -1) & other_safe] >= 0) and np.all(new[(pre >= LIM + 1) & other_safe] <= 0)
  assert ((pre <= -1) & other_safe).sum() > 20
  inside = np.all((pre >= 1) & (pre <= LIM - 1), axis=-1)
  np.testing.assert_array_equal(new[inside], speed[:, :-1][inside])  # No bounce, same speed.
  assert np.all(np.abs(pos[:, 1:] - pre)[inside] <= 1)
  if deterministic:
    magnitude = np.broadcast_to(np.abs(speed[:, :1]), speed.shape)
    np.testing.assert_array_equal(np.abs(speed), magnitude)  # Magnitudes never change.
    flipped = new != speed[:, :-1]
    np.testing.assert_array_equal(new[flipped], -speed[:, :-1][flipped])  # A bounce reverses the component...
    assert np.all(pre[flipped & (new > 0)] <= 0) and np.all(pre[flipped & (new < 0)] >= LIM)  # ...on its edge.
    assert np.all(new[pre <= -1] > 0) and np.all(new[pre >= LIM + 1] < 0)
    assert flipped.any()
  else:
    bounced = np.any((pre <= -1) | (pre >= LIM + 1), axis=-1)
    assert np.any(new != speed[:, :-1], axis=-1)[bounced].mean() > 0.8  # New random speeds at bounces.


@pytest.mark.parametrize('deterministic', [False, True])
def test_vector_trajectories_follow_the_process(deterministic):
  lat = mmnist.trajectories(np.random.default_rng(0), 3000, 40, deterministic=deterministic)
  assert lat.shape == (3000, 40, 4) and lat.dtype == np.int64
  check_bounces(lat, deterministic)


@pytest.mark.parametrize('deterministic', [False, True])
def test_scalar_trajectories_follow_the_process(deterministic):
  rng = np.random.RandomState(3)
  lat = np.stack([mmnist.scalar_trajectory(rng, 40, deterministic=deterministic) for _ in range(600)])
  check_bounces(lat, deterministic)


def test_vector_equals_scalar_given_initial_states():
  rng = np.random.default_rng(1)
  init = random_inits(rng, 2000)
  vec = mmnist.trajectories(rng, 2000, 100, deterministic=True, init=init)
  ref = np.stack([mmnist.scalar_trajectory(None, 100, deterministic=True, init=tuple(s)) for s in init])
  np.testing.assert_array_equal(vec, ref)


def test_vector_equals_scalar_with_the_same_legacy_draws():
  """One trajectory at a time from a RandomState, the vectorised code makes the official draws."""
  for seed in range(150):
    vec = mmnist.trajectories(np.random.RandomState(seed), 1, 30, deterministic=False)[0]
    ref = mmnist.scalar_trajectory(np.random.RandomState(seed), 30, deterministic=False)
    np.testing.assert_array_equal(vec, ref)


def test_vector_and_scalar_statistics_agree():
  vec = mmnist.trajectories(np.random.default_rng(2), 3000, 25, deterministic=False)
  rng = np.random.RandomState(2)
  ref = np.stack([mmnist.scalar_trajectory(rng, 25, deterministic=False) for _ in range(1500)])
  for stat in (lambda x: x[..., :2].mean(), lambda x: x[..., :2].std(), lambda x: np.abs(x[..., 2:]).mean(),
               lambda x: (np.diff(x[..., 2:], axis=1) != 0).mean() * 10):
    assert abs(stat(vec) - stat(ref)) < 0.3


def test_videos_are_clipped_sums_of_pasted_digits():
  digits, _ = fake_digits(50, 0)
  sample = mmnist.sample_videos(np.random.default_rng(0), digits, 6, 12, deterministic=False, ndigits=3)
  assert sample.videos.shape == (6, 12, 64, 64) and sample.latents.shape == (6, 3, 12, 4)
  expected = np.zeros((6, 12, 64, 64))
  for b in range(6):
    for d in range(3):
      img = digits[sample.digit_index[b, d]].astype(np.float64)
      for t in range(12):
        r, c = sample.latents[b, d, t, :2]
        expected[b, t, r:r + 28, c:c + 28] += img
  assert expected.max() > 255  # Overlaps are exercised.
  np.testing.assert_array_equal(sample.videos, np.minimum(expected, 255))
  batch = mmnist.generate_batch(np.random.default_rng(0), 6, digits=digits, seq_len=12, deterministic=False, ndigits=3)
  assert batch.shape == (6, 12, 64, 64, 1) and batch.dtype == np.float32
  np.testing.assert_array_equal(batch[..., 0], (np.minimum(expected, 255) / 255).astype(np.float32))


# --------------------------------------------------------------------------------------------------
# Test sets: equal to an independent, literal implementation of docs/srvp.md section 7.


def reference_test_set(images, labels, deterministic, seq_len, n_videos, ndigits=2):
  """Straightforward implementation of the official procedure with NumPy's global legacy generator."""
  np.random.seed(42)
  perm = np.random.permutation(len(images))
  eps = 1e-8

  def out_flags(p):
    return [p[0] < 0 - eps, p[0] > LIM + eps, p[1] < 0 - eps, p[1] > LIM + eps]

  def trajectory():
    p = [np.random.randint(0, 37), np.random.randint(0, 37)]
    v = [np.random.randint(-4, 5), np.random.randint(-4, 5)]
    rows = []
    for _ in range(seq_len):
      flags = out_flags(p)
      point = None
      while any(flags):
        if v[0] == 0:
          point = [p[0], 0 if flags[2] else LIM]
        elif v[1] == 0:
          point = [0 if flags[0] else LIM, p[1]]
        else:
          a = v[1] / v[0]
          b = p[1] - a * p[0]
          for k, edge in enumerate((0, LIM, 0, LIM)):
            if not flags[k]:
              continue
            cross = [edge, a * edge + b] if k < 2 else [(edge - b) / a, edge]
            other = cross[1] if k < 2 else cross[0]
            if 0 - eps <= other <= LIM + eps:
              point = cross
            else:
              flags[k] = False
        frac = (p[0] - point[0]) / v[0] if v[0] != 0 else (p[1] - point[1]) / v[1]
        if not deterministic:
          v = [np.random.randint(-4, 5), np.random.randint(-4, 5)]
        for k in range(4):
          if flags[k]:
            v[k // 2] = abs(v[k // 2]) if k % 2 == 0 else -abs(v[k // 2])
        p = [point[0] + v[0] * frac, point[1] + v[1] * frac]
        flags = out_flags(p)
      rows.append([int(round(p[0])), int(round(p[1])), v[0], v[1]])
      p = [p[0] + v[0], p[1] + v[1]]
    return rows

  videos, lats, labs, objs = [], [], [], []
  for i in range(n_videos):
    x = np.zeros((seq_len, 64, 64), dtype=np.float32)
    lat, lab, obj = [], [], []
    for n in range(ndigits):
      j = perm[i * ndigits + n]
      rows = trajectory()
      for t, (r, c, _, _) in enumerate(rows):
        x[t, r:r + 28, c:c + 28] += images[j]
      lat.append(rows)
      lab.append(labels[j])
      obj.append(images[j])
    videos.append(np.clip(x, 0, 255).astype(np.uint8))
    lats.append(lat)
    labs.append(lab)
    objs.append(obj)
  return dict(sequences=np.array(videos, dtype=np.uint8).transpose(1, 0, 2, 3),
              latents=np.array(lats, dtype=np.int64).transpose(2, 0, 1, 3),
              labels=np.array(labs, dtype=np.uint8), digits=np.array(objs, dtype=np.uint8))


def assert_same_arrays(got, want):
  assert sorted(got) == sorted(want) == ['digits', 'labels', 'latents', 'sequences']
  for key, value in want.items():
    assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize('deterministic', [False, True])
def test_make_test_set_cli_matches_reference(tmp_path, deterministic):
  data = write_fake_mnist(str(tmp_path), 10, 40)
  seq_len = 30 if deterministic else 12
  flags = ['--deterministic'] if deterministic else []
  assert cli.main(['make_test_set', 'mmnist', '--data_dir', str(tmp_path), '--seq_len', str(seq_len)] + flags) == 0
  name = 'mmnist_test_2digits_64.npz' if deterministic else 'smmnist_test_2digits_64.npz'
  with np.load(tmp_path / name) as f:
    got = dict(f)
  want = reference_test_set(*data['test'], deterministic, seq_len, n_videos=20)
  assert_same_arrays(got, want)
  videos = mmnist.load_test_set(str(tmp_path), deterministic, seq_len=seq_len - 2)
  assert videos.shape == (20, seq_len - 2, 64, 64, 1) and videos.dtype == np.uint8
  np.testing.assert_array_equal(videos[..., 0], want['sequences'][:seq_len - 2].transpose(1, 0, 2, 3))


def test_make_test_set_fewer_videos_and_digits():
  images, labels = fake_digits(40, 5)
  got = mmnist_prep.official_test_set(images, labels, deterministic=False, seq_len=25, ndigits=3, n_videos=7)
  assert_same_arrays(got, reference_test_set(images, labels, False, 25, n_videos=7, ndigits=3))


def test_make_test_set_errors(tmp_path, capsys):
  with pytest.raises(FileNotFoundError, match='make_test_set mmnist'):
    mmnist.load_test_set(str(tmp_path), deterministic=False)
  assert cli.main(['make_test_set', 'nope', '--data_dir', str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: argument dataset: invalid choice: 'nope'") and err.count('\n') == 1, err
  assert mmnist.DEFAULT_TEST_LEN == {False: 25, True: 100}
  with mock.patch.object(mnist, '_reachable', lambda *a, **k: False):
    assert cli.main(['make_test_set', 'mmnist', '--data_dir', str(tmp_path / 'none'), '--source', 'idx']) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: MNIST IDX files') and '\n' not in err


@pytest.mark.parametrize('content, expected', [
    (b'\x1f\x8b\x08\x00garbage', 'cannot read'),  # gzip header, corrupt stream.
    (b'not gzip at all', 'cannot read'),
    (None, 'cannot read'),  # A valid gzip file cut in the middle.
    (b'\x00\x00\x08\x03' + b'\x00' * 6, 'truncated'),  # Plain IDX with an incomplete header.
])
def test_corrupt_idx_file_is_one_line_naming_it(tmp_path, capsys, content, expected):
  write_fake_mnist(str(tmp_path), 10, 40)
  bad = tmp_path / (mnist.IDX_FILES['test'][0] + ('.gz' if content is None or content[:2] != b'\x00\x00' else ''))
  for f in tmp_path.iterdir():
    if f.name.startswith(mnist.IDX_FILES['test'][0]):
      whole = f.read_bytes()
      f.unlink()
  bad.write_bytes(whole[:len(whole) // 2] if content is None else content)
  assert cli.main(['make_test_set', 'mmnist', '--data_dir', str(tmp_path), '--size', '3']) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and str(bad) in err and expected in err and '\n' not in err


# --------------------------------------------------------------------------------------------------
# Training and validation streams.


def mmnist_config(data_dir, **overrides):
  cfg = config.default_config()
  cfg.update({**dict(dataset='smmnist', data_dir=data_dir, seq_len=6, num_data_workers=2), **overrides})
  return cfg


def test_split_is_official_95_5(tmp_path):
  write_fake_mnist(str(tmp_path), 200, 4)
  dataset = get_dataset(mmnist_config(str(tmp_path)))
  train, val = dataset.digits('train'), dataset.digits('val')
  ids = lambda d: set((d[:, 0, 0].astype(int) + 256 * d[:, 0, 1].astype(int)).tolist())
  assert len(train) == 190 and len(val) == 10
  assert ids(train) | ids(val) == set(range(200)) and not ids(train) & ids(val)
  expected_val = np.random.RandomState(42).permutation(200)[190:]  # shuffle and permutation draw alike.
  assert ids(val) == set(expected_val.tolist())


def test_train_batches_resume_exactly(tmp_path):
  write_fake_mnist(str(tmp_path), 60, 4)
  cfg = mmnist_config(str(tmp_path))
  fresh = get_dataset(cfg).train_batches(3, seed=7)
  first = [next(fresh) for _ in range(5)]
  assert first[0].shape == (3, 6, 64, 64, 1) and first[0].dtype == np.float32
  assert 0 <= first[0].min() and first[0].max() <= 1 and first[0].max() > 0
  assert not np.array_equal(first[0], first[1])
  resumed = get_dataset(cfg).train_batches(3, seed=7, start_step=3)
  np.testing.assert_array_equal(next(resumed), first[3])
  np.testing.assert_array_equal(next(resumed), first[4])
  other = next(get_dataset(cfg).train_batches(3, seed=7, process_index=1))
  assert not np.array_equal(other, first[0])
  # The stream is the documented pure function: generate_batch(step_rng(seed, k, process)) on the train digits.
  digits = mnist.load_digits(str(tmp_path), 'train').images[np.sort(pipeline.official_val_split(60, True))]
  for k in (0, 4):
    want = mmnist.generate_batch(pipeline.step_rng(7, k, 0), 3, digits=digits, seq_len=6, deterministic=False)
    np.testing.assert_array_equal(first[k], want)


def test_val_batches_are_fixed(tmp_path):
  write_fake_mnist(str(tmp_path), 60, 4)
  cfg = mmnist_config(str(tmp_path), dataset='mmnist', seq_len_test=9)
  a = list(get_dataset(cfg).val_batches(2, seed=0, n_batches=3))
  b = list(get_dataset(cfg).val_batches(2, seed=0, n_batches=3))
  assert len(a) == 3 and a[0].shape == (2, 9, 64, 64, 1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], a[1])
  assert mmnist.is_deterministic(cfg)
