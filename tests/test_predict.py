"""User-clip tools (srvp_jax.predict, srvp_jax.clips): readers, fitting, the three commands end to end on a
tiny checkpoint, their exact relations to the model's reconstruction and Euler states, and one-line errors."""

import os
import subprocess
import sys

import imageio_ffmpeg
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image, ImageSequence

from srvp_jax import checkpoints, clips, predict
from srvp_jax import config as config_lib
from srvp_jax.model import abstract_model

from helpers import random_tree  # pylint: disable=wrong-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DCGAN = os.path.join(ROOT, 'tests', 'data', 'golden', 'dcgan')  # An official folder: config.json + model.pt.
# dcgan with skip connections (the swap takes A's skips) and 2 Euler steps per frame (interpolation).
TINY = dict(dataset='smmnist', nc=1, nf=4, nhx=8, ny=3, nz=3, nh_inf=8, nh_res=8, nlayers_inf=2, nlayers_res=2,
            nt_inf=2, nt_cond=3, seq_len=5, skipco=True, n_euler_steps=2)
N_EULER = TINY['n_euler_steps']
T_CLIP = 7


# --------------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny checkpoint folder and one clip written in every format.


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('ckpt'))
  cfg = config_lib.with_overrides(**TINY)
  folder = checkpoints.RunFolder(workdir)
  folder.save_config(cfg)
  folder.save(7, random_tree(abstract_model(cfg), 0, bias_scale=0.3), meta={'step': 7})
  folder.close()
  return workdir


@pytest.fixture(scope='module')
def loaded(ckpt):
  model, cfg, step = checkpoints.load_model(ckpt, 'latest')
  assert step == 7
  return model, cfg


def _frames(t=T_CLIP, h=72, w=90):
  """Grey RGB frames (R = G = B, so a GIF palette is lossless) of a bright square moving on a gradient."""
  frames = np.empty((t, h, w, 3), np.uint8)
  yy, xx = np.mgrid[:h, :w]
  for i in range(t):
    grey = (40 + 100 * xx / w).astype(np.uint8)
    grey[20:40, 10 + 6 * i:30 + 6 * i] = 230
    frames[i] = grey[..., None]
  return frames


@pytest.fixture(scope='module')
def clip_files(tmp_path_factory):
  d = tmp_path_factory.mktemp('clips')
  frames = _frames()
  paths = {'npy': str(d / 'clip.npy'), 'npz': str(d / 'clip.npz'), 'gif': str(d / 'clip.gif'),
           'png': str(d / 'frames'), 'mp4': str(d / 'clip.mp4')}
  np.save(paths['npy'], frames)
  np.savez(paths['npz'], video=frames)
  images = [Image.fromarray(f) for f in frames]
  images[0].save(paths['gif'], save_all=True, append_images=images[1:], duration=200, loop=0)
  os.makedirs(paths['png'])
  for i, image in enumerate(images):  # frame_10 after frame_9: file-name order with numbers as numbers.
    image.save(os.path.join(paths['png'], f'frame_{i + 5}.png'))
  writer = imageio_ffmpeg.write_frames(paths['mp4'], (96, 80), fps=10, quality=10)
  writer.send(None)
  for f in frames:
    writer.send(np.ascontiguousarray(np.pad(f, ((0, 8), (0, 6), (0, 0)), mode='edge')).tobytes())
  writer.close()
  return frames, paths


def _one_error_line(capsys):
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  return lines[0]


# --------------------------------------------------------------------------------------------------------------------
# Clips.


def test_readers_give_the_same_frames(clip_files):
  frames, paths = clip_files
  for kind in ('npy', 'npz', 'gif', 'png'):
    clip = clips.read(paths[kind])
    np.testing.assert_array_equal(clip.frames, frames, err_msg=kind)
  assert clips.read(paths['gif']).fps == pytest.approx(5.)
  np.testing.assert_array_equal(clips.read(paths['npz'] + ':video').frames, frames)
  video = clips.read(paths['mp4'])
  assert video.frames.shape == (T_CLIP, 80, 96, 3) and video.fps == pytest.approx(10.)
  assert np.abs(video.frames[:, :72, :90].astype(float) - frames).mean() < 4  # Lossy H.264.
  picked = clips.read(paths['png'], start=1, stride=2, n_frames=2)
  np.testing.assert_array_equal(picked.frames, frames[1:5:2])
  assert clips.read(paths['gif'], stride=2).fps == pytest.approx(2.5)
  assert len(clips.read(paths['mp4'], start=2, stride=2).frames) == 3


