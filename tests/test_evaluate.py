"""Evaluation (srvp_jax.evaluate): start-up errors, outputs of an end-to-end run, the converted official
vgg_skip (BAIR) checkpoint, LPIPS import order and backbone rules, test-set CLI dispatch.

What tests/test_metrics.py already checks (PSNR / SSIM against NumPy, best / worst selection against the
official loop, the Fréchet distance closed form) is not repeated; here the selection is checked as the
evaluation uses it (chunks padded with NaN samples, a last batch padded with repeated videos).
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from srvp_jax import checkpoints, evaluate, evaluation
from srvp_jax.evaluation import learned_metrics, report
from srvp_jax import config as config_lib
from srvp_jax.data import mmnist
from srvp_jax.preparation import cli as data_cli
from srvp_jax.preparation import mmnist as mmnist_prep
from srvp_jax.metrics import image
from srvp_jax.model import abstract_model

from helpers import random_tree  # pylint: disable=wrong-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_VGG = os.path.join(ROOT, 'tests', 'data', 'golden', 'vgg_skip')
TINY = dict(dataset='smmnist', nc=1, nf=4, nhx=8, ny=3, nz=3, nh_inf=8, nh_res=8, nlayers_inf=2, nlayers_res=2,
            nt_inf=2, nt_cond=2, seq_len=5, seq_len_test=6)
N_VIDEOS, NT_COND, NT_GEN = 3, 2, 5
IMAGE_FILES = ('comparison.png', 'comparison.gif', 'per_frame.png')


# --------------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny checkpoint folder and a tiny official Moving MNIST test set.


def write_checkpoint_folder(workdir, cfg, steps=(0,), best_steps=(), seed=0):
  """A folder with the layout training writes (random models): configs and one orbax manager whose
  ``best_steps`` carry a validation PSNR (the best-checkpoint policy ranks them) and ``steps`` do not."""
  folder = checkpoints.RunFolder(workdir, keep=None)
  folder.save_config(cfg)
  model = abstract_model(cfg)
  folder.create()
  trees = {}
  for step in sorted(set(steps) | set(best_steps)):
    trees[step] = random_tree(model, seed + step)
    metrics = {'val_psnr': 30.0 + step} if step in best_steps else None
    folder.save(step, trees[step], meta={'step': step}, metrics=metrics)
  folder.close()
  return trees


def tiny_config(**overrides):
  return config_lib.with_overrides(**{**TINY, **overrides})


@pytest.fixture(scope='module')
def tiny_ckpt(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('ckpt'))
  write_checkpoint_folder(workdir, tiny_config(), steps=(2, 4), best_steps=(3,))
  return workdir


@pytest.fixture(scope='module')
def mmnist_dir(tmp_path_factory):
  """The official stochastic Moving MNIST test file format, N_VIDEOS videos of 6 frames (random digits)."""
  data_dir = str(tmp_path_factory.mktemp('mmnist'))
  rng = np.random.default_rng(0)
  images = np.zeros((2 * N_VIDEOS, 28, 28), np.uint8)
  images[:, 5:23, 8:20] = rng.integers(0, 256, (2 * N_VIDEOS, 18, 12), dtype=np.uint8)
  labels = rng.integers(0, 10, 2 * N_VIDEOS).astype(np.uint8)
  arrays = mmnist_prep.official_test_set(images, labels, deterministic=False, seq_len=6, n_videos=N_VIDEOS)
  np.savez_compressed(os.path.join(data_dir, mmnist.test_set_filename(False)), **arrays)
  return data_dir


def _one_error_line(capsys):
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  assert 'Traceback' not in err
  return lines[0]


def _samples(out_dir, name):
  with np.load(os.path.join(out_dir, f'{name}.npz')) as f:
    assert list(f.keys()) == ['samples']
    return f['samples']


# --------------------------------------------------------------------------------------------------------------------
# Start-up errors: one line, exit status 2, nothing compiled.


def test_startup_errors_are_one_line(tiny_ckpt, mmnist_dir, tmp_path, capsys):
  only_config = str(tmp_path / 'only_config')
  checkpoints.RunFolder(only_config).save_config(tiny_config())
  base = ['--metrics', 'psnr', '--out', str(tmp_path / 'out')]  # The cases' own options come after (and win).
  cases = [
      (tiny_ckpt, ['--data_dir', str(tmp_path / 'missing')], 'data directory'),
      (tiny_ckpt, ['--data_dir', str(tmp_path)], 'make_test_set mmnist'),  # Folder without the test file.
      (tiny_ckpt, ['--data_dir', mmnist_dir, '--metrics', 'psnr,foo'], 'unknown metric'),
      (tiny_ckpt, ['--data_dir', mmnist_dir, '--metrics', ','], 'unknown metric'),
      (tiny_ckpt, ['--data_dir', mmnist_dir, '--nt_gen', '2'], 'no frame to predict'),
      (tiny_ckpt, ['--data_dir', mmnist_dir, '--nt_cond', '4', '--nt_gen', '4'], 'no frame to predict'),
      (tiny_ckpt, ['--data_dir', mmnist_dir, '--nt_cond', '1'], 'nt_inf'),
      (tiny_ckpt, ['--data_dir', mmnist_dir, '--nt_gen', '9'], 'seq_len=9'),  # The test set has 6 frames.
      (tiny_ckpt, ['--data_dir', mmnist_dir], 'seq_len=25'),  # Default: the paper's 25 frames (smmnist).
      (tiny_ckpt, ['--data_dir', mmnist_dir, '--n_samples', '0'], 'positive'),
      (tiny_ckpt, ['--data_dir', mmnist_dir, '--bogus'], 'unrecognized'),
      (tiny_ckpt, [], 'data_dir'),
      (str(tmp_path / 'no_ckpt'), ['--data_dir', mmnist_dir], 'not found'),
      (only_config, ['--data_dir', mmnist_dir], 'no checkpoint'),
      (tiny_ckpt, ['--data_dir', mmnist_dir, '--checkpoint', '9'], 'no checkpoint for step 9'),
      (GOLDEN_VGG, ['--data_dir', mmnist_dir, '--checkpoint', 'best'], 'choose its weights with --model_name'),
      (GOLDEN_VGG, ['--data_dir', mmnist_dir], 'BAIR test videos not found'),  # Official folder: read directly.
      (tiny_ckpt, ['--data_dir', mmnist_dir, '--model_name', 'model.pt'], 'applies to official experiment'),
      (tiny_ckpt, ['--data_dir', mmnist_dir, '--compare_official', str(tmp_path / 'nope.json')], 'nope.json'),
      (tiny_ckpt, ['--data_dir', mmnist_dir, '--metrics', 'fvd', '--nt_gen', '5'], 'FVD needs'),
  ]
  for ckpt, options, expected in cases:
    assert evaluate.main([ckpt] + base + options) == 2, options
    line = _one_error_line(capsys)
    assert expected in line, (options, line)
  assert not os.path.exists(tmp_path / 'out')  # Nothing written before the checks pass.


def test_command_line_error_exit_status(tiny_ckpt, tmp_path):
  """``python -m srvp_jax.evaluate`` itself: one line on stderr, exit status 2, no traceback."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'srvp_jax.evaluate', tiny_ckpt, '--data_dir', str(tmp_path / 'missing'),
                         '--metrics', 'psnr'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 2
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: data directory'), proc.stderr


