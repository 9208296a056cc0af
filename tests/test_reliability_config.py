"""Issue 18, the config and data items: contradicting settings refused before anything is written (12), truncated
raw videos refused before the store is written (3), a broken store index named at open time (13)."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from srvp_jax import cli, clips, evaluate, train, video_headers
from srvp_jax import config as config_lib
from srvp_jax.data import DataError, get_dataset, pipeline, store
from srvp_jax.preparation import cli as data_cli
from srvp_jax.preparation import human, raw, store_writer

import raw_fixtures as rf  # pylint: disable=wrong-import-order
from helpers import snapshot  # pylint: disable=wrong-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KTH_CLASSES = ('boxing', 'handclapping', 'handwaving', 'jogging', 'running', 'walking')


def _one_error_line(err: str, *needles: str) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


# --------------------------------------------------------------------------------------------------------------------
# Item 12: settings that contradict each other (or the model) are refused by config validation.
# --------------------------------------------------------------------------------------------------------------------

QUICK = dict(nt_inf=3, nt_cond=4, seq_len=10)  # The quick start's lengths.


@pytest.mark.parametrize('overrides,needles', [
    # The cases.
    (dict(seq_len=3, nt_cond=4), ['seq_len=3 (the validation length', 'nt_cond=4', 'seq_len_test >= 5']),
    (dict(seq_len=4, nt_cond=4), ['seq_len=4 (the validation length', 'seq_len_test >= 5']),
    (dict(nt_cond=2), ['nt_cond=2 is smaller than nt_inf=3', 'nt_cond >= 3']),
    (dict(seed=-1), ['seed=-1 must be in [0, 2**32)']),
    (dict(seed=2 ** 32), ['seed=4294967296 must be in [0, 2**32)']),
    (dict(lr_scheduling_burnin=0, lr_scheduling_n_iter=0), ['lr_scheduling_burnin=0 and lr_scheduling_n_iter=0',
                                                            'sum >= 1']),
    # The other lengths and the test protocol.
    (dict(seq_len=2), ['seq_len=2 is shorter than nt_inf=3', 'seq_len >= 3']),
    (dict(seq_len=1, nt_inf=1, nt_cond=1, seq_len_test=5), ['seq_len=1: a training clip needs at least 2 frames']),
    (dict(seq_len_test=4), ['seq_len_test=4 leaves no frame to predict after nt_cond=4', 'seq_len_test >= 5']),
    (dict(test_nt_cond=2), ['test_nt_cond=2', 'smaller than nt_inf=3', 'test_nt_cond >= 3']),
    (dict(nt_cond=25, seq_len=30), ["test_nt_gen=0 (the paper's 25 frames for smmnist)", 'test_nt_gen >= 26']),
    (dict(test_nt_gen=4), ['test_nt_gen=4 leaves no test frame to predict after nt_cond=4', 'test_nt_gen >= 5']),
    # Every key's own range or type.
    (dict(lr=float('nan')), ['lr=nan must be a finite number > 0']),
    (dict(obs_scale=0.0), ['obs_scale=0.0 must be a finite number > 0']),
    (dict(beta_z=-1.0), ['beta_z=-1.0 must be a finite number >= 0']),
    (dict(res_gain=float('inf')), ['res_gain=inf']),
    (dict(nlayers_res=1), ['nlayers_res=1', 'nlayers_res >= 2']),
    (dict(n_val_videos_gif=0), ['n_val_videos_gif=0 must be a positive integer']),
    (dict(num_data_workers=0), ['num_data_workers=0 must be a positive integer']),
    (dict(max_speed=-1), ['max_speed=-1 must be >= 0']),
    (dict(seq_len_test=-1), ['seq_len_test=-1 must be >= 0 (0: seq_len)']),
    (dict(mesh_data_axis=0), ['mesh_data_axis=0 must be a positive device count, or -1']),
    (dict(digits_source='mnist'), ["digits_source='mnist'; expected one of"]),
    (dict(dataset='ucf', seed=-1), ["unknown dataset='ucf'", 'seed=-1']),
    (dict(nf=16.5), ['nf=16.5: expected an integer']),
    (dict(skipco='yes'), ["skipco='yes': expected True or False"]),
    (dict(lr='fast'), ["lr='fast': expected a number"]),
    # Keys that only apply together.
    (dict(num_processes=2), ['num_processes=2 applies to multi-process runs only', 'distributed=True']),
    (dict(distributed=True, num_processes=2, process_id=2), ['process_id=2 is out of range', '0 to 1']),
    (dict(distributed=True, coordinator_address='node1'), ["coordinator_address='node1': expected HOST:PORT"]),
    (dict(dataset='kth', deterministic=True), ['deterministic=True applies to Moving MNIST only']),
])
def test_contradicting_or_out_of_range_settings_are_one_line(overrides, needles):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.with_overrides(**{**QUICK, **overrides})
  message = str(e.value)
  assert '\n' not in message
  for needle in needles:
    assert needle in message, (needle, message)


def test_every_violation_is_reported_and_the_limits_are_valid():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.with_overrides(**{**QUICK, 'nt_cond': 2}, seed=-1, lr_scheduling_burnin=0, lr_scheduling_n_iter=0)
  assert all(k in str(e.value) for k in ('seed=-1', 'nt_cond=2', 'lr_scheduling_burnin=0'))
  # The limits themselves are valid choices.
  config_lib.with_overrides(nt_inf=3, nt_cond=3, seq_len=3, seq_len_test=4, test_nt_gen=4, seed=2 ** 32 - 1,
                            lr_scheduling_burnin=0, lr_scheduling_n_iter=1, beta_y=0.0, max_speed=0)
  config_lib.with_overrides(distributed=True, num_processes=2, process_id=1, coordinator_address='[::1]:1234')


def test_launch_refuses_contradicting_settings_before_writing(tmp_path):
  """The issue's settings through launch.py: one line naming every key, exit 2, no workdir."""
  workdir = tmp_path / 'run'
  res = subprocess.run([sys.executable, 'launch.py', '--config', 'configs/quickstart.py', '--workdir', str(workdir),
                        '--config.seq_len=4', '--config.nt_cond=4', '--config.seed=-1',
                        '--config.lr_scheduling_burnin=0', '--config.lr_scheduling_n_iter=0'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert res.returncode == 2
  _one_error_line(res.stderr, 'seq_len=4', 'nt_cond=4', 'seed=-1', 'lr_scheduling_burnin=0')
  assert not workdir.exists()


def _store(data_dir, dataset, nc, lengths):
  """A store of random videos of ``lengths`` (train) and two test videos."""
  rng = np.random.default_rng(0)
  items = [('train', f'v{i}', {}, rng.integers(0, 256, (n, 64, 64, nc), dtype=np.uint8))
           for i, n in enumerate(lengths)]
  items += [('test', f't{i}', {}, rng.integers(0, 256, (30, 64, 64, nc), dtype=np.uint8)) for i in range(2)]
  store_writer.write_splits(str(data_dir), dataset, nc, ('train', 'test'), iter(items))


def test_validation_clips_longer_than_the_validation_videos_fail_at_start_up(tmp_path):
  """seq_len_test fits the training fold but not the validation fold: refused when the stream starts, not at the
  first validation."""
  lengths = np.full(20, 12)
  lengths[pipeline.fold_indices(20, 'val')] = 6
  _store(tmp_path, 'kth', 1, lengths)
  cfg = config_lib.with_overrides(dataset='kth', data_dir=str(tmp_path), nt_inf=2, nt_cond=2, seq_len=8,
                                  seq_len_test=10, num_data_workers=1)
  with pytest.raises(DataError, match='no KTH val video has 10 frames'):
    get_dataset(cfg).train_batches(2, seed=0)


# --------------------------------------------------------------------------------------------------------------------
# Item 13 (data): a store index with a shard out of range or no video is named, with the fix, when it is opened.
# --------------------------------------------------------------------------------------------------------------------

def _break_index(data_dir, split, change):
  path = os.path.join(store.split_dir(str(data_dir), split), store.INDEX)
  with open(path, encoding='utf-8') as f:
    index = json.load(f)
  change(index)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(index, f)
  return path


def _shard_out_of_range(index):
  index['videos'][-1]['shard'] = 7


def _no_video(index):
  index['videos'] = []


@pytest.mark.parametrize('change,needle', [(_shard_out_of_range, 'has shard 7'), (_no_video, 'lists no video')])
def test_broken_store_index_is_one_line_for_training_evaluation_and_inspect(tmp_path, capsys, change, needle):
  kth_dir, bair_dir = tmp_path / 'kth', tmp_path / 'bair'
  _store(kth_dir, 'kth', 1, [12] * 4)
  _store(bair_dir, 'bair', 3, [30] * 4)
  index = _break_index(kth_dir, 'train', change)
  fix = f'python -m srvp_jax.data prepare kth --data_dir {kth_dir} --force'
  with pytest.raises(store.StoreError) as e:
    store.StoreVideos(str(kth_dir), 'train')
  assert index in str(e.value) and needle in str(e.value) and fix in str(e.value)
  # Training: refused at start-up (launch.py turns a DataError into its one line, exit 2), no workdir.
  cfg = config_lib.with_overrides(dataset='kth', data_dir=str(kth_dir), nt_inf=2, nt_cond=2, seq_len=4, nf=8, nhx=16,
                                  ny=4, nz=4, nh_inf=16, nh_res=16, batch_size=2, num_data_workers=1)
  workdir = tmp_path / 'run'
  with pytest.raises(DataError, match=needle):
    train.train_and_evaluate(cfg, str(workdir), progress=False)
  assert not workdir.exists()
  # Inspect: the split's line says it is broken and how to rebuild it; the command still succeeds.
  assert data_cli.main(['inspect', 'kth', '--data_dir', str(kth_dir)]) == 0
  out = capsys.readouterr()
  broken = [line for line in out.out.splitlines() if 'store train: BROKEN' in line]
  assert len(broken) == 1 and needle in broken[0] and fix in broken[0] and 'Traceback' not in out.err, out
  # Evaluation (BAIR's test videos come from the store): one usage error naming the index.
  index = _break_index(bair_dir, 'test', change)
  bair = config_lib.with_overrides(dataset='bair', nc=3, nt_inf=2, nt_cond=2, seq_len=12)
  args = argparse.Namespace(data_dir=str(bair_dir), n_videos=None, metrics=('psnr',))
  with pytest.raises(cli.UsageError) as e:
    evaluate._test_videos(args, bair, 30)  # pylint: disable=protected-access
  assert index in str(e.value) and needle in str(e.value)


def test_store_of_another_dataset_is_refused(tmp_path):
  _store(tmp_path, 'bair', 3, [30] * 4)
  cfg = config_lib.with_overrides(dataset='human', data_dir=str(tmp_path), nc=3, nt_inf=2, nt_cond=2, seq_len=4,
                                  subsampling=1, num_data_workers=1)
  with pytest.raises(store.StoreError, match='holds bair videos, not human ones'):
    get_dataset(cfg).train_batches(2, seed=0)


# --------------------------------------------------------------------------------------------------------------------
# Item 3: a truncated raw video decodes to fewer frames than its container declares: refused, store untouched.
# --------------------------------------------------------------------------------------------------------------------

def _truncate(path, fraction=0.4):
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:int(len(data) * fraction)])


