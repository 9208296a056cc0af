"""oneDNN convolutions (srvp_jax.model.onednn): equal to XLA's convolutions to float32 rounding for every
convolution shape of the five paper configs (forward and both gradients), concurrent calls from
several host devices, the build's race safety, and the fallback to XLA with its one-line note."""

import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from srvp_jax.model import conv, onednn
from srvp_jax.model.onednn import build

PAPER = ('smmnist', 'mmnist_deterministic', 'kth', 'human', 'bair')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5  # Of the largest magnitude: float32 rounding of sums of up to 4608 products.

needs_onednn = pytest.mark.skipif(not onednn.available() and onednn.mode() != 'on',
                                reason='oneDNN unavailable (apt-get install -y libdnnl-dev)')


def _reference(transpose, x, w, stride, padding):
  """XLA: the cross-correlation, or the transposed convolution's definition (dilated input, flipped kernel)."""
  if not transpose:
    return onednn.xla_conv2d(x, w, stride, padding)
  pad = w.shape[0] - 1 - padding
  return jax.lax.conv_general_dilated(x, w[::-1, ::-1], (1, 1), ((pad, pad),) * 2, lhs_dilation=(stride, stride),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _ours(transpose, x, w, stride, padding):
  if transpose:
    return onednn.conv_transpose2d(x, w, stride, padding, lambda x_, w_: _reference(True, x_, w_, stride, padding))
  return onednn.conv2d(x, w, stride, padding)


def _paper_shapes():
  """(transpose, input size, n_in, n_out, kernel, stride, padding) of every convolution the paper models run
  on oneDNN: recorded while tracing their encoders and decoders."""
  seen = set()

  def recorder(transpose):
    def record(x, w, stride, padding, *args, **kwargs):
      del args, kwargs
      seen.add((transpose, x.shape[-3], w.shape[2], w.shape[3], w.shape[0], stride, padding))
      lead = x.shape[:-3]
      size = ((x.shape[-3] - 1) * stride - 2 * padding + w.shape[0] if transpose
              else (x.shape[-3] + 2 * padding - w.shape[0]) // stride + 1)
      return jnp.zeros((*lead, size, size, w.shape[3]), x.dtype)
    return record

  mp = pytest.MonkeyPatch()
  mp.setattr(onednn, 'conv2d', recorder(False))
  mp.setattr(onednn, 'conv_transpose2d', recorder(True))
  try:
    for name in PAPER:
      cfg = importlib.import_module(f'configs.{name}').get_config()
      enc = nnx.eval_shape(lambda: conv.Encoder(cfg.archi, cfg.nc, cfg.nhx, cfg.nf, rngs=nnx.Rngs(0)))
      dec = nnx.eval_shape(lambda: conv.Decoder(cfg.archi, cfg.nc, cfg.nh_inf + cfg.ny, cfg.nf, cfg.skipco,
                                                rngs=nnx.Rngs(0)))

      (enc_def, enc_state), (dec_def, dec_state) = nnx.split(enc), nnx.split(dec)

      def run(frames, enc_state, dec_state, cfg=cfg, enc_def=enc_def, dec_def=dec_def):
        _, skips = nnx.merge(enc_def, enc_state)(frames, True)
        return nnx.merge(dec_def, dec_state)(jnp.zeros((frames.shape[0], cfg.nh_inf + cfg.ny)), skips, True)

      jax.eval_shape(run, jax.ShapeDtypeStruct((2, 64, 64, cfg.nc), jnp.float32), enc_state, dec_state)
  finally:
    mp.undo()
  return sorted(seen)


SHAPES = _paper_shapes()


@needs_onednn
def test_paper_models_use_onednn_layers():
  kinds = {(s[0], s[4], s[5]) for s in SHAPES}
  # DCGAN 4x4 stride-2 convolutions and transposed convolutions, VGG 3x3 stride-1 convolutions and the
  # VGG decoder's last 3x3 stride-1 transposed convolution.
  assert kinds == {(False, 4, 2), (True, 4, 2), (False, 3, 1), (True, 3, 1)}
  assert len(SHAPES) >= 15


@needs_onednn
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: '{}{}x{}_{}to{}_k{}s{}p{}'.format(
    'T' if s[0] else 'C', s[1], s[1], s[2], s[3], s[4], s[5], s[6]))
def test_equals_xla_forward_and_gradients(shape):
  transpose, size, n_in, n_out, k, stride, padding = shape
  keys = jax.random.split(jax.random.key(size * 7919 + n_in * 31 + n_out), 3)
  x = jax.random.normal(keys[0], (2, size, size, n_in))
  w = jax.random.normal(keys[1], (k, k, n_in, n_out)) / np.sqrt(k * k * n_in)
  ref, ref_vjp = jax.vjp(lambda x_, w_: _reference(transpose, x_, w_, stride, padding), x, w)
  g = jax.random.normal(keys[2], ref.shape)

  @jax.jit
  def ours(x, w, g):
    y, vjp = jax.vjp(lambda x_, w_: _ours(transpose, x_, w_, stride, padding), x, w)
    return y, *vjp(g)

  for got, want in zip(ours(x, w, g), (ref, *ref_vjp(g))):
    assert got.shape == want.shape
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=RTOL * scale)