def test_checkpoint_choice(tiny_ckpt):
  saved = {}
  for which, (sub, step) in {'best': ('best', 3), 'latest': ('checkpoints', 4), '2': ('checkpoints', 2)}.items():
    model, cfg, got_step = evaluate.load_model(tiny_ckpt, which)
    assert got_step == step and cfg.nf == TINY['nf']
    kernel = np.asarray(model.q_z.dense.kernel[...])
    assert not any(np.array_equal(kernel, k) for k in saved.values())  # Each its own variables.
    saved[which] = kernel


# --------------------------------------------------------------------------------------------------------------------
# End to end on a tiny model: every output, and its consistency.


@pytest.fixture(scope='module')
def tiny_eval(tiny_ckpt, mmnist_dir, tmp_path_factory):
  """Evaluation of 3 videos, 7 samples in chunks of 3 (last chunk padded), batches of 2 (last batch padded)."""
  out = str(tmp_path_factory.mktemp('eval'))
  argv = [tiny_ckpt, '--data_dir', mmnist_dir, '--metrics', 'psnr,ssim', '--nt_gen', str(NT_GEN), '--n_samples', '7',
          '--sample_chunk', '3', '--batch_size', '2', '--seed', '5', '--out', out]
  assert evaluate.main(argv) == 0
  return out


