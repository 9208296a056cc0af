"""The video store, the grain streams, the data CLI, and an end-to-end run: prepare -> launch.py -> evaluate.

Tiny datasets are written in the official layouts (PNG frames, npz files). Checks against docs/srvp.md section 6
(splits by subject, the official 95/5 folds, subsampling, random-start bounds, the official test-set draws)
use small independent implementations written here, not the code under test.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from srvp_jax import config, evaluate
from srvp_jax.data import get_dataset, pipeline, store
from srvp_jax.preparation import bair, cli, human, kth, store_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KTH_TRAIN_PERSONS = (1, 2, 7, 20)  # Training subjects (1-20); 21-25 are the test subjects.


# --------------------------------------------------------------------------------------------------------------------
# Tiny datasets in the official layouts. Every frame is noise, so a frame identifies its (video, time).
# --------------------------------------------------------------------------------------------------------------------

def _write_kth(root, rng, persons=KTH_TRAIN_PERSONS + (21, 22, 23, 24, 25), settings=(1, 2, 3, 4), lengths=(7, 12)):
  for action in kth.CLASSES:
    for person in persons:
      for setting in settings:
        if person <= 20 and setting > 1:
          continue  # Training videos: one scenario per subject is enough.
        d = os.path.join(root, 'processed_64', action, f'person{person:02d}_{action}_d{setting}')
        os.makedirs(d)
        for t in range(int(rng.integers(*lengths))):
          grey = rng.integers(0, 256, (64, 64, 1), dtype=np.uint8)
          Image.fromarray(np.repeat(grey, 3, axis=-1)).save(os.path.join(d, f'image-{t + 1:03d}.png'))


@pytest.fixture(scope='module')
def kth_png(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('kth_png'))
  _write_kth(root, np.random.default_rng(0))
  return root


@pytest.fixture(scope='module')
def human_npz(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('human_npz'))
  rng = np.random.default_rng(1)
  specs = {'train': [(1, 'Directions.1', 30), (1, 'Eating.2', 41), (5, 'Greeting.1', 25), (6, 'Phoning.3', 50),
                     (7, 'Posing.1', 33), (8, 'Sitting.4', 44), (5, 'Short.1', 8)],
           'test': [(9, 'Directions.1', 40), (9, 'Walking 1.2', 52), (11, 'Eating.3', 37)]}
  for split, videos in specs.items():
    os.makedirs(os.path.join(root, split))
    for subject, name, n in videos:
      image = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
      np.savez(os.path.join(root, split, f'S{subject}-{name}'), image=image, filename=name, subject=subject)
  return root


@pytest.fixture(scope='module')
def bair_png(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('bair_png'))
  rng = np.random.default_rng(2)
  for split, records in (('train', {'traj_0_to_255': 9, 'traj_256_to_511': 12}), ('test', {'traj_0_to_255': 3})):
    for record, n in records.items():
      for k in range(1, n + 1):
        d = os.path.join(root, 'processed_data', split, record, f'{k:03d}')
        os.makedirs(d)
        for i, frame in enumerate(rng.integers(0, 256, (30, 64, 64, 3), dtype=np.uint8)):
          Image.fromarray(frame).save(os.path.join(d, f'{i:03d}.png'))
  return root


def _copy_layout(src, dst):
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(src, dst)
  return str(dst)


def _cfg(dataset, data_dir, **kw):
  cfg = config.default_config()
  nc = {'kth': 1, 'human': 3, 'bair': 3}[dataset]
  cfg.update({**dict(dataset=dataset, data_dir=data_dir, nc=nc, nt_inf=2, num_data_workers=2), **kw})
  return cfg


# Independent readers of the official layouts (docs/srvp.md section 6 and the official scripts).

def _kth_official(root, split):
  """(name, person, frames) of KTH videos: subjects 1-20 train, 21-25 test; per action, names sorted."""
  out = []
  for action in kth.CLASSES:
    for name in sorted(os.listdir(os.path.join(root, 'processed_64', action))):
      person = int(name[len('person'):len('person') + 2])
      if (person <= 20) == (split == 'train'):
        d = os.path.join(root, 'processed_64', action, name)
        files = sorted(os.listdir(d), key=lambda f: int(f[len('image-'):-len('.png')]))
        out.append((name, person, np.stack([np.array(Image.open(os.path.join(d, f)))[:, :, :1] for f in files])))
  return out


def _human_official(root, split):
  files = sorted(os.listdir(os.path.join(root, split)))
  return [(f[:-4], int(f[1:f.index('-')]), np.load(os.path.join(root, split, f))['image']) for f in files]


def _bair_official(root, split):
  base_dir = os.path.join(root, 'processed_data', split)
  return [(f'{r}/{k}', 0, np.stack([np.array(Image.open(os.path.join(base_dir, r, k, f'{i:03d}.png')))
                                    for i in range(30)]))
          for r in sorted(os.listdir(base_dir)) for k in sorted(os.listdir(os.path.join(base_dir, r)))]


OFFICIAL = {'kth': _kth_official, 'human': _human_official, 'bair': _bair_official}


def _spec_folds(n):
  """docs/srvp.md section 5: RandomState(42).shuffle of the video indices; the first int(0.95 n) are training,
  the rest validation."""
  ids = list(range(n))
  np.random.RandomState(42).shuffle(ids)
  return sorted(ids[:int(0.95 * n)]), sorted(ids[int(0.95 * n):])


# --------------------------------------------------------------------------------------------------------------------
# The store.
# --------------------------------------------------------------------------------------------------------------------

def test_store_round_trip_over_several_shards(tmp_path):
  rng = np.random.default_rng(0)
  videos = [rng.integers(0, 256, (int(n), 64, 64, 3), dtype=np.uint8) for n in (5, 9, 2, 7, 4)]
  items = [('train' if i != 2 else 'test', f'v{i}', {'i': i}, v) for i, v in enumerate(videos)]
  store_writer.write_splits(str(tmp_path), 'bair', 3, ('train', 'test'), iter(items), shard_bytes=10 * 64 * 64 * 3)
  train = store.StoreVideos(str(tmp_path), 'train')
  assert len(train.shards) > 1 and train.names == ['v0', 'v1', 'v3', 'v4'] and train.meta[2] == {'i': 3}
  assert isinstance(train.shards[0], np.memmap)
  for j, i in enumerate((0, 1, 3, 4)):
    np.testing.assert_array_equal(train.video(j), videos[i])
    np.testing.assert_array_equal(train.clip(j, 1, 2, 2), videos[i][1:4:2])
  # 5 + 9 frames > the 10 of a shard: v1 starts a new shard.
  np.testing.assert_array_equal(np.load(os.path.join(train.root, 'frames_0001.npy')), videos[1])
  np.testing.assert_array_equal(store.StoreVideos(str(tmp_path), 'test').video(0), videos[2])
  assert sorted(os.listdir(tmp_path / 'store')) == ['test', 'train']


def test_store_interrupted_write_leaves_nothing_and_keeps_the_old_split(tmp_path):
  video = np.zeros((3, 64, 64, 1), np.uint8)
  store_writer.write_splits(str(tmp_path), 'kth', 1, ('train', 'test'), iter([('train', 'a', {}, video),
                                                                       ('test', 'b', {}, video)]))

  def broken():
    yield 'train', 'c', {}, video
    raise ValueError('KTH video x.avi is corrupt')

  with pytest.raises(ValueError, match='x.avi'):
    store_writer.write_splits(str(tmp_path), 'kth', 1, ('train', 'test'), broken())
  assert sorted(os.listdir(tmp_path / 'store')) == ['test', 'train']
  assert store.StoreVideos(str(tmp_path), 'train').names == ['a']
  with pytest.raises(FileNotFoundError, match='no kth test video'):
    store_writer.write_splits(str(tmp_path), 'kth', 1, ('train', 'test'), iter([('train', 'a', {}, video)]))
  with pytest.raises(ValueError, match=r'expected uint8 \(frames, 64, 64, 1\)'):
    store_writer.write_splits(str(tmp_path), 'kth', 1, ('train',), iter([('train', 'a', {}, video[..., 0])]))


def test_corrupt_store_names_the_file(tmp_path, capsys):
  video = np.zeros((6, 64, 64, 1), np.uint8)
  store_writer.write_splits(str(tmp_path), 'kth', 1, ('train', 'test'),
                     iter([('train', 'person01_boxing_d1', {}, video), ('test', 'person21_boxing_d1', {}, video)]))
  shard = tmp_path / 'store' / 'train' / 'frames_0000.npy'
  shard.write_bytes(shard.read_bytes()[:-5000])
  with pytest.raises(store.StoreError, match=r'store shard .*train/frames_0000\.npy is corrupt or truncated'):
    store.StoreVideos(str(tmp_path), 'train')
  cfg = _cfg('kth', str(tmp_path), seq_len=3)
  with pytest.raises(store.StoreError, match='frames_0000.npy'):
    get_dataset(cfg).train_batches(2, seed=0)
  assert cli.main(['inspect', 'kth', '--data_dir', str(tmp_path)]) == 0
  assert 'store train: BROKEN: store shard' in capsys.readouterr().out
  (tmp_path / 'store' / 'test' / 'index.json').write_text('{"videos": [')
  with pytest.raises(store.StoreError, match=r'test/index\.json is not a valid store index'):
    kth.KTH(None, str(tmp_path)).make_test_set(size=1, seq_len=2)


# --------------------------------------------------------------------------------------------------------------------
# prepare: official layouts -> store, identical videos, identical streams.
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['kth', 'human', 'bair'])
def test_prepare_from_official_layout_reads_back_identical_videos(name, kth_png, human_npz, bair_png, tmp_path,
                                                                  capsys):
  data_dir = _copy_layout({'kth': kth_png, 'human': human_npz, 'bair': bair_png}[name], tmp_path / 'd')
  kw = {'subsampling': 3} if name == 'human' else {}
  seq_len = {'kth': 5, 'human': 4, 'bair': 12}[name]
  cfg = _cfg(name, data_dir, seq_len=seq_len, seq_len_test=seq_len + 1, **kw)
  before = get_dataset(cfg)
  train_before = [before.train_batch(3, k, 0, 1, 4) for k in range(3)]
  val_before = list(before.val_batches(3, seed=3, n_batches=2))
  test_before = before.test_set(6) if name == 'bair' else None
  assert cli.main(['prepare', name, '--data_dir', data_dir, '--no_progress']) == 0
  out = capsys.readouterr().out
  assert f'{os.path.join(data_dir, "store", "train")}' in out
  for split in ('train', 'test'):
    official = OFFICIAL[name](data_dir, split)
    videos = store.StoreVideos(data_dir, split)
    assert videos.names == [n for n, _, _ in official]
    for i, (_, _, frames) in enumerate(official):
      np.testing.assert_array_equal(videos.video(i), frames)
  after = get_dataset(cfg)
  assert isinstance(after.videos('train'), store.StoreVideos)
  for k, batch in enumerate(train_before):  # Same videos, same order: the stream does not change.
    np.testing.assert_array_equal(after.train_batch(3, k, 0, 1, 4), batch)
  for a, b in zip(val_before, after.val_batches(3, seed=3, n_batches=2)):
    np.testing.assert_array_equal(a, b)
  if name == 'bair':
    np.testing.assert_array_equal(after.test_set(6), test_before)
  assert cli.main(['prepare', name, '--data_dir', data_dir]) == 0
  assert 'already' in capsys.readouterr().out


def test_prepare_from_raw_formats_writes_the_raw_readers_videos(tmp_path, capsys):
  """BAIR TFRecords and KTH AVI files (real formats, tests/raw_fixtures.py) -> store: the readers' videos, split."""
  import raw_fixtures  # pylint: disable=import-outside-toplevel
  bair_dir = str(tmp_path / 'bair')
  root = os.path.join(bair_dir, 'softmotion30_44k')
  want = {split: raw_fixtures.write_bair_tfrecords(root, split, counts, seed=i)
          for i, (split, counts) in enumerate((('train', (3, 2)), ('test', (2,))))}
  assert cli.main(['prepare', 'bair', '--data_dir', bair_dir, '--no_progress']) == 0
  assert 'from original TFRecords' in capsys.readouterr().out
  for split, videos in want.items():
    stored = store.StoreVideos(bair_dir, split)
    assert stored.names == [f'{r}/{k:03d}' for r, k in bair.bair_tfrecord_index(root, split)]
    np.testing.assert_array_equal(np.stack([stored.video(i) for i in range(len(stored))]), videos)
  kth_dir = str(tmp_path / 'kth')
  spec = {(p, a, 1): 6 for a in kth.CLASSES for p in (3, 22)}
  raw_fixtures.write_kth(kth_dir, spec, zipped=('boxing',))
  assert cli.main(['prepare', 'kth', '--data_dir', kth_dir, '--no_progress']) == 0
  decoded = list(kth.kth_avi_videos(kth_dir))
  for split, persons in (('train', (3,)), ('test', (22,))):
    stored = store.StoreVideos(kth_dir, split)
    expected = [(m, v) for m, v in decoded if m['person'] in persons]
    assert stored.names == [m['name'] for m, _ in expected] and stored.meta[0]['setting'] == 'd1'
    for i, (_, video) in enumerate(expected):
      np.testing.assert_array_equal(stored.video(i), video)