def test_fit_crops_resizes_and_converts_channels():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (2, 50, 80, 3), dtype=np.uint8)
  grey = clips.fit(rgb, 1)
  assert grey.shape == (2, 64, 64, 1) and grey.dtype == np.uint8
  expected = Image.fromarray(rgb[0, :, 15:65]).resize((64, 64), Image.LANCZOS).convert('L')  # Centred square.
  np.testing.assert_array_equal(grey[0, ..., 0], np.asarray(expected))
  stretched = clips.fit(rgb, 3, 'stretch')
  np.testing.assert_array_equal(stretched[1], np.asarray(Image.fromarray(rgb[1]).resize((64, 64), Image.LANCZOS)))
  from_grey = clips.fit(rgb[..., :1], 3)
  assert from_grey.shape == (2, 64, 64, 3)
  np.testing.assert_array_equal(from_grey[..., 0], from_grey[..., 2])
  # Grey content stored as RGB (KTH): the luminance is the first channel, as the dataset preparation keeps.
  same = np.repeat(rgb[..., :1], 3, axis=-1)
  np.testing.assert_array_equal(clips.fit(same, 1), clips.fit(same[..., :1], 1))


def test_array_values_and_shapes():
  floats = np.linspace(0, 1, 4 * 8 * 8).reshape(4, 8, 8).astype(np.float32)
  np.testing.assert_array_equal(clips._array_frames(floats, 'x')[..., 0], np.round(floats * 255).astype(np.uint8))
  for bad in (np.zeros((4, 8, 8, 2), np.uint8), floats * 2, np.zeros((8, 8), np.uint8)):
    with pytest.raises(clips.ClipError):
      clips._array_frames(bad, 'x')


# --------------------------------------------------------------------------------------------------------------------
# The model pieces the commands use.


def _noise(model, seed, n_samples, nt_obs, nt_pred):
  return model.sample_pred_noise_per_sample(jax.random.key(seed), jnp.zeros((1,), jnp.int32),
                                            jnp.arange(n_samples, dtype=jnp.int32), nt_obs, nt_pred)


@nnx.jit(static_argnames=('n_steps',))
def _reconstruction(model, x, noise, n_steps):
  return model.predict(x, noise, n_euler_steps=n_steps, reconstruct_cond=True)


@nnx.jit(static_argnames=('n',))
def _integrate_both(model, y0, eps, q, n):
  return model.integrate(y0, eps, n, q), model.integrate_path(y0, eps, n, q)