def test_end_to_end_outputs(tiny_eval, mmnist_dir):
  out = tiny_eval
  nt_pred = NT_GEN - NT_COND
  truth = mmnist.load_test_set(mmnist_dir, False, NT_GEN)
  video_shape = (N_VIDEOS, nt_pred, 64, 64, 1)
  names = ('psnr', 'ssim')
  expected_files = {'results.json', 'results.npz', 'sample_metrics.npz', 'cond_rec.npz', *IMAGE_FILES,
                    *(f'random_{i}.npz' for i in range(1, 6)),
                    *(f'{m}_{k}.npz' for m in names for k in ('best', 'worst'))}
  assert set(os.listdir(out)) == expected_files

  randoms = [_samples(out, f'random_{i}') for i in range(1, 6)]
  for videos in randoms + [_samples(out, f'{m}_{k}') for m in names for k in ('best', 'worst')]:
    assert videos.shape == video_shape and videos.dtype == np.uint8
  cond_rec = _samples(out, 'cond_rec')
  assert cond_rec.shape == (N_VIDEOS, NT_COND, 64, 64, 1) and cond_rec.dtype == np.uint8
  assert not all(np.array_equal(randoms[0], r) for r in randoms[1:])  # Samples differ.

  with np.load(os.path.join(out, 'results.npz')) as f:
    results = dict(f)
  with np.load(os.path.join(out, 'sample_metrics.npz')) as f:
    per_sample = dict(f)
  with open(os.path.join(out, 'results.json'), encoding='utf-8') as f:
    report = json.load(f)
  assert sorted(results) == sorted(names)
  assert report['n_videos'] == N_VIDEOS
  # The default is the final weights (the official test.py loads model.pt), not the best validation.
  assert report['checkpoint']['step'] == 4 and report['checkpoint']['which'] == 'latest'
  assert report['options']['compute_dtype'] == 'float32' and report['options']['precision'] == 'float32'
  assert report['options']['nt_cond'] == NT_COND and report['options']['nt_pred'] == nt_pred
  assert report['options']['n_samples'] == 7 and report['options']['sample_chunk'] == 3
  assert report['config']['dataset'] == 'smmnist' and report['lpips_backbone'] is None and report['fvd'] is None
  assert report['per_frame_first_frame'] == NT_COND + 1 and report['predicted_frames'] == N_VIDEOS * 7 * nt_pred
  for m in names:
    best = results[m]
    assert best.shape == (N_VIDEOS,) and best.dtype == np.float32 and np.isfinite(best).all()
    # The table of results.json is the mean and official 95% interval of results.npz.
    n = len(best)
    assert report['metrics'][m]['mean'] == pytest.approx(float(np.mean(best.astype(np.float64))), rel=1e-12)
    assert report['metrics'][m]['interval95'] == pytest.approx(1.96 * np.std(best.astype(np.float64)) / np.sqrt(n))
    # Best / worst are the official selection over the 7 samples (first sample wins ties), NaN padding never chosen.
    values = per_sample[m]
    assert values.shape == (7, N_VIDEOS) and np.isfinite(values).all()
    np.testing.assert_array_equal(best, values.max(axis=0))
    np.testing.assert_array_equal(per_sample[f'{m}_best_index'], values.argmax(axis=0))
    np.testing.assert_array_equal(per_sample[f'{m}_worst'], values.min(axis=0))
    np.testing.assert_array_equal(per_sample[f'{m}_worst_index'], values.argmin(axis=0))
    frames = per_sample[f'{m}_per_frame']
    assert frames.shape == (N_VIDEOS, nt_pred)
    np.testing.assert_allclose(frames.mean(axis=1), best, rtol=1e-5)
    np.testing.assert_allclose(report['per_frame'][m], frames.mean(axis=0), rtol=1e-5)
    # A saved best / worst video is the sample its index names whenever that sample is also a random one.
    for kind in ('best', 'worst'):
      videos, index = _samples(out, f'{m}_{kind}'), per_sample[f'{m}_{kind}_index']
      for v in range(N_VIDEOS):
        if index[v] < 5:
          np.testing.assert_array_equal(videos[v], randoms[index[v]][v])
  # The saved uint8 videos are those the metrics were computed on (up to the official truncation to bytes).
  target = truth[:, NT_COND:].astype(np.float32) / 255.
  for i, videos in enumerate(randoms):
    got = np.asarray(image.psnr(videos.astype(np.float32) / 255., target)).mean(axis=1)
    np.testing.assert_allclose(got, per_sample['psnr'][i], atol=0.05)
  got = np.asarray(image.psnr(_samples(out, 'psnr_best').astype(np.float32) / 255., target)).mean(axis=1)
  np.testing.assert_allclose(got, results['psnr'], atol=0.05)
  got = np.asarray(image.psnr(_samples(out, 'psnr_worst').astype(np.float32) / 255., target)).mean(axis=1)
  np.testing.assert_allclose(got, per_sample['psnr_worst'], atol=0.05)

  png = Image.open(os.path.join(out, 'comparison.png'))
  assert png.mode == 'RGB' and png.width > NT_GEN * 64 and png.height > N_VIDEOS * 64
  gif = Image.open(os.path.join(out, 'comparison.gif'))
  assert gif.n_frames == NT_GEN
  assert Image.open(os.path.join(out, 'per_frame.png')).width > 0