def test_training_from_the_store_needs_no_official_layout(kth_png, tmp_path, capsys):
  data_dir = _copy_layout(kth_png, tmp_path / 'd')
  kth.KTH(None, data_dir).prepare(progress=False)
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(os.path.join(data_dir, 'processed_64'))
  batch = next(get_dataset(_cfg('kth', data_dir, seq_len=5)).train_batches(3, seed=0))
  assert batch.shape == (3, 5, 64, 64, 1)
  assert 'note:' not in capsys.readouterr().err  # The store needs no hint.


def test_kth_test_set_from_store_equals_official_procedure(kth_png, tmp_path):
  data_dir = _copy_layout(kth_png, tmp_path / 'd')
  from_png = np.load(kth.KTH(None, data_dir).make_test_set(size=30, seq_len=6))['sequences']
  # docs/srvp.md section 6, independently: legacy global seed 42; class, subject, scenario, start.
  np.random.seed(42)
  official = {n: f for n, _, f in _kth_official(data_dir, 'test')}
  want = []
  for _ in range(30):
    action = kth.CLASSES[np.random.randint(6)]
    person, setting = np.random.randint(21, 26), np.random.randint(1, 5)
    frames = official[f'person{person:02d}_{action}_d{setting}']
    t0 = np.random.randint(len(frames) - 6 + 1)
    want.append(frames[t0:t0 + 6, :, :, 0])
  np.testing.assert_array_equal(from_png, np.array(want))
  kth.KTH(None, data_dir).prepare(progress=False)
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(os.path.join(data_dir, 'processed_64'))
  os.remove(kth.official_test_file(data_dir, 6))
  from_store = np.load(kth.KTH(None, data_dir).make_test_set(size=30, seq_len=6))['sequences']
  np.testing.assert_array_equal(from_store, from_png)
  np.testing.assert_array_equal(get_dataset(_cfg('kth', data_dir, seq_len=5)).test_set(6)[..., 0], from_png)