def test_truncated_kth_avi_stops_prepare_before_the_store_is_written(tmp_path, capsys):
  root = str(tmp_path)
  videos = {**{(1, a, 1): 10 for a in KTH_CLASSES}, (21, 'walking', 1): 10, (2, 'boxing', 1): 50}
  rf.write_kth(root, videos)
  assert data_cli.main(['prepare', 'kth', '--data_dir', root, '--no_progress']) == 0
  capsys.readouterr()
  before = snapshot(os.path.join(root, 'store'))
  avi = os.path.join(root, 'raw', 'boxing', 'person02_boxing_d1_uncomp.avi')
  _truncate(avi)
  assert video_headers.avi_header(avi) == (50, 25.0)  # The header, at the start of the file, survives.
  assert data_cli.main(['prepare', 'kth', '--data_dir', root, '--no_progress', '--force']) == 1
  err = capsys.readouterr().err
  _one_error_line(err, f'KTH video {avi} is truncated', 'frames its AVI header declares', 'download it again')
  assert snapshot(os.path.join(root, 'store')) == before
  assert not any(name.startswith('.') for name in os.listdir(os.path.join(root, 'store')))  # No partial split left.


def test_truncated_mp4_is_refused_for_human_and_own_videos(tmp_path, capsys):
  """An MP4 whose header (moov, at the front) declares more frames than its cut data holds."""
  mp4 = str(tmp_path / 'clip.mp4')
  rf.write_video(mp4, rf.smooth_video(40, 64, 64, 3, seed=1), fps=25, codec='libx264',
                 output_params=['-movflags', '+faststart', '-preset', 'ultrafast'])
  assert len(clips.read(mp4).frames) == 40
  assert len(clips.read(mp4, n_frames=5).frames) == 5
  _truncate(mp4)
  short = len(clips.read(mp4, n_frames=5).frames)  # The first frames are there: predict may use them.
  assert short == 5
  with pytest.raises(clips.ClipError, match=r'is truncated: it decodes to \d+ of the 40 frames its duration'):
    clips.read(mp4)
  with pytest.raises(raw.CorruptRawFileError, match=r'Human3.6M video .*clip.mp4 is truncated'):
    human.human_decode_mp4(mp4)
  # prepare videos: one line naming the clip, nothing written.
  data_dir = tmp_path / 'own'
  os.makedirs(data_dir / 'raw')
  rf.write_video(str(data_dir / 'raw' / 'a.mp4'), rf.smooth_video(24, 64, 64, 3, seed=2), fps=25, codec='libx264',
                 output_params=['-preset', 'ultrafast'])
  shutil.copy(mp4, data_dir / 'raw' / 'b.mp4')
  assert data_cli.main(['prepare', 'videos', '--data_dir', str(data_dir), '--no_progress']) == 1
  _one_error_line(capsys.readouterr().err, f'{data_dir / "raw" / "b.mp4"} is truncated', 'repair or remove')
  assert sorted(os.listdir(data_dir)) == ['raw']
