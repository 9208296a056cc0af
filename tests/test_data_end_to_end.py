"""End to end from the real raw formats, per dataset: prepare -> make_test_set -> training (2 steps) -> evaluate.

Fixtures are written in the formats the owners distribute (tests/raw_fixtures.py): KTH AVI files (two
classes inside their zip archives), Human3.6M MP4 files of every subject (with a '_ALL' video to skip),
BAIR TFRecords with the real feature keys. What the stream tests (test_video_datasets.py,
test_data_store.py) do not cover is checked here against small independent implementations of docs/srvp.md
section 6: the splits by subject of videos prepared from the raw files, the skipped '_' files, and the
official test-set draws on the prepared store (and that they do not change between runs).
"""

import contextlib
import importlib
import io
import json
import math
import os
import traceback

import numpy as np
import pytest

from srvp_jax import config as config_lib
from srvp_jax import evaluate
from srvp_jax import train
from srvp_jax.data import get_dataset, store
from srvp_jax.preparation import cli, human, kth
from tests import raw_fixtures as rf

KTH_CLASSES = ('boxing', 'handclapping', 'handwaving', 'jogging', 'running', 'walking')
KTH_LEN = 10  # Frames of every KTH fixture video (the test-set draws then do not depend on which video).
KTH_TEST = dict(size=4, seq_len=5)
HUMAN_LEN, HUMAN_SUB = 10, 2
HUMAN_TEST = dict(size=3, seq_len=5)
BAIR_NT_GEN = 5

# A tiny model and run: 2 train steps, validation and checkpoint at step 2. The values of test_data_store.py's
# end-to-end run, so that the KTH runs of both files compile the same programs (compiled once, then cached).
TINY = dict(archi='dcgan', skipco=False, nf=8, nhx=16, ny=4, nz=4, nh_inf=16, nh_res=16, nlayers_inf=2, nlayers_res=2,
            n_euler_steps=1, nt_inf=2, nt_cond=2, seq_len=4, seq_len_test=5, batch_size=4, lr_scheduling_burnin=1,
            lr_scheduling_n_iter=1, val_interval=2, chkpt_interval=2, n_iter_test=1, batch_size_test=2,
            n_samples_test=2, val_sample_chunk=2, log_interval=1, num_data_workers=1)
# Per dataset: (--nt_gen of the evaluation, more config overrides).
# Human3.6M takes BAIR's obs_scale and res_gain: the two then compile the same programs (see runs).
EXTRA = {'kth': (KTH_TEST['seq_len'], {}),
         'human': (HUMAN_TEST['seq_len'], {'subsampling': HUMAN_SUB, 'obs_scale': 0.71, 'res_gain': 1.41}),
         'bair': (BAIR_NT_GEN, {})}