def test_human_test_set_from_store_equals_official_files(human_npz, tmp_path):
  data_dir = _copy_layout(human_npz, tmp_path / 'd')
  dataset = human.Human(_cfg('human', data_dir, seq_len=4, subsampling=2))
  folder = dataset.make_test_set(size=7, seq_len=5)
  from_npz = {f: dict(np.load(os.path.join(folder, f))) for f in os.listdir(folder)}
  dataset.prepare(progress=False)
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(folder)
  shutil.rmtree(os.path.join(data_dir, 'test'))
  folder = human.Human(_cfg('human', data_dir, seq_len=4, subsampling=2)).make_test_set(size=7, seq_len=5)
  for f, want in from_npz.items():
    with np.load(os.path.join(folder, f)) as got:
      assert got.files == ['image', 'filename', 'subject', 'frame']
      for key, value in want.items():
        np.testing.assert_array_equal(got[key], value)


# --------------------------------------------------------------------------------------------------------------------
# Streams: docs/srvp.md section 6 splits, subsampling and random-start bounds; determinism and exact resume.
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['kth', 'human'])
def test_stream_draws_equal_an_independent_spec_sampler(name, kth_png, human_npz, tmp_path):
  """Batch k = uniform video among the long-enough videos of the 95/5 fold of the training subjects, uniform start."""
  data_dir = _copy_layout(kth_png if name == 'kth' else human_npz, tmp_path / 'd')
  cli.DATASETS[name](_cfg(name, data_dir, seq_len=2)).prepare(progress=False)
  train_subjects = range(1, 21) if name == 'kth' else (1, 5, 6, 7, 8)
  videos = OFFICIAL[name](data_dir, 'train')
  assert {s for _, s, _ in videos} <= set(train_subjects)
  assert not {s for _, s, _ in OFFICIAL[name](data_dir, 'test')} & set(train_subjects)
  seq_len, step = (6, 1) if name == 'kth' else (5, 6)
  span = (seq_len - 1) * step + 1
  cfg = _cfg(name, data_dir, seq_len=seq_len, subsampling=step, seq_len_test=seq_len)
  dataset = get_dataset(cfg)
  train_ids, val_ids = _spec_folds(len(videos))
  for fold, ids in (('train', train_ids), ('val', val_ids)):
    eligible = np.array([i for i in ids if len(videos[i][2]) >= span])
    assert len(eligible) < len(ids) or name == 'kth' or fold == 'val'  # Human: a video too short for the span.
    for k in range(4):
      rng = pipeline.step_rng(9, k, 0) if fold == 'train' else pipeline.step_rng(9, k)
      picks = eligible[rng.integers(len(eligible), size=5)]
      starts = rng.integers(np.array([len(videos[v][2]) for v in picks]) - span + 1)
      assert all(0 <= t <= len(videos[v][2]) - span for v, t in zip(picks, starts))
      want = np.stack([videos[v][2][t:t + span:step] for v, t in zip(picks, starts)]).astype(np.float32) / 255
      got = dataset.train_batch(9, k, 0, 1, 5) if fold == 'train' else dataset.val_batch(9, k, 5)
      np.testing.assert_array_equal(got, want)