def test_integrate_path_holds_every_euler_state(loaded):
  model, _ = loaded
  k = jax.random.split(jax.random.key(0), 3)
  y0 = jax.random.normal(k[0], (2, model.ny))
  eps = jax.random.normal(k[1], (2, 4, model.nz))
  q = jax.random.normal(k[2], (2, 4, 2 * model.nz))
  for n, q_params in ((1, q), (3, None)):  # Posterior inference, prior rollout.
    (ys, _, _, res), path = _integrate_both(model, y0, eps, q_params, n)
    assert path.shape == (2, 4 * n, model.ny)
    np.testing.assert_array_equal(path[:, n - 1::n], ys)
    steps = np.diff(np.concatenate([np.asarray(y0)[:, None], path], 1), axis=1)
    np.testing.assert_allclose(steps, res, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Commands end to end.


def _npz(path):
  with np.load(path) as f:
    return dict(f)


def _gif_frames(path):
  with Image.open(path) as im:
    return [np.asarray(f.convert('RGB')) for f in ImageSequence.Iterator(im)], im.info['duration']


def _as_input(frames):
  return jnp.asarray(frames[None], jnp.float32) / 255.


def test_future_end_to_end(ckpt, loaded, clip_files, tmp_path, capsys):
  _, paths = clip_files
  nt_cond = TINY['nt_cond']
  args = ['future', ckpt, '--input', paths['gif'], '--n_future', '6', '--n_samples', '3', '--seed', '5']
  assert predict.main(args + ['--out', str(tmp_path / 'a')]) == 0
  out = capsys.readouterr().out
  assert 'PSNR' in out and len(out.splitlines()) == 4
  res = _npz(tmp_path / 'a' / 'future.npz')
  assert res['samples'].shape == (3, 6, 64, 64, 1) and res['cond'].shape == (nt_cond, 64, 64, 1)
  assert res['truth'].shape == (T_CLIP - nt_cond, 64, 64, 1)  # The clip holds 4 of the 6 future frames.
  assert res['psnr'].shape == res['ssim'].shape == (3, T_CLIP - nt_cond)
  assert np.all(np.isfinite(res['psnr'])) and np.all(np.abs(res['ssim']) <= 1)
  assert 0 <= res['samples'].min() and res['samples'].max() <= 1 and res['samples'].std() > 0
  assert not np.allclose(res['samples'][0], res['samples'][1])  # Distinct samples.
  frames, ms = _gif_frames(tmp_path / 'a' / 'future.gif')
  assert len(frames) == nt_cond + 6 and ms == 200  # The GIF's 5 fps.
  assert frames[0].shape[1] > 4 * 64  # Clip + 3 samples.
  # The samples are the model's official prediction with the noise of (seed, sample index).
  model, _ = loaded
  x_cond = _as_input(clips.fit(clip_files[0][:nt_cond], 1))
  ref = _reconstruction(model, x_cond, _noise(model, 5, 3, nt_cond, 6), N_EULER)
  np.testing.assert_allclose(res['samples'], ref.x_pred[:, 0], atol=1e-6)
  np.testing.assert_allclose(res['cond_rec'], ref.x_cond_rec[:, 0], atol=1e-6)
  # Same seed, same samples (here from the same frames in .npy); another seed, other samples.
  assert predict.main(args[:3] + [paths['npy']] + args[4:] + ['--out', str(tmp_path / 'b')]) == 0
  np.testing.assert_array_equal(_npz(tmp_path / 'b' / 'future.npz')['samples'], res['samples'])
  assert predict.main(args[:-1] + ['6', '--out', str(tmp_path / 'c')]) == 0
  assert not np.allclose(_npz(tmp_path / 'c' / 'future.npz')['samples'], res['samples'])


def test_swap_end_to_end(ckpt, loaded, clip_files, tmp_path):
  """A = B (a folder of frames, one in 2) is B's reconstruction and prediction; A from an MP4 changes it."""
  _, paths = clip_files
  args = ['swap', ckpt, '--motion', paths['png'], '--n_future', '2', '--n_samples', '2', '--stride', '2']
  assert predict.main(args + ['--content', paths['png'], '--out', str(tmp_path / 'a')]) == 0
  res = _npz(tmp_path / 'a' / 'swap.npz')
  t_b = len(range(0, T_CLIP, 2))
  assert res['content'].shape == res['motion'].shape == (t_b, 64, 64, 1)
  assert res['samples'].shape == (2, t_b + 2, 64, 64, 1)
  assert 0 <= res['samples'].min() and res['samples'].max() <= 1
  frames, ms = _gif_frames(tmp_path / 'a' / 'swap.gif')
  assert len(frames) == t_b + 2 and ms == 500  # Folder of frames: 4 fps, one frame in 2 kept.
  model, _ = loaded
  ref = _reconstruction(model, _as_input(clips.fit(clip_files[0][::2], 1)), _noise(model, 0, 2, t_b, 2), N_EULER)
  np.testing.assert_allclose(res['samples'][:, :t_b], ref.x_cond_rec[:, 0], atol=1e-6)
  np.testing.assert_allclose(res['samples'][:, t_b:], ref.x_pred[:, 0], atol=1e-6)
  assert predict.main(args + ['--content', paths['mp4'], '--out', str(tmp_path / 'b')]) == 0
  other = _npz(tmp_path / 'b' / 'swap.npz')
  np.testing.assert_array_equal(other['motion'], res['motion'])
  assert np.abs(other['samples'] - res['samples']).max() > 1e-3  # Content (w, skips) from the other clip.


def test_official_experiment_folder(clip_files, tmp_path):
  """An official folder (config.json + model.pt) is converted in memory; its model is grey with nt_cond=3."""
  assert predict.main(['future', GOLDEN_DCGAN, '--input', clip_files[1]['mp4'], '--n_future', '2', '--n_samples', '1',
                       '--out', str(tmp_path)]) == 0
  res = _npz(tmp_path / 'future.npz')
  assert res['samples'].shape == (1, 2, 64, 64, 1) and res['psnr'].shape == (1, 2)


@nnx.jit
def _euler_reference(model, x, noise, y):
  """From the states y (S, 1 + (T - 1 + n_future) N_EULER, ny) of a T-frame clip and its prior continuation:
  integrate's integer-time states and residuals over the clip from y[:, 0], those of the prior from y at the
  last frame, and the frames decoded from y."""
  s, last = y.shape[0], (x.shape[1] - 1) * N_EULER
  cond = model.condition(x)

  def tile(a):
    return jnp.broadcast_to(a, (s, *a.shape[1:]))

  ys, _, _, res = model.integrate(y[:, 0], noise.eps_z_post[:, 0], N_EULER, tile(cond.q_z))
  _, _, _, res_prior = model.integrate(y[:, last], noise.eps_z_prior[:, 0], N_EULER)
  decoded = model.decode(tile(cond.w), y, [tile(sk) for sk in cond.skips], train=False)
  return (ys, res, res_prior), decoded


def test_interpolate_factor_one_and_euler_states(loaded, clip_files):
  model, cfg = loaded
  frames = clips.fit(clip_files[0][::2], 1)
  t = len(frames)
  x = _as_input(frames)
  ref = _reconstruction(model, x, _noise(model, 0, 2, t, 2), N_EULER)
  one = predict.interpolate(model, cfg, frames, factor=1, n_future=0, n_samples=2, seed=0)
  assert one['samples'].shape == (2, t, 64, 64, 1) and int(one['euler_steps_per_frame']) == N_EULER
  np.testing.assert_allclose(one['samples'], ref.x_cond_rec[:, 0], atol=1e-6)

  full = predict.interpolate(model, cfg, frames, factor=N_EULER, n_future=2, n_samples=2, seed=0)
  n_out, last = 1 + (t - 1 + 2) * N_EULER, (t - 1) * N_EULER
  assert full['samples'].shape == (2, n_out, 64, 64, 1) and full['y'].shape == (2, n_out, model.ny)
  np.testing.assert_allclose(full['times'], np.arange(n_out) / N_EULER)
  np.testing.assert_allclose(full['samples'][:, :last + 1:N_EULER], one['samples'], atol=1e-6)
  # The decoded states are exactly the Euler states: the integer-time states and every residual of integrate.
  y = full['y']
  (ys, res, res_prior), decoded = _euler_reference(model, x, _noise(model, 0, 2, t, 2), jnp.asarray(y))
  np.testing.assert_allclose(y[:, N_EULER:last + 1:N_EULER], ys, atol=1e-6)
  np.testing.assert_allclose(np.diff(y[:, :last + 1], axis=1), res, atol=1e-6)
  np.testing.assert_allclose(np.diff(y[:, last:], axis=1), res_prior, atol=1e-5)
  np.testing.assert_allclose(full['samples'], decoded, atol=1e-5)


def test_interpolate_end_to_end(ckpt, clip_files, tmp_path):
  _, paths = clip_files
  args = ['interpolate', ckpt, '--input', paths['npz'], '--factor', '3', '--n_future', '1', '--n_frames', '4',
          '--fps', '5', '--seed', '3']
  assert predict.main(args + ['--out', str(tmp_path / 'a')]) == 0
  n_out = 1 + (4 - 1 + 1) * 3
  res = _npz(tmp_path / 'a' / 'interpolate.npz')
  assert res['samples'].shape == (1, n_out, 64, 64, 1) and float(res['fps']) == 15.
  assert int(res['euler_steps_per_frame']) == 6  # lcm(3, 2) Euler steps per frame, every 2nd state decoded.
  assert 0 <= res['samples'].min() and res['samples'].max() <= 1
  frames, ms = _gif_frames(tmp_path / 'a' / 'interpolate.gif')
  assert len(frames) == n_out and ms in (60, 70)  # 1000 / 15 ms, in GIF centiseconds.
  video = clips.read(str(tmp_path / 'a' / 'interpolate.mp4'))
  assert len(video.frames) == n_out and video.fps == pytest.approx(15.)
  assert abs(video.frames[..., :frames[0].shape[0], :frames[0].shape[1], :].astype(float) - np.stack(frames)).mean() < 8
  assert predict.main(args + ['--out', str(tmp_path / 'b')]) == 0
  np.testing.assert_array_equal(_npz(tmp_path / 'b' / 'interpolate.npz')['samples'], res['samples'])


# --------------------------------------------------------------------------------------------------------------------
# Errors: one line, exit status 2, before any computation.


def test_bad_inputs_are_one_line(ckpt, clip_files, tmp_path, capsys):
  _, paths = clip_files
  garbage = tmp_path / 'broken.mp4'
  garbage.write_bytes(b'not a video')
  two_channels = tmp_path / 'two.npy'
  np.save(two_channels, np.zeros((5, 8, 8, 2), np.uint8))
  cases = {
      'not found': ['future', ckpt, '--input', str(tmp_path / 'missing.gif'), '--n_future', '2'],
      'cannot decode the video': ['future', ckpt, '--input', str(garbage), '--n_future', '2'],
      'but 3 are needed': ['future', ckpt, '--input', paths['npy'], '--n_future', '2', '--n_frames', '2'],
      'expected (T, H, W)': ['interpolate', ckpt, '--input', str(two_channels), '--factor', '2'],
      'unsupported clip': ['swap', ckpt, '--content', str(two_channels) + '.txt', '--motion', paths['npy']],
      'checkpoint folder': ['future', str(tmp_path / 'no_ckpt'), '--input', paths['npy'], '--n_future', '2'],
      'no checkpoint for step 3': ['future', ckpt, '--checkpoint', '3', '--input', paths['npy'], '--n_future', '2'],
      'nt_inf=2': ['future', ckpt, '--input', paths['npy'], '--n_future', '2', '--nt_cond', '1'],
      'must be a positive integer': ['interpolate', ckpt, '--input', paths['npy'], '--factor', '0'],
      'no model_best.pt in': ['future', GOLDEN_DCGAN, '--model_name', 'model_best.pt', '--input', paths['npy'],
                              '--n_future', '2'],
      '--model_name applies to official': ['future', ckpt, '--model_name', 'model.pt', '--input', paths['npy'],
                                           '--n_future', '2'],
  }
  (tmp_path / 'two.npy.txt').write_text('x')
  for expected, argv in cases.items():
    assert predict.main(argv + ['--out', str(tmp_path / 'out')]) == 2, expected
    line = _one_error_line(capsys)
    assert expected in line, (expected, line)


def test_command_line(ckpt, clip_files, tmp_path):
  """The real entry point: help with examples; a clip shorter than nt_cond is one line without traceback."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-m', 'srvp_jax.predict', 'future', '--help'], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True).stdout
  assert '--n_future' in out and 'examples:' in out
  short = tmp_path / 'short.npy'
  np.save(short, clip_files[0][:2])
  proc = subprocess.run([sys.executable, '-m', 'srvp_jax.predict', 'future', ckpt, '--input', str(short),
                         '--n_future', '2', '--out', str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True)
  assert proc.returncode == 2 and proc.stderr.strip().startswith('error: ') and len(proc.stderr.splitlines()) == 1
  assert 'has 2 frame(s)' in proc.stderr and 'Traceback' not in proc.stderr