def _in_process(fn):
  """Runs ``fn()`` in this process, its output captured: (exit status, output). An exception is status 1 with
  its traceback (shown by the failing assertion)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
      code = fn()
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc(file=out)
      code = 1
  return code, out.getvalue()


def _data_cli(capsys, *argv):
  """``python -m srvp_jax.data ...`` (its main) -> stdout; fails with its error line."""
  code = cli.main(list(argv))
  out = capsys.readouterr()
  assert code == 0, out.err
  return out.out


def _train(cfg, workdir):
  train.train_and_evaluate(cfg, workdir, progress=False)
  return 0


@pytest.fixture(scope='module')
def runs(request, tmp_path_factory):
  """Training (2 steps) then ``python -m srvp_jax.evaluate`` on each prepared dataset whose end-to-end test runs.

  Both run in this process: what launch.py adds (flags, console, signals) is tested in test_launch.py, on the same
  ``train_and_evaluate``. The training reads the dataset's config file with the overrides, as launch.py does.
  BAIR comes after Human3.6M: same model, shapes and loss (EXTRA), so its programs come from the compilation cache.
  Returns {dataset: {'workdir', 'out', 'train': (status, output), 'eval': (status, output) or None}}.
  """
  selected = {item.name for item in request.session.items}
  root = tmp_path_factory.mktemp('runs')
  info = {}
  for name in ('kth', 'human', 'bair'):  # Prepared first: preparing starts ffmpeg, before JAX starts its threads.
    if f'test_{name}_end_to_end' in selected:
      info[name] = dict(data_dir=request.getfixturevalue(f'{name}_data')[0], workdir=str(root / f'{name}_run'),
                        out=str(root / f'{name}_eval'), eval=None)
  for name, d in info.items():
    cfg = importlib.import_module(f'configs.{name}').get_config()
    cfg.unlock()
    cfg.update({**TINY, **EXTRA[name][1], 'data_dir': d['data_dir']})
    config_lib.validate(cfg)
    d['train'] = _in_process(lambda cfg=cfg, d=d: _train(cfg, d['workdir']))
    if d['train'][0] == 0:
      d['eval'] = _in_process(lambda d=d, name=name: evaluate.main([
          d['workdir'], '--data_dir', d['data_dir'], '--metrics', 'psnr,ssim', '--n_samples', '2', '--nt_gen',
          str(EXTRA[name][0]), '--n_show', '0', '--out', d['out'], '--no_progress']))
  return info


def _check_run(run, dataset, nt_gen, n_test):
  """What the training and evaluate wrote: 2 finite train steps, a validation, finite test metrics."""
  code, output = run['train']
  assert code == 0, output[-3000:]
  assert 'note:' not in output  # Trained from the store (no hint to prepare it).
  with open(os.path.join(run['workdir'], 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if 'loss' in r] == [1, 2]
  assert all(math.isfinite(r['loss']) for r in records if 'loss' in r)
  assert any(math.isfinite(r.get('val_psnr', math.nan)) for r in records)
  code, output = run['eval']
  assert code == 0, output[-3000:]
  with open(os.path.join(run['out'], 'results.json'), encoding='utf-8') as f:
    report = json.load(f)
  assert report['config']['dataset'] == dataset and report['n_videos'] == n_test
  assert report['options']['nt_gen'] == nt_gen and report['options']['nt_cond'] == TINY['nt_cond']
  for metric in ('psnr', 'ssim'):
    assert math.isfinite(report['metrics'][metric]['mean']), report['metrics']
    assert len(report['per_frame'][metric]) == nt_gen - TINY['nt_cond']


# ---------------------------------------------------------------------------------------------------------------------
# KTH: AVI files (boxing and jogging inside their class zip archives) -> store -> svg_test_set_5.npz -> train -> eval.
# ---------------------------------------------------------------------------------------------------------------------

def _spec_kth_draws(size, seq_len, n_frames):
  """docs/srvp.md section 6: legacy seed 42; class randint(6), subject randint(21, 26), scenario randint(1, 5), start."""
  rng = np.random.RandomState(42)
  draws = []
  for _ in range(size):
    action = KTH_CLASSES[rng.randint(6)]
    person, setting = rng.randint(21, 26), rng.randint(1, 5)
    draws.append((f'person{person:02d}_{action}_d{setting}', rng.randint(n_frames - seq_len + 1)))
  return draws


@pytest.fixture(scope='module')
def kth_data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('kth'))
  videos = {(1, a, 1): KTH_LEN for a in KTH_CLASSES}  # Training subjects 1-20, the last one included.
  videos[(20, 'boxing', 2)] = KTH_LEN
  videos[(21, 'walking', 1)] = KTH_LEN  # Test subjects 21-25, the first one included.
  for name, _ in _spec_kth_draws(KTH_TEST['size'], KTH_TEST['seq_len'], KTH_LEN):  # What the test-set draws read.
    person, action, setting = name.split('_')
    videos[(int(person[-2:]), action, int(setting[1:]))] = KTH_LEN
  rf.write_kth(root, videos, zipped=('boxing', 'jogging'))
  assert cli.main(['prepare', 'kth', '--data_dir', root, '--no_progress']) == 0
  assert cli.main(['make_test_set', 'kth', '--data_dir', root, '--size', str(KTH_TEST['size']), '--seq_len',
                   str(KTH_TEST['seq_len'])]) == 0
  return root, videos


def test_kth_end_to_end(runs):
  """AVI files (two classes in their zip archives) -> prepare -> make_test_set -> training -> evaluate."""
  _check_run(runs['kth'], 'kth', nt_gen=KTH_TEST['seq_len'], n_test=KTH_TEST['size'])


def test_kth_from_avi_splits_by_subject_and_official_test_draws(kth_data, capsys):
  data_dir, videos = kth_data
  names = {split: store.StoreVideos(data_dir, split).names for split in ('train', 'test')}
  for split, persons in (('train', range(1, 21)), ('test', range(21, 26))):
    want = [f'person{p:02d}_{a}_d{s}' for a in KTH_CLASSES for p, aa, s in sorted(videos) if aa == a and p in persons]
    assert names[split] == want  # Class order, then name order.
  assert 'person20_boxing_d2' in names['train'] and 'person21_walking_d1' in names['test']
  # The official test set, drawn independently from the store's test videos; the same on a second run.
  test = store.StoreVideos(data_dir, 'test')
  seq_len = KTH_TEST['seq_len']
  want = np.stack([test.video(test.names.index(n))[t0:t0 + seq_len, :, :, 0]
                   for n, t0 in _spec_kth_draws(KTH_TEST['size'], seq_len, KTH_LEN)])
  path = kth.official_test_file(data_dir, seq_len)
  with np.load(path) as f:
    np.testing.assert_array_equal(f['sequences'], want)
  _data_cli(capsys, 'make_test_set', 'kth', '--data_dir', data_dir, '--size', str(KTH_TEST['size']),
            '--seq_len', str(seq_len))
  with np.load(path) as f:
    np.testing.assert_array_equal(f['sequences'], want)
  out = _data_cli(capsys, 'inspect', 'kth', '--data_dir', data_dir)
  assert f'original videos: {len(videos)} AVI files / archive members' in out
  assert f'store train: {len(names["train"])} videos, {KTH_LEN * len(names["train"])} frames' in out


# ---------------------------------------------------------------------------------------------------------------------
# Human3.6M: S<n>/Videos/*.mp4 of every subject -> store -> test_set_5_2/ -> train (subsampling 2) -> eval.
# ---------------------------------------------------------------------------------------------------------------------

HUMAN_VIDEOS = {(1, 'Walking 1', '54138969'): HUMAN_LEN, (5, 'Eating', '55011271'): HUMAN_LEN,
                (6, 'Phoning', '54138969'): HUMAN_LEN, (7, 'Posing', '60457274'): HUMAN_LEN,
                (8, 'Sitting', '54138969'): HUMAN_LEN, (9, 'Directions', '55011271'): HUMAN_LEN,
                (11, 'Greeting', '54138969'): HUMAN_LEN + 2}


@pytest.fixture(scope='module')
def human_data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('human'))
  rf.write_human(root, HUMAN_VIDEOS)  # Plus a '_ALL' video per subject, which the official conversion skips.
  assert cli.main(['prepare', 'human', '--data_dir', root, '--no_progress']) == 0
  assert cli.main(['make_test_set', 'human', '--data_dir', root, '--size', str(HUMAN_TEST['size']), '--seq_len',
                   str(HUMAN_TEST['seq_len']), '--subsampling', str(HUMAN_SUB)]) == 0
  return root, None


def test_human_end_to_end(runs):
  """MP4 files -> prepare -> make_test_set -> training (subsampling 2) -> evaluate."""
  _check_run(runs['human'], 'human', nt_gen=HUMAN_TEST['seq_len'], n_test=HUMAN_TEST['size'])


def test_human_from_mp4_splits_by_subject_and_official_test_draws(human_data, capsys):
  human_data, _ = human_data
  listed = {split: sorted(f'S{s}-{f[:-4]}' for s in subjects for f in os.listdir(
      os.path.join(human_data, f'S{s}', 'Videos')) if f.endswith('.mp4') and not f.startswith('_'))
            for split, subjects in (('train', (1, 5, 6, 7, 8)), ('test', (9, 11)))}
  assert len(listed['train']) == 5 and len(listed['test']) == 2
  for split in ('train', 'test'):
    videos = store.StoreVideos(human_data, split)
    assert videos.names == listed[split]  # Sorted official npz names; '_ALL' videos skipped.
    assert [m['subject'] for m in videos.meta] == [int(n[1:n.index('-')]) for n in listed[split]]
    assert list(videos.lengths) == [HUMAN_VIDEOS[(m['subject'], *m['filename'].rsplit('.', 1))]
                                    for m in videos.meta]  # Every frame (50 fps) kept; subsampled when drawn.
  # docs/srvp.md section 6: legacy seed 42; video index among the sorted test videos, then a start for the whole span.
  test = store.StoreVideos(human_data, 'test')
  span = (HUMAN_TEST['seq_len'] - 1) * HUMAN_SUB + 1
  rng = np.random.RandomState(42)
  folder = human.official_test_dir(human_data, HUMAN_TEST['seq_len'], HUMAN_SUB)
  for i in range(HUMAN_TEST['size']):
    v = rng.randint(len(listed['test']))
    t0 = rng.randint(test.lengths[v] - span + 1)
    with np.load(os.path.join(folder, f'test_{i}.npz')) as f:
      assert int(f['frame']) == t0 and int(f['subject']) == test.meta[v]['subject']
      np.testing.assert_array_equal(f['image'], test.video(v)[t0:t0 + span])
  cfg = dict(TINY, dataset='human', data_dir=human_data, nc=3, subsampling=HUMAN_SUB)
  first = get_dataset(cfg).test_set(HUMAN_TEST['seq_len'])
  _data_cli(capsys, 'make_test_set', 'human', '--data_dir', human_data, '--size', str(HUMAN_TEST['size']),
            '--seq_len', str(HUMAN_TEST['seq_len']), '--subsampling', str(HUMAN_SUB))
  np.testing.assert_array_equal(get_dataset(cfg).test_set(HUMAN_TEST['seq_len']), first)
  out = _data_cli(capsys, 'inspect', 'human', '--data_dir', human_data)
  assert 'original videos: 7 MP4 files (S<n>/Videos/)' in out and 'test set test_set_5_2/: 3 extracts' in out


# ---------------------------------------------------------------------------------------------------------------------
# BAIR: softmotion30_44k/{train,test}/*.tfrecords -> store -> train -> eval (the test set is the first frames).
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def bair_data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('bair'))
  soft = os.path.join(root, 'softmotion30_44k')
  videos = {'train': rf.write_bair_tfrecords(soft, 'train', [3, 4], seed=0),
            'test': rf.write_bair_tfrecords(soft, 'test', [2, 1], seed=1)}
  assert cli.main(['prepare', 'bair', '--data_dir', root, '--no_progress']) == 0
  return root, videos


def test_bair_end_to_end(runs, bair_data):
  """TFRecords -> prepare -> training -> evaluate (the test set is the first frames of the test videos)."""
  _check_run(runs['bair'], 'bair', nt_gen=BAIR_NT_GEN, n_test=len(bair_data[1]['test']))


def test_bair_from_tfrecords_test_set_and_throughput(bair_data, capsys):
  data_dir, videos = bair_data
  for split in ('train', 'test'):  # image_aux1 in the official order (files by name, records in file order).
    stored = store.StoreVideos(data_dir, split)
    np.testing.assert_array_equal(np.stack([stored.video(i) for i in range(len(stored))]), videos[split])
  cfg = dict(TINY, dataset='bair', data_dir=data_dir, nc=3)
  np.testing.assert_array_equal(get_dataset(cfg).test_set(BAIR_NT_GEN), videos['test'][:, :BAIR_NT_GEN])
  out = _data_cli(capsys, 'throughput', 'bair', '--data_dir', data_dir, '--seconds', '0.2', '--batch', '2',
                  '--seq_len', '4', '--workers', '1').splitlines()
  assert out[0].startswith(f'bair training stream (video store {data_dir}/store/train), batch 2 x 4 frames')
  assert float(out[1].split()[0].replace(',', '')) > 0 and out[1].split()[1] == 'videos/s'