def test_grain_stream_is_a_pure_function_of_seed_step_process(bair_png, tmp_path):
  data_dir = _copy_layout(bair_png, tmp_path / 'd')
  bair.BAIR(None, data_dir).prepare(progress=False)
  cfg = _cfg('bair', data_dir, seq_len=3)
  fresh = get_dataset(cfg).train_batches(4, seed=1, process_index=1, process_count=2)
  batches = [next(fresh) for _ in range(6)]
  # Any thread count, worker processes or not, any resume step: the same batches.
  for workers, processes, start in ((1, 0, 0), (3, 0, 4), (1, 2, 3)):
    cfg_w = _cfg('bair', data_dir, seq_len=3, num_data_workers=workers, num_data_processes=processes)
    resumed = get_dataset(cfg_w).train_batches(4, seed=1, start_step=start, process_index=1, process_count=2)
    for k in range(start, 6):
      np.testing.assert_array_equal(next(resumed), batches[k])
    resumed.close()
  other = get_dataset(cfg).train_batches(4, seed=1, process_index=0, process_count=2)
  assert not np.array_equal(next(other), batches[0])
  assert not np.array_equal(next(get_dataset(cfg).train_batches(4, seed=2, process_index=1, process_count=2)),
                            batches[0])


# --------------------------------------------------------------------------------------------------------------------
# CLI: inspect, throughput, one-line errors.
# --------------------------------------------------------------------------------------------------------------------

