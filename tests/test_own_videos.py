"""Your own videos: a folder of clips in real formats -> prepare -> launch.py -> make_test_set -> evaluate, predict.

The clips are written here: two MP4 files of different sizes and frame rates (the ffmpeg of imageio-ffmpeg),
a GIF, a folder of PNG frames, .npy arrays (one too short). The split rule, the skipped-clip lines, the
frame-rate resampling and the store's frames are checked against small independent computations; each bad
input gives one line naming the file and leaves no store behind.
"""

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from srvp_jax import clips, evaluate, predict
from srvp_jax import config as config_lib
from srvp_jax.data import get_dataset, store
from srvp_jax.preparation import cli
from tests import raw_fixtures as rf
from tests import test_data_end_to_end as e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST = dict(size=3, seq_len=5)
# The tiny model of the other end-to-end runs, with Human3.6M's obs_scale / res_gain: RGB like Human3.6M and
# BAIR, so the programs compiled for them are found in the compilation cache.
TINY = {**e2e.TINY, 'obs_scale': 0.71, 'res_gain': 1.41}


def moving(n_frames, height, width, channels=3, seed=0):
  """uint8 (T, H, W, C): a bright block crossing a textured background (colour when C = 3)."""
  rng = np.random.default_rng(seed)
  background = rng.integers(0, 120, (height, width, channels), dtype=np.uint8)
  video = np.repeat(background[None], n_frames, axis=0)
  colour = np.array([230, 120, 40][:channels], np.uint8) if channels == 3 else np.array([230], np.uint8)
  for t in range(n_frames):
    x = (3 * t) % max(1, width - width // 4)
    video[t, height // 4:height // 2, x:x + width // 4] = colour
  return video


def write_gif(path, frames, ms):
  images = [Image.fromarray(f) for f in frames]
  images[0].save(path, save_all=True, append_images=images[1:], duration=ms, loop=0)


def write_clips(raw):
  """The clips of the tests under ``raw``: {relative path: (frames, frame rate or None)} of what was written."""
  os.makedirs(os.path.join(raw, 'more', 'pngs'))
  written = {}
  a = moving(30, 96, 128, seed=1)
  rf.write_video(os.path.join(raw, 'a.mp4'), a, fps=30, codec='libx264', quality=10)
  b = moving(25, 72, 60, seed=2)
  rf.write_video(os.path.join(raw, 'more', 'b.mp4'), b, fps=25, codec='libx264', quality=10)
  c = moving(24, 50, 50, seed=3)
  write_gif(os.path.join(raw, 'c.gif'), c, ms=100)
  d = moving(22, 64, 64, channels=1, seed=4)
  for t, frame in enumerate(d):
    Image.fromarray(frame[..., 0]).save(os.path.join(raw, 'more', 'pngs', f'frame-{t}.png'))
  e = moving(21, 70, 90, channels=1, seed=5)
  np.save(os.path.join(raw, 'e.npy'), e[..., 0])
  np.save(os.path.join(raw, 'short.npy'), moving(5, 64, 64, channels=1)[..., 0])
  written.update({'a.mp4': 30, 'more/b.mp4': 25, 'c.gif': 10, 'more/pngs': None, 'e.npy': None, 'short.npy': None})
  with open(os.path.join(raw, 'notes.txt'), 'w', encoding='utf-8') as f:
    f.write('not a clip')
  return written


def expected_split(names, fraction=0.1):
  """The documented rule, written independently: SHA-256 of the path below the fraction; smallest hash if none."""
  h = {n: int(hashlib.sha256(n.encode()).hexdigest()[:16], 16) / 2 ** 64 for n in names}
  test = {n for n in names if h[n] < fraction} or {min(names, key=h.get)}
  return {n: 'test' if n in test else 'train' for n in names}


def data_cli(capsys, *argv):
  code = cli.main(list(argv))
  out = capsys.readouterr()
  return code, out.out, out.err


def store_videos(data_dir):
  return {split: store.StoreVideos(data_dir, split) for split in ('train', 'test') if store.has_split(data_dir, split)}


@pytest.fixture(scope='module')
def own(tmp_path_factory):
  """A folder of clips, prepared (default options) and with a test set; the prepare output."""
  root = str(tmp_path_factory.mktemp('own'))
  rates = write_clips(os.path.join(root, 'raw'))
  prepare = subprocess.run([sys.executable, '-m', 'srvp_jax.data', 'prepare', 'videos', '--data_dir', root,
                            '--no_progress'], cwd=ROOT, capture_output=True, text=True, check=False)
  assert prepare.returncode == 0, prepare.stderr
  return root, rates, prepare.stdout


def test_prepare_split_skips_and_store_frames(own):
  root, rates, output = own
  lines = output.splitlines()
  assert [line for line in lines if line.startswith('skipped')] == [
      'skipped short.npy: 5 frame(s), fewer than the 20 of a training clip']
  # Grey clips (PNG folder, .npy) among colour ones: RGB, with the note naming the rule and the fix.
  note = [line for line in lines if 'grey clip' in line]
  assert len(note) == 1 and '--channels 1' in note[0] and '3 channels unless every clip is grey' in note[0]
  videos = store_videos(root)
  names = {n: s for s, v in videos.items() for n in v.names}
  usable = sorted(n for n in rates if n != 'short.npy')
  assert names == expected_split(usable)
  for split, v in videos.items():
    assert v.nc == 3
    for i, name in enumerate(v.names):
      path = os.path.join(root, 'raw', name)
      assert np.array_equal(v.video(i), clips.load(path, 3).frames), name  # The predict tools' frames exactly.
      assert v.meta[i]['fps'] == pytest.approx(rates[name]) if rates[name] else v.meta[i]['fps'] is None
  # Lossless sources: against the written frames, fitted independently (crop, Lanczos, grey repeated).
  i = videos[names['e.npy']].names.index('e.npy')
  e = np.load(os.path.join(root, 'raw', 'e.npy'))
  ref = np.stack([np.asarray(Image.fromarray(f).crop((10, 0, 80, 70)).resize((64, 64), Image.LANCZOS)) for f in e])
  assert np.array_equal(videos[names['e.npy']].video(i), np.repeat(ref[..., None], 3, axis=-1))


def test_inspect_lists_splits_rates_and_skipped(own, capsys):
  root, _, _ = own
  code, out, _ = data_cli(capsys, 'inspect', 'videos', '--data_dir', root)
  assert code == 0
  assert 'skipped clips: 1' in out and 'short.npy: 5 frame(s)' in out
  assert 'frame rates:' in out and 'store train:' in out and 'store test:' in out
  assert 'raw clips: 6' in out


def test_stream_exact_resume_and_processes(own):
  """Batch k on process p is a function of (seed, k, p), as for every dataset: resuming at k gives batch k."""
  root, _, _ = own
  cfg = config_lib.with_overrides(**{**TINY, 'dataset': 'videos', 'nc': 3, 'data_dir': root})
  dataset = get_dataset(cfg)
  assert dataset.nc == 3 and len(dataset.eligible('train', TINY['seq_len'])) >= 1
  stream = dataset.train_batches(4, seed=5)
  first = [next(stream) for _ in range(3)]
  stream.close()
  resumed = dataset.train_batches(4, seed=5, start_step=2)
  assert np.array_equal(next(resumed), first[2]) and first[0].shape == (4, TINY['seq_len'], 64, 64, 3)
  resumed.close()
  other = dataset.train_batches(4, seed=5, process_index=1, process_count=2)
  assert not np.array_equal(next(other), first[0])
  other.close()
  val = list(dataset.val_batches(2, seed=0, n_batches=2))
  assert all(np.array_equal(a, b) for a, b in zip(val, dataset.val_batches(2, seed=0, n_batches=2)))


def test_split_is_stable_when_clips_are_added(tmp_path, capsys):
  raw = tmp_path / 'raw'
  raw.mkdir()
  names = [f'clip{i:02d}.npy' for i in range(30)]
  for i, name in enumerate(names[:20]):
    np.save(raw / name, moving(20, 64, 64, channels=1, seed=i)[..., 0])
  assert data_cli(capsys, 'prepare', 'videos', '--data_dir', str(tmp_path), '--no_progress')[0] == 0
  before = {n: s for s, v in store_videos(str(tmp_path)).items() for n in v.names}
  assert before == expected_split(names[:20])
  for i, name in enumerate(names[20:]):
    np.save(raw / name, moving(20, 64, 64, channels=1, seed=i)[..., 0])
  assert data_cli(capsys, 'prepare', 'videos', '--data_dir', str(tmp_path), '--no_progress', '--force')[0] == 0
  videos = store_videos(str(tmp_path))
  after = {n: s for s, v in videos.items() for n in v.names}
  assert {n: after[n] for n in before} == before and after == expected_split(names)
  assert videos['train'].nc == 1  # Every clip grey: one channel.


def test_train_test_folders_fix_the_split(tmp_path, capsys):
  for split, n in (('train', 3), ('test', 1)):
    os.makedirs(tmp_path / 'raw' / split)
    for i in range(n):
      np.save(tmp_path / 'raw' / split / f'{i}.npy', moving(20, 64, 64, seed=i))
  assert data_cli(capsys, 'prepare', 'videos', '--data_dir', str(tmp_path), '--no_progress')[0] == 0
  videos = store_videos(str(tmp_path))
  assert videos['train'].names == ['train/0.npy', 'train/1.npy', 'train/2.npy'] and videos['test'].names == [
      'test/0.npy']
  np.save(tmp_path / 'raw' / 'stray.npy', moving(20, 64, 64))
  code, _, err = data_cli(capsys, 'prepare', 'videos', '--data_dir', str(tmp_path), '--force')
  assert code == 1 and err.count('\n') == 1 and 'stray.npy is in neither' in err


def test_frame_rate_resampling_and_stride(tmp_path, capsys):
  raw = tmp_path / 'raw'
  raw.mkdir()
  frames = moving(40, 64, 64, seed=7)
  rf.write_video(str(raw / 'v30.mp4'), frames, fps=30, codec='libx264', quality=10)
  write_gif(str(raw / 'g.gif'), frames[:30], ms=50)  # 20 fps.
  np.save(raw / 'n.npy', frames[:25])  # No frame rate: kept as it is, with a note.
  source = {n: clips.load(str(raw / n), 3).frames for n in ('v30.mp4', 'g.gif', 'n.npy')}
  code, out, _ = data_cli(capsys, 'prepare', 'videos', '--data_dir', str(tmp_path), '--no_progress', '--fps', '10',
                          '--min_frames', '5')
  assert code == 0 and 'note: n.npy gives no frame rate' in out
  videos = {n: (v, i) for v in store_videos(str(tmp_path)).values() for i, n in enumerate(v.names)}
  v, i = videos['v30.mp4']
  assert np.array_equal(v.video(i), source['v30.mp4'][::3]) and v.meta[i]['fps'] == 10  # 30 -> 10 fps: 0, 3, 6...
  v, i = videos['g.gif']
  assert np.array_equal(v.video(i), source['g.gif'][::2]) and v.meta[i]['fps'] == 10
  v, i = videos['n.npy']
  assert np.array_equal(v.video(i), source['n.npy']) and v.meta[i]['fps'] is None
  code, _, _ = data_cli(capsys, 'prepare', 'videos', '--data_dir', str(tmp_path), '--no_progress', '--stride', '4',
                        '--min_frames', '5', '--force')
  assert code == 0
  videos = {n: (v, i) for v in store_videos(str(tmp_path)).values() for i, n in enumerate(v.names)}
  v, i = videos['v30.mp4']
  assert np.array_equal(v.video(i), source['v30.mp4'][::4]) and v.meta[i]['fps'] == 7.5


def test_channels_option(tmp_path, capsys):
  raw = tmp_path / 'raw'
  raw.mkdir()
  colour = moving(20, 64, 64, seed=1)
  np.save(raw / 'c.npy', colour)
  np.save(raw / 'g.npy', moving(20, 64, 64, channels=1)[..., 0])
  assert data_cli(capsys, 'prepare', 'videos', '--data_dir', str(tmp_path), '--no_progress', '--channels', '1')[0] == 0
  videos = {n: (v, i) for v in store_videos(str(tmp_path)).values() for i, n in enumerate(v.names)}
  v, i = videos['c.npy']
  assert v.nc == 1 and np.array_equal(v.video(i), clips.fit(colour, 1))


def _write_bad(tmp_path, kind):
  raw = tmp_path / 'raw'
  raw.mkdir()
  np.save(raw / 'good.npy', moving(20, 64, 64))
  if kind == 'no_clips':
    os.remove(raw / 'good.npy')
    (raw / 'readme.txt').write_text('no clip here')
    return 'no clip found under'
  if kind == 'unreadable':
    (raw / 'bad.mp4').write_bytes(os.urandom(4096))
    return 'bad.mp4'
  if kind == 'truncated':
    rf.write_video(str(raw / 'cut.mp4'), moving(30, 64, 64), fps=25, codec='libx264')
    data = (raw / 'cut.mp4').read_bytes()
    (raw / 'cut.mp4').write_bytes(data[:len(data) // 2])
    return 'cut.mp4'
  if kind == 'empty':
    np.save(raw / 'empty.npy', np.zeros((0, 64, 64), np.uint8))
    return 'empty.npy has 0 frames'
  if kind == 'all_short':
    np.save(raw / 'good.npy', moving(3, 64, 64))
    return 'no usable clip under'
  raise AssertionError(kind)


@pytest.mark.parametrize('kind', ['no_clips', 'unreadable', 'truncated', 'empty', 'all_short'])
def test_bad_clips_one_line_nothing_written(tmp_path, capsys, kind):
  expected = _write_bad(tmp_path, kind)
  code, out, err = data_cli(capsys, 'prepare', 'videos', '--data_dir', str(tmp_path), '--no_progress')
  assert code == 1 and err.startswith('error: ') and err.count('\n') == 1 and expected in err, err
  assert kind == 'no_clips' or 'remove' in err or 'longer clips' in err  # The fix.
  assert not os.path.exists(tmp_path / store.STORE_DIR), os.listdir(tmp_path / store.STORE_DIR)


def test_data_dir_errors(tmp_path, capsys):
  path = tmp_path / 'file'
  path.write_text('x')
  for command in ('prepare', 'inspect', 'make_test_set'):
    code, _, err = data_cli(capsys, command, 'videos', '--data_dir', str(path))
    assert code == 1 and err.count('\n') == 1 and 'is a file, not a folder' in err
  code, _, err = data_cli(capsys, 'prepare', 'videos', '--data_dir', str(tmp_path / 'none'))
  assert code == 1 and err.count('\n') == 1 and 'put your clips in' in err
  code, _, err = data_cli(capsys, 'prepare', 'videos', '--data_dir', str(tmp_path))
  assert code == 1 and 'no folder' in err and 'raw' in err
  code, _, err = data_cli(capsys, 'make_test_set', 'videos', '--data_dir', str(tmp_path))
  assert code == 1 and 'prepare videos' in err


@pytest.mark.parametrize('argv, expected', [
    (['prepare', 'kth', '--fps', '10'], '--fps applies to prepare videos only'),
    (['make_test_set', 'videos', '--channels', '1'], '--channels applies to prepare videos only'),
    (['prepare', 'videos', '--fps', '10', '--stride', '2'], 'give one'),
    (['prepare', 'videos', '--test_fraction', '1'], '--test_fraction must be in [0, 1)'),
])
def test_usage_errors(tmp_path, capsys, argv, expected):
  code, _, err = data_cli(capsys, *argv, '--data_dir', str(tmp_path))
  assert code == 2 and expected in err


def test_make_test_set_draws(own, capsys):
  root, _, _ = own
  code, out, _ = data_cli(capsys, 'make_test_set', 'videos', '--data_dir', root, '--size', str(TEST['size']),
                          '--seq_len', str(TEST['seq_len']))
  assert code == 0
  test = store.StoreVideos(root, 'test')
  rng = np.random.RandomState(42)
  expected = []
  for _ in range(TEST['size']):
    i = rng.randint(len(test))
    expected.append(np.asarray(test.clip(i, rng.randint(int(test.lengths[i]) - TEST['seq_len'] + 1), TEST['seq_len'])))
  with np.load(out.split(' written to ')[1].strip()) as f:
    assert np.array_equal(f['sequences'], np.stack(expected))


def test_train_evaluate_predict(own, tmp_path, capsys):
  """make_test_set -> launch.py (2 steps, nc from the store) -> evaluate -> predict future, as for every dataset."""
  root, _, _ = own
  assert data_cli(capsys, 'make_test_set', 'videos', '--data_dir', root, '--size', str(TEST['size']), '--seq_len',
                  str(TEST['seq_len']))[0] == 0
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'eval')
  res = subprocess.run([sys.executable, 'launch.py', '--config', 'configs/videos.py', '--workdir', workdir,
                        f'--config.data_dir={root}'] + [f'--config.{k}={v}' for k, v in TINY.items()], cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True, timeout=600,
                       check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    assert json.load(f)['nc'] == 3  # nc=0: the store's.
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if 'loss' in r] == [1, 2]
  assert all(math.isfinite(r['loss']) for r in records if 'loss' in r)
  # evaluate and predict: their mains in this process (their command lines and process-level errors are tested in
  # test_evaluate.py and test_predict.py).
  code = evaluate.main([workdir, '--data_dir', root, '--metrics', 'psnr,ssim', '--n_samples', '2', '--nt_gen',
                        str(TEST['seq_len']), '--n_show', '0', '--out', out, '--no_progress'])
  assert code == 0, capsys.readouterr().err
  with open(os.path.join(out, 'results.json'), encoding='utf-8') as f:
    report = json.load(f)
  assert report['config']['dataset'] == 'videos' and report['n_videos'] == TEST['size']
  assert math.isfinite(report['metrics']['psnr']['mean'])
  assert predict.main(['future', workdir, '--input', os.path.join(root, 'raw', 'more', 'b.mp4'), '--n_future', '3',
                       '--n_samples', '2', '--out', str(tmp_path / 'pred')]) == 0, capsys.readouterr().err
  with np.load(tmp_path / 'pred' / 'future.npz') as f:
    assert all(np.all(np.isfinite(f[k])) for k in f.files if f[k].dtype.kind == 'f')


def test_training_without_store_is_one_line(tmp_path):
  res = subprocess.run([sys.executable, 'launch.py', '--config', 'configs/videos.py', '--workdir', str(tmp_path / 'r'),
                        f'--config.data_dir={tmp_path}'], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                       capture_output=True, text=True, timeout=300, check=False)
  lines = [line for line in res.stderr.splitlines() if line.strip()]
  assert res.returncode == 2 and len(lines) == 1 and 'prepare videos' in lines[-1], res.stderr[-2000:]