@needs_onednn
def test_routes_mix_onednn_and_xla_passes():
  x = jax.random.normal(jax.random.key(0), (3, 2, 8, 8, 16))  # Leading batch dimensions are kept.
  w = jax.random.normal(jax.random.key(1), (4, 4, 16, 8)) / 16
  ref = lambda x_, w_: _reference(True, x_.reshape(-1, 8, 8, 16), w_, 2, 1).reshape(3, 2, 16, 16, 8)
  want = jax.grad(lambda x_, w_: jnp.sum(jnp.sin(ref(x_, w_))), (0, 1))(x, w)
  for route in (onednn.Route(True, False, True), onednn.Route(False, True, False)):
    fn = lambda x_, w_, route=route: onednn.conv_transpose2d(
        x_, w_, 2, 1, lambda a, b: _reference(True, a, b, 2, 1), route)
    assert fn(x, w).shape == (3, 2, 16, 16, 8)
    got = jax.jit(jax.grad(lambda x_, w_, fn=fn: jnp.sum(jnp.sin(fn(x_, w_))), (0, 1)))(x, w)
    for a, b in zip(got, want):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=RTOL * float(jnp.max(jnp.abs(b))))


@needs_onednn
def test_layers_dispatch_by_dtype_and_platform(monkeypatch):
  from srvp_jax.model import backend  # pylint: disable=import-outside-toplevel
  monkeypatch.delenv(onednn.ENV, raising=False)
  assert onednn.enabled(jnp.float32)
  assert not onednn.enabled(jnp.bfloat16) and not onednn.enabled(jnp.float64)
  with backend.compile_for('gpu'):
    assert not onednn.enabled(jnp.float32)
  # Frames (1 or 3 channels): the last transposed convolution's forward and input gradient stay on XLA.
  assert onednn.route_for(True, 4, 2, 64, 1) == onednn.Route(False, False, True)
  assert onednn.route_for(False, 4, 2, 1, 64) == onednn.Route(True, False, True)
  assert onednn.route_for(False, 3, 1, 3, 64) == onednn.Route(False, False, True)
  assert onednn.route_for(True, 4, 2, 128, 64) == onednn.ALL
  monkeypatch.setenv(onednn.ENV, '0')
  assert not onednn.enabled(jnp.float32)
  monkeypatch.setenv(onednn.ENV, 'maybe')
  with pytest.raises(onednn.OnednnUnavailable, match='SRVP_ONEDNN'):
    onednn.mode()


def _run(code, env_extra, timeout=300):
  env = {**os.environ, **env_extra}
  return subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


@needs_onednn
def test_concurrent_calls_from_four_host_devices():
  code = '''
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from srvp_jax.model import onednn
assert len(jax.devices()) == 4 and onednn.available()
mesh = Mesh(np.array(jax.devices()), ('data',))
x = jax.device_put(jax.random.normal(jax.random.key(0), (16, 32, 32, 32)), NamedSharding(mesh, P('data')))
w = jax.random.normal(jax.random.key(1), (4, 4, 32, 64)) / 20
loss = lambda f: lambda x, w: jnp.sum(jnp.tanh(f(x, w)))
ours = jax.jit(jax.value_and_grad(loss(lambda x, w: onednn.conv2d(x, w, 2, 1)), (0, 1)))
ref = jax.jit(jax.value_and_grad(loss(lambda x, w: onednn.xla_conv2d(x, w, 2, 1)), (0, 1)))
for _ in range(3):
  for a, b in zip(jax.tree.leaves(ours(x, w)), jax.tree.leaves(ref(x, w))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * float(np.max(np.abs(b))))
print('ok')
'''
  run = _run(code, {'XLA_FLAGS': os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4',
                    'JAX_PLATFORMS': 'cpu', 'SRVP_ONEDNN': '1'})
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.strip() == 'ok'


@needs_onednn
def test_build_race_leaves_one_library(tmp_path):
  code = 'from srvp_jax.model.onednn import build; print(build.build())'
  env = {'XDG_CACHE_HOME': str(tmp_path)}
  procs = [subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, env={**os.environ, **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
  outs = [p.communicate(timeout=600) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-1000:] for o in outs]
  paths = {o[0].strip() for o in outs}
  assert len(paths) == 1
  built = sorted(f.name for f in (tmp_path / 'srvp_jax').iterdir() if not f.name.endswith('.lock'))
  assert built == [os.path.basename(paths.pop())]  # No temporary file left behind.


def test_fallback_says_so_once_and_runs_on_xla(monkeypatch, capsys, tmp_path):
  monkeypatch.setattr(onednn, '_status', {})
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  monkeypatch.delenv(onednn.ENV, raising=False)
  from srvp_jax.model import layers  # pylint: disable=import-outside-toplevel
  layer = layers.Conv2d(4, 8, 4, 2, 1, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
  for _ in range(2):
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(onednn.xla_conv2d(x, layer.conv.kernel[...], 2, 1)),
                               rtol=1e-6, atol=1e-6)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('note: oneDNN convolutions unavailable (no C++ compiler')
  assert 'apt-get install -y libdnnl-dev' in err[0]
  monkeypatch.setenv(onednn.ENV, '1')
  with pytest.raises(onednn.OnednnUnavailable, match='libdnnl-dev'):
    layer(x)


def test_library_key_follows_the_compiler(monkeypatch, tmp_path):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  path = build.library_path()
  assert path.parent == tmp_path / 'srvp_jax'
  monkeypatch.setenv('CXX', str(tmp_path / 'missing'))
  with pytest.raises(build.BuildError, match='no C\\+\\+ compiler'):
    build.library_path()