def test_inspect_says_what_is_there_and_what_is_missing(kth_png, tmp_path, capsys):
  data_dir = _copy_layout(kth_png, tmp_path / 'd')
  assert cli.main(['inspect', 'kth', '--data_dir', data_dir]) == 0
  out = capsys.readouterr().out
  n_train, n_test = len(_kth_official(data_dir, 'train')), len(_kth_official(data_dir, 'test'))
  assert f'store train: missing; make it with `python -m srvp_jax.data prepare kth --data_dir {data_dir}`' in out
  assert f'official layout train: {n_train} videos' in out and f'official layout test: {n_test} videos' in out
  assert f'svg_test_set_40.npz: missing; make it with `python -m srvp_jax.data make_test_set kth --data_dir ' \
         f'{data_dir}`' in out
  kth.KTH(None, data_dir).prepare(progress=False)
  kth.KTH(None, data_dir).make_test_set(size=4, seq_len=5)
  assert cli.main(['inspect', 'kth', '--data_dir', data_dir]) == 0
  out = capsys.readouterr().out
  assert f'store train: {n_train} videos' in out and '64x64x1' in out
  assert 'svg_test_set_5.npz: 4 extracts of 5 frames' in out
  assert cli.main(['inspect', 'mmnist', '--data_dir', str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert 'MNIST train digits: missing; get them with `python -m srvp_jax.data download mmnist' in out
  assert 'smmnist_test_2digits_64.npz: missing; make it with `python -m srvp_jax.data make_test_set mmnist' in out


def test_throughput_reports_videos_per_second_against_the_train_step(tmp_path, capsys):
  data_dir = str(tmp_path / 'synthetic')
  argv = ['throughput', 'bair', '--data_dir', data_dir, '--synthetic', '40', '--seconds', '0.3', '--batch', '8',
          '--steps_per_s', '1e6', '--workers', '2']
  assert cli.main(argv) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith(f'bair training stream (video store {data_dir}/store/train), batch 8 x 12 frames')
  assert 'videos/s' in out[1] and 'MB/s of float32' in out[1]
  assert 'consumes 8,000,000 videos/s: NOT enough' in out[2]
  assert cli.main(argv) == 1  # Never overwrites a store.
  assert 'already holds a video store' in capsys.readouterr().err
  os.makedirs(tmp_path / 'empty')
  assert cli.main(['throughput', 'kth', '--data_dir', str(tmp_path / 'empty'), '--seconds', '0.1']) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: KTH train videos not found') and 'prepare kth' in err and '\n' not in err


@pytest.mark.parametrize('argv, code, expected', [
    (['prepare', 'kth', '--data_dir', '{d}'], 1, r'^error: KTH data folder .* not found|^error: KTH videos of'),
    (['prepare', 'human', '--data_dir', '{d}'], 1, r'^error: Human3\.6M videos of S1, S5'),
    (['prepare', 'bair', '--data_dir', '{d}'], 1, r'^error: BAIR data not found .*download bair'),
    (['prepare', 'kth', '--data_dir', '{d}/nope'], 1, r'^error: data folder .*nope not found; get the data with'),
    (['prepare', 'kth', '--data_dir', '{d}', '--source', 'tfds'], 2, r'--source tfds is not one of'),
    (['inspect', 'bair', '--data_dir', '{d}', '--deterministic'], 2, r'apply to mmnist only'),
    (['make_test_set', 'bair', '--data_dir', '{d}'], 1, r'^error: the BAIR test set is the first frames'),
    (['download', 'human', '--data_dir', '{d}'], 1, r'^error: Human3\.6M is a licensed download'),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, code, expected):
  argv = [a.format(d=tmp_path) for a in argv]
  assert cli.main(argv) == code
  captured = capsys.readouterr()
  lines = [line for line in captured.err.splitlines() if line.strip()]
  assert len(lines) == 1 and 'Traceback' not in captured.err, captured.err
  assert __import__('re').search(expected, lines[0]), lines[0]


# --------------------------------------------------------------------------------------------------------------------
# End to end: a KTH-like PNG folder -> prepare -> launch.py (2 steps, validation) -> make_test_set -> evaluate.
# --------------------------------------------------------------------------------------------------------------------

TINY = dict(archi='dcgan', skipco=False, nf=8, nhx=16, ny=4, nz=4, nh_inf=16, nh_res=16, nlayers_inf=2, nlayers_res=2,
            n_euler_steps=1, nt_inf=2, nt_cond=2, seq_len=4, seq_len_test=5, batch_size=4, lr_scheduling_burnin=1,
            lr_scheduling_n_iter=1, val_interval=2, chkpt_interval=2, n_iter_test=1, batch_size_test=2,
            n_samples_test=2, val_sample_chunk=2, log_interval=1, num_data_workers=1)


def test_end_to_end_prepare_train_evaluate(kth_png, tmp_path, capsys):
  data_dir = _copy_layout(kth_png, tmp_path / 'kth')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = lambda argv: subprocess.run([sys.executable] + argv, cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=300)
  # The data CLI's main in this process (its process-level behaviour: test_reliability_tools.py).
  assert cli.main(['prepare', 'kth', '--data_dir', data_dir, '--no_progress']) == 0, capsys.readouterr().err
  workdir = str(tmp_path / 'run')
  overrides = [f'--config.{k}={v}' for k, v in TINY.items()] + [f'--config.data_dir={data_dir}']
  res = run(['launch.py', '--config', 'configs/kth.py', '--workdir', workdir] + overrides)
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'note:' not in res.stderr  # Trained from the store.
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if 'loss' in r] == [1, 2] and any('val_psnr' in r for r in records)
  assert cli.main(['make_test_set', 'kth', '--data_dir', data_dir, '--size', '4', '--seq_len', '5']) == 0, \
      capsys.readouterr().err
  out = str(tmp_path / 'eval')
  # evaluate's main in this process (its command line and process-level errors: test_evaluate.py).
  assert evaluate.main([workdir, '--data_dir', data_dir, '--metrics', 'psnr,ssim', '--nt_gen', '5', '--n_samples', '2',
                        '--out', out, '--no_progress']) == 0, capsys.readouterr().err
  with open(os.path.join(out, 'results.json'), encoding='utf-8') as f:
    report = json.load(f)
  assert report['config']['dataset'] == 'kth' and report['options']['nt_gen'] == 5
  capsys.readouterr()
  assert evaluate.main([workdir, '--data_dir', data_dir, '--metrics', 'psnr', '--nt_gen', '6', '--out', out]) == 2
  err = capsys.readouterr().err
  assert 'make_test_set kth --data_dir' in err and '--seq_len 6' in err
  shard = os.path.join(data_dir, 'store', 'train', 'frames_0000.npy')
  with open(shard, 'r+b') as f:
    f.truncate(os.path.getsize(shard) // 2)
  res = run(['launch.py', '--config', 'configs/kth.py', '--workdir', str(tmp_path / 'run2')] + overrides)
  assert res.returncode == 2 and f'error: store shard {shard} is corrupt or truncated' in res.stderr
  assert 'Traceback' not in res.stderr