def _ssim_spec_numpy(pred, target):
  """docs/srvp.md section 5 SSIM in float64, written independently of dm-pix: separable normalised 1-D Gaussian (11 taps,
  sigma 1.5), valid filtering, k1 0.01, k2 0.03, mean over pixels then channels. (..., H, W, C) -> (...)."""
  taps = np.exp(-(np.arange(11) - 5.) ** 2 / (2 * 1.5 ** 2))
  taps /= taps.sum()

  def filt(x):
    rows = sum(taps[i] * x[..., i:x.shape[-3] - 10 + i, :, :] for i in range(11))
    return sum(taps[j] * rows[..., :, j:x.shape[-2] - 10 + j, :] for j in range(11))

  x, y = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mx, my = filt(x), filt(y)
  vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
  ssim_map = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
  return ssim_map.mean(axis=(-3, -2)).mean(axis=-1)


def test_results_do_not_depend_on_chunk_or_batch_size(tiny_eval, tiny_ckpt, mmnist_dir):
  """Noise is key(seed) -> video -> sample: one chunk of 7 and one batch of 3 give the same samples as chunks of 3
  and batches of 2. The in-graph SSIM (dm-pix) of the predictions equals the formula of docs/srvp.md section 5 in
  NumPy, computed on the same float predictions (passed through the hook LPIPS uses)."""
  model, _, _ = evaluate.load_model(tiny_ckpt, 'latest')
  videos = mmnist.load_test_set(mmnist_dir, False, NT_GEN)
  seen = []

  def numpy_ssim(pred, target):
    seen.append(pred.shape)
    return _ssim_spec_numpy(pred, target)

  res = evaluation.evaluate_videos(model, videos, nt_cond=NT_COND, n_samples=7, n_euler_steps=1, batch_size=8, seed=5,
                                 metrics=('psnr', 'ssim', 'lpips'), sample_chunk=7, lpips_fn=numpy_ssim,
                                 progress=False)
  assert seen == [(7, N_VIDEOS, NT_GEN - NT_COND, 64, 64, 1)]  # One batch of 3 videos (8 capped), one chunk.
  with np.load(os.path.join(tiny_eval, 'sample_metrics.npz')) as f:
    for m in ('psnr', 'ssim'):
      np.testing.assert_allclose(res['sample_values'][m], f[m], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res['sample_values']['lpips'], f['ssim'], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(res['random'][0], _samples(tiny_eval, 'random_1'))
  np.testing.assert_array_equal(res['cond_rec'], _samples(tiny_eval, 'cond_rec'))
  np.testing.assert_array_equal(res['best']['psnr'], _samples(tiny_eval, 'psnr_best'))


def test_missing_best_names_the_checkpoints_that_exist(tmp_path, mmnist_dir, capsys):
  """A run stopped before its first validation has latest checkpoints only: --checkpoint best says so (the main in
  this process; the process-level error: test_command_line_error_exit_status)."""
  workdir = str(tmp_path / 'run')
  write_checkpoint_folder(workdir, tiny_config(), steps=(2,))
  code = evaluate.main([workdir, '--data_dir', mmnist_dir, '--checkpoint', 'best'])
  stderr = capsys.readouterr().err
  assert code == 2 and 'Traceback' not in stderr, stderr
  last = stderr.strip().splitlines()[-1]
  assert 'no validated checkpoint' in last and '[2]' in last and '--checkpoint latest' in last, last


def test_fvd_on_fewer_than_16_videos_says_why_it_is_not_comparable():
  note = report.fvd_note(4)
  assert note and 'at least one chunk of 16 videos' in note and 'not comparable' in note and '\n' not in note
  assert report.fvd_note(16) is None and report.fvd_note(256) is None


def test_bfloat16_trained_model_is_evaluated_in_float32(tmp_path):
  workdir = str(tmp_path / 'run')
  write_checkpoint_folder(workdir, tiny_config(compute_dtype='bfloat16'), steps=(1,))
  model, cfg, _ = evaluate.load_model(workdir, 'latest', compute_dtype='float32')
  assert cfg.compute_dtype == 'float32'
  assert model.decoder.stages[0][0].conv.dtype == jnp.float32
  model16, _, _ = evaluate.load_model(workdir, 'latest')
  assert model16.decoder.stages[0][0].conv.dtype == jnp.bfloat16
  assert evaluate.parse_args([workdir, '--data_dir', 'x']).compute_dtype == 'float32'


def test_test_time_euler_steps_keep_the_conditioning_inference(tiny_ckpt, mmnist_dir):
  """--n_euler_steps changes the rollout only: cond_rec is inferred with the training value (official test.py)."""
  model, cfg, _ = evaluate.load_model(tiny_ckpt, 'best')
  videos = mmnist.load_test_set(mmnist_dir, False, NT_GEN)
  run = lambda steps: evaluation.evaluate_videos(
      model, videos, nt_cond=NT_COND, n_samples=2, n_euler_steps=steps, train_euler_steps=int(cfg.n_euler_steps),
      batch_size=8, seed=5, metrics=('psnr',), sample_chunk=2, progress=False)
  same, other = run(int(cfg.n_euler_steps)), run(int(cfg.n_euler_steps) + 2)
  np.testing.assert_array_equal(same['cond_rec'], other['cond_rec'])
  assert not np.array_equal(same['sample_values']['psnr'], other['sample_values']['psnr'])


# --------------------------------------------------------------------------------------------------------------------
# The official vgg_skip reference checkpoint (BAIR, nc=3), converted, on a BAIR test set in the official layout.


@pytest.fixture(scope='module')
def bair_dir(tmp_path_factory):
  """processed_data/test/<tfrecord>/<k:03d>/000.png..029.png, as the official BAIR convert.py writes them."""
  root = str(tmp_path_factory.mktemp('bair'))
  rng = np.random.default_rng(3)
  yy, xx = np.mgrid[:64, :64]
  for record, k in (('traj_0_to_255', 1), ('traj_0_to_255', 2), ('traj_256_to_511', 1)):
    video_dir = os.path.join(root, 'processed_data', 'test', record, f'{k:03d}')
    os.makedirs(video_dir)
    color = rng.integers(60, 256, 3)
    for i in range(30):  # A coloured disc moving over a noisy background.
      frame = rng.integers(0, 40, (64, 64, 3)).astype(np.uint8)
      frame[(yy - 20 - i) ** 2 + (xx - 32) ** 2 < 64] = color
      Image.fromarray(frame).save(os.path.join(video_dir, f'{i:03d}.png'))
  return root


def test_converted_official_vgg_skip_checkpoint_on_bair(bair_dir, tmp_path):
  import convert_torch_ckpt  # pylint: disable=import-outside-toplevel
  with open(os.path.join(GOLDEN_VGG, 'config.json'), encoding='utf-8') as f:
    official = json.load(f)
  assert official['dataset'] == 'bair' and official['nc'] == 3 and official['archi'] == 'vgg' and official['skipco']
  ckpt = str(tmp_path / 'converted')
  assert convert_torch_ckpt.main([GOLDEN_VGG, '--out', ckpt]) == 0
  out = str(tmp_path / 'eval')
  nt_gen = 5
  assert evaluate.main([ckpt, '--data_dir', bair_dir, '--metrics', 'psnr,ssim', '--nt_gen', str(nt_gen), '--n_samples',
                        '3', '--batch_size', '2', '--n_show', '2', '--out', out, '--no_progress']) == 0
  nt_cond = official['nt_cond']
  with open(os.path.join(out, 'results.json'), encoding='utf-8') as f:
    report = json.load(f)
  assert report['config']['dataset'] == 'bair' and report['checkpoint']['step'] == 0
  assert report['options']['nt_cond'] == nt_cond and report['options']['n_euler_steps'] == official['n_euler_steps']
  assert report['n_videos'] == 3
  with np.load(os.path.join(out, 'results.npz')) as f:
    results = dict(f)
  assert sorted(results) == ['psnr', 'ssim']
  for m, values in results.items():
    assert values.shape == (3,) and np.isfinite(values).all()
    assert report['metrics'][m]['mean'] == pytest.approx(float(np.mean(values.astype(np.float64))), rel=1e-12)
  assert (results['ssim'] <= 1).all() and (results['psnr'] > 0).all()
  # The official folder itself (converted in memory, as the official test.py --xp_dir) gives the same numbers.
  out_official = str(tmp_path / 'eval_official')
  assert evaluate.main([GOLDEN_VGG, '--data_dir', bair_dir, '--metrics', 'psnr,ssim', '--nt_gen', str(nt_gen),
                        '--n_samples', '3', '--batch_size', '2', '--n_show', '0', '--out', out_official,
                        '--no_progress']) == 0
  with np.load(os.path.join(out_official, 'results.npz')) as f:
    for m, values in f.items():
      np.testing.assert_array_equal(values, results[m])
  for name in ['random_1', 'random_3', 'psnr_best', 'psnr_worst', 'ssim_best', 'ssim_worst']:
    videos = _samples(out, name)
    assert videos.shape == (3, nt_gen - nt_cond, 64, 64, 3) and videos.dtype == np.uint8
  assert _samples(out, 'cond_rec').shape == (3, nt_cond, 64, 64, 3)
  assert all(os.path.isfile(os.path.join(out, name)) for name in IMAGE_FILES)


# --------------------------------------------------------------------------------------------------------------------
# LPIPS: torch / torchvision before TensorFlow, and the AlexNet backbone rules.

_TF_LOADER_SCRIPT = '''
import sys
from srvp_jax import evaluate

original = evaluate.load_test_videos


def load_with_tensorflow(*args, **kwargs):
  """A test-set loader that imports TensorFlow (as the TFDS digits source does) before LPIPS is built."""
  import tensorflow  # pylint: disable=unused-import
  return original(*args, **kwargs)


evaluate.load_test_videos = load_with_tensorflow
sys.exit(evaluate.main(sys.argv[1:]))
'''


def test_lpips_end_to_end_with_tensorflow_in_the_process(tiny_ckpt, mmnist_dir, tmp_path):
  """TensorFlow before torchvision segfaults (exit 139): the evaluation imports torch / torchvision first."""
  out = str(tmp_path / 'eval')
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='3',
             TORCH_HOME=str(tmp_path / 'torch_home'), **{evaluate.RANDOM_BACKBONE_ENV: '1'})
  argv = [tiny_ckpt, '--data_dir', mmnist_dir, '--metrics', 'psnr,lpips', '--nt_gen', '4', '--n_samples', '2',
          '--n_show', '0', '--no_progress', '--out', out]
  proc = subprocess.run([sys.executable, '-c', _TF_LOADER_SCRIPT] + argv, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'RANDOM backbone' in proc.stderr and 'not comparable' in proc.stdout
  with open(os.path.join(out, 'results.json'), encoding='utf-8') as f:
    report = json.load(f)
  assert report['lpips_backbone'] == evaluate.RANDOM_BACKBONE_NOTE
  with np.load(os.path.join(out, 'results.npz')) as f:
    assert sorted(f.keys()) == ['lpips', 'psnr']
    lpips = f['lpips']
  assert lpips.shape == (N_VIDEOS,) and np.isfinite(lpips).all() and (lpips > 0).all()
  with np.load(os.path.join(out, 'sample_metrics.npz')) as f:
    np.testing.assert_array_equal(lpips, f['lpips'].min(axis=0))  # Lower is better.
  assert _samples(out, 'lpips_best').shape == (N_VIDEOS, 2, 64, 64, 1)


def _no_tensorflow_first():
  if 'tensorflow' in sys.modules and 'torchvision' not in sys.modules:
    pytest.skip('TensorFlow was imported before torchvision in this process')


def test_lpips_without_backbone_fails_at_startup(tiny_ckpt, mmnist_dir, tmp_path, monkeypatch, capsys):
  _no_tensorflow_first()
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
  monkeypatch.delenv(evaluate.RANDOM_BACKBONE_ENV, raising=False)
  argv = [tiny_ckpt, '--data_dir', mmnist_dir, '--metrics', 'psnr,lpips', '--out', str(tmp_path / 'out')]
  assert evaluate.main(argv) == 2
  line = _one_error_line(capsys)
  assert 'alexnet-owt-7be5be79.pth' in line and '--lpips_backbone' in line
  assert os.path.join(str(tmp_path), 'torch_home', 'hub', 'checkpoints') in line
  # A configured real backbone is never replaced by a random one, even with the test hook.
  monkeypatch.setenv(evaluate.RANDOM_BACKBONE_ENV, '1')
  assert evaluate.main(argv + ['--lpips_backbone', str(tmp_path / 'missing.pth')]) == 2
  assert 'missing.pth not found' in _one_error_line(capsys)
  cached = tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'alexnet-owt-7be5be79.pth'
  cached.parent.mkdir(parents=True)
  cached.write_bytes(b'')
  assert learned_metrics.resolve_lpips_backbone(None) == str(cached)  # The cache wins over the hook.
  monkeypatch.delenv(evaluate.RANDOM_BACKBONE_ENV)
  assert learned_metrics.resolve_lpips_backbone(None) == str(cached)
  assert not os.path.exists(tmp_path / 'out')


def test_lpips_refused_after_tensorflow(tiny_ckpt, mmnist_dir, tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, 'tensorflow', object())
  monkeypatch.delitem(sys.modules, 'torchvision', raising=False)
  argv = [tiny_ckpt, '--data_dir', mmnist_dir, '--metrics', 'lpips', '--out', str(tmp_path / 'out')]
  assert evaluate.main(argv) == 2
  assert 'fresh process' in _one_error_line(capsys)


# --------------------------------------------------------------------------------------------------------------------
# python -m srvp_jax.data make_test_set {mmnist,kth,human}.


def test_make_test_set_cli(tmp_path, capsys):
  for name in ('kth', 'human'):
    assert data_cli.main(['make_test_set', name, '--data_dir', str(tmp_path / 'missing')]) == 1
    assert 'not found' in _one_error_line(capsys)
  # Human3.6M end to end: official draws (legacy NumPy seed 42) over the sorted test videos.
  from srvp_jax import config  # pylint: disable=import-outside-toplevel
  from srvp_jax.data import get_dataset  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(4)
  os.makedirs(tmp_path / 'test')
  sources = {}
  for name, n in (('S9-Walking', 12), ('S11-Eating 1', 9)):
    sources[name] = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    np.savez(tmp_path / 'test' / name, image=sources[name])
  assert data_cli.main(['make_test_set', 'human', '--data_dir', str(tmp_path), '--size', '3', '--seq_len', '4',
                        '--subsampling', '2']) == 0
  names = sorted(sources)
  draws = np.random.RandomState(42)
  cfg = config.default_config()
  cfg.update(dataset='human', nc=3, subsampling=2)
  videos = get_dataset(cfg, str(tmp_path)).test_set(4)
  assert videos.shape == (3, 4, 64, 64, 3) and videos.dtype == np.uint8
  for i in range(3):
    source = sources[names[draws.randint(len(names))]]
    start = draws.randint(len(source) - 7 + 1)
    np.testing.assert_array_equal(videos[i], source[start:start + 7:2])
