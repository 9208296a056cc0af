"""The SRVP model on tiny CPU configs: Euler integration, program size, explicit randomness,
prediction with S samples, compute dtype and initialisation (docs/srvp.md sections 2, 3 and 5).

One model is initialised for the whole file (initialisation compiles many small programs); the
bfloat16 model shares its parameters.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from srvp_jax import config as config_lib
from srvp_jax import objective
from srvp_jax.model import PredNoise, TrainNoise, build_model, gaussian
from srvp_jax.model import backend, layers

# dcgan with skip connections: both the skip path and the per-sample tiling of skips are exercised.
TINY = dict(archi='dcgan', skipco=True, nc=1, nf=8, nhx=16, ny=4, nz=3, nh_inf=16, nlayers_inf=3, nh_res=16,
            nlayers_res=3, nt_inf=2, nt_cond=2, seq_len=6, res_gain=1.3)
B, T = 2, 6


def tiny_config(**overrides):
  return config_lib.with_overrides(**{**TINY, **overrides})


@pytest.fixture(scope='module')
def model():
  return build_model(tiny_config(), jax.random.key(0))


@pytest.fixture(scope='module')
def video():
  return jax.random.uniform(jax.random.key(1), (B, T, 64, 64, 1))


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


@functools.lru_cache(maxsize=None)
def _forward(graphdef, n_euler_steps, train):
  @jax.jit
  def f(state, x, noise):
    m = nnx.merge(graphdef, state)
    out = m(x, noise, n_euler_steps=n_euler_steps, train=train)
    return out, nnx.state(m)
  return f


def forward(model, x, noise, n_euler_steps=1, train=True):
  """Pure forward pass: (Latents, model state after it); ``model`` is left untouched."""
  graphdef, state = nnx.split(model)
  return _forward(graphdef, n_euler_steps, train)(state, x, noise)


@functools.lru_cache(maxsize=None)
def _predict(graphdef, n_euler_steps, cond_euler_steps):
  return jax.jit(lambda state, x, noise: nnx.merge(graphdef, state).predict(
      x, noise, n_euler_steps=n_euler_steps, cond_euler_steps=cond_euler_steps, reconstruct_cond=True))


def pure(model, fn, *args):
  """fn(model copy, *args) under jit: whatever it mutates (BatchNorm statistics) stays in the copy."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a))(state, *args)


def predict(model, x_cond, noise, n_euler_steps=1, cond_euler_steps=None):
  graphdef, state = nnx.split(model)
  return _predict(graphdef, n_euler_steps, cond_euler_steps)(state, x_cond, noise)


# ------------------------------------------------------------------------------------------------
# Euler integration: an independent float64 NumPy reference of docs/srvp.md section 2.
def np_mlp(mlp, x):
  for i, layer in enumerate(mlp.layers):
    x = (np.maximum(x, 0) if i > 0 else x) @ np.asarray(layer.dense.kernel[...], np.float64)
    x = x + np.asarray(layer.dense.bias[...], np.float64)
  return x


def np_sample(params, eps):
  mean, raw = np.split(params, 2, axis=-1)
  return mean + (np.logaddexp(0, raw) + 1e-8) * eps


def reference_integrate(model, y0, eps, n, q_params=None):
  """Python loop: per frame the prior from y_{t-1}, z_t drawn once, then n steps y += (1/n) f([y, z_t])."""
  y = np.asarray(y0, np.float64)
  ys, zs, ps, res = [], [], [], []
  for t in range(eps.shape[1]):
    p = np_mlp(model.p_z, y)
    z = np_sample(p if q_params is None else np.asarray(q_params[:, t], np.float64), np.asarray(eps[:, t]))
    for _ in range(n):
      r = (1.0 / n) * np_mlp(model.dynamics, np.concatenate([y, z], -1))
      y = y + r
      res.append(r)
    ys.append(y)
    zs.append(z)
    ps.append(p)
  return [np.stack(a, 1) for a in (ys, zs, ps, res)]


@pytest.mark.parametrize('n', [1, 2, 3, 4])
def test_euler_integration_exact_for_any_number_of_steps(model, n):
  k = jax.random.split(jax.random.key(n), 3)
  y0 = jax.random.normal(k[0], (B, model.ny))
  eps = jax.random.normal(k[1], (B, 5, model.nz))
  q = jax.random.normal(k[2], (B, 5, 2 * model.nz))
  for q_params in (None, q):  # Prior rollout and posterior inference.
    got = model.integrate(y0, eps, n, q_params)
    ref = reference_integrate(model, y0, eps, n, q_params)
    assert [a.shape for a in got] == [(B, 5, model.ny), (B, 5, model.nz), (B, 5, 2 * model.nz), (B, 5 * n, model.ny)]
    for a, b in zip(got, ref):
      np.testing.assert_allclose(np.asarray(a), b, rtol=2e-5, atol=2e-6)


def test_forward_with_three_euler_steps_decodes_every_frame(model, video):
  noise = model.sample_train_noise(jax.random.key(3), B, T)
  out, _ = forward(model, video, noise, n_euler_steps=3)
  assert out.x_rec.shape == video.shape and out.y.shape == (B, T, model.ny) and out.res.shape == (B, 3 * (T - 1), model.ny)
  ys, _, _, res = reference_integrate(model, out.y[:, 0], noise.eps_z, 3, out.q_z)
  np.testing.assert_allclose(np.asarray(out.y[:, 1:]), ys, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(out.res), res, rtol=2e-5, atol=2e-6)


def test_scan_unrolling_changes_no_value(model):
  unrolled = nnx.eval_shape(lambda: build_model(tiny_config(scan_unroll=2)))
  nnx.update(unrolled, nnx.state(model))
  assert unrolled.scan_unroll == unrolled.inf_z.scan_unroll == 2 and model.scan_unroll is None  # None: the backend's.
  k = jax.random.split(jax.random.key(5), 4)
  args = (jax.random.normal(k[0], (B, model.ny)), jax.random.normal(k[1], (B, 5, model.nz)),
          jax.random.normal(k[2], (B, 5, 2 * model.nz)), jax.random.normal(k[3], (B, T, model.nhx)))
  scans = lambda m, y0, eps, q, hx: (m.integrate(y0, eps, 3, q), m.inf_z(hx))  # 5 frames x 3 Euler steps, 6 frames.
  ref = pure(model, scans, *args)  # Rolled (the CPU default).
  with backend.compile_for('gpu'):
    full = pure(model, scans, *args)  # Fully unrolled (the GPU default), run here.
  for out in (pure(unrolled, scans, *args), full):  # 2 leaves a remainder of the frames and of the Euler steps.
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Program size does not grow with the number of frames.
def n_eqns(jaxpr):
  """Equations of a jaxpr, sub-jaxprs (scan bodies, pjit, custom derivatives) included."""
  total = 0
  for eqn in jaxpr.eqns:
    total += 1
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if hasattr(sub, 'eqns'):  # Jaxpr
          total += n_eqns(sub)
        elif hasattr(getattr(sub, 'jaxpr', None), 'eqns'):  # ClosedJaxpr
          total += n_eqns(sub.jaxpr)
  return total


def test_program_size_independent_of_number_of_frames(model):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def train_loss(params, rest, x, noise):
    out = nnx.merge(graphdef, params, rest, copy=True)(x, noise, n_euler_steps=2, train=True)
    return objective.loss_terms(x, out, obs_scale=1.0, beta_y=1.0, beta_z=1.0, l2_res=1.0)['loss']

  def pred(params, rest, x, noise):
    return nnx.merge(graphdef, params, rest).predict(x, noise, n_euler_steps=2, reconstruct_cond=True).x_pred

  sizes = {}
  for nt in (6, 12):
    x = jax.ShapeDtypeStruct((B, nt, 64, 64, 1), jnp.float32)
    noise = jax.eval_shape(lambda: model.sample_train_noise(jax.random.key(0), B, nt))
    pnoise = jax.eval_shape(lambda: model.sample_pred_noise(jax.random.key(0), 3, B, nt // 2, nt))
    xc = jax.ShapeDtypeStruct((B, nt // 2, 64, 64, 1), jnp.float32)
    sizes[nt] = (n_eqns(jax.make_jaxpr(jax.value_and_grad(train_loss))(params, rest, x, noise).jaxpr),
                 n_eqns(jax.make_jaxpr(pred)(params, rest, xc, pnoise).jaxpr))
  assert sizes[6] == sizes[12], sizes
  assert sizes[6][0] < 2000, sizes  # Nothing unrolled over frames or Euler steps.


# ------------------------------------------------------------------------------------------------
# Explicit randomness.
def test_noise_from_keys_is_reproducible_and_well_formed(model):
  a, b = model.sample_train_noise(jax.random.key(5), 64, T), model.sample_train_noise(jax.random.key(5), 64, T)
  c = model.sample_train_noise(jax.random.key(6), 64, T)
  for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(c)):
    assert np.array_equal(x, y) and not np.array_equal(x, z)
  assert a.eps_y0.shape == (64, model.ny) and a.eps_z.shape == (64, T - 1, model.nz)
  w = np.asarray(a.w_frames)
  assert w.shape == (64, model.nt_inf) and w.min() >= 0 and w.max() < T
  assert all(len(set(row)) == model.nt_inf for row in w)  # Distinct frames per video.
  assert len({tuple(row) for row in w}) > 10 and len(set(np.asarray(a.skip_frame))) == T  # Drawn per video.
  p = model.sample_pred_noise(jax.random.key(7), 3, B, 4, 5)
  assert np.array_equal(p.eps_z_prior, model.sample_pred_noise(jax.random.key(7), 3, B, 4, 5).eps_z_prior)
  assert (p.eps_y0.shape, p.eps_z_post.shape, p.eps_z_prior.shape) == ((3, B, model.ny), (3, B, 3, model.nz),
                                                                       (3, B, 5, model.nz))


def test_explicit_noise_and_frame_choices_replay_exactly(model, video):
  noise = model.sample_train_noise(jax.random.key(8), B, T)
  out1, state1 = forward(model, video, noise)
  out2, state2 = forward(model, video, noise)
  for a, b in zip(jax.tree.leaves((out1, state1)), jax.tree.leaves((out2, state2))):
    assert np.array_equal(a, b)
  # The given noise is the noise used: y_1 = mean + std * eps_y0, z_t = mean + std * eps_z[t].
  mean, std = gaussian(out1.q_y0)
  np.testing.assert_allclose(out1.y[:, 0], mean + std * noise.eps_y0, rtol=1e-6, atol=1e-6)
  mean, std = gaussian(out1.q_z)
  np.testing.assert_allclose(out1.z, mean + std * noise.eps_z, rtol=1e-6, atol=1e-6)
  # The given frames are the ones used: w from w_frames (in any order), skips from skip_frame.
  idx = jnp.arange(B)[:, None]
  w = pure(model, lambda m, x, f: m.infer_w(m.encode(x, train=True)[0][idx, f]), video, noise.w_frames)
  np.testing.assert_allclose(out1.w, w, rtol=1e-5, atol=1e-6)
  flipped = TrainNoise(noise.eps_y0, noise.eps_z, noise.w_frames[:, ::-1], noise.skip_frame)
  np.testing.assert_allclose(forward(model, video, flipped)[0].w, out1.w, rtol=1e-5, atol=1e-6)
  moved = TrainNoise(noise.eps_y0, noise.eps_z, noise.w_frames, (noise.skip_frame + 1) % T)
  out3, _ = forward(model, video, moved)
  assert np.array_equal(out3.w, out1.w) and not np.allclose(out3.x_rec, out1.x_rec, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Prediction.
def test_prediction_any_samples_and_frames_computed_together(model, video):
  nt_cond = 3
  x_cond = video[:, :nt_cond]
  noise = model.sample_pred_noise(jax.random.key(9), 3, B, nt_cond, 4)
  pred = predict(model, x_cond, noise)
  assert pred.x_pred.shape == (3, B, 4, 64, 64, 1) and pred.y.shape == (3, B, 5, model.ny)
  assert pred.x_cond_rec.shape == (3, B, nt_cond, 64, 64, 1)
  assert float(pred.x_pred.min()) >= 0 and float(pred.x_pred.max()) <= 1
  assert not np.allclose(pred.x_pred[0], pred.x_pred[1], atol=1e-4)  # Samples differ.
  # Sample s of the batched call is the same computation as that noise alone (S = 1).
  s = 1
  alone = predict(model, x_cond, jax.tree.map(lambda a: a[s:s + 1], noise))
  assert alone.x_pred.shape == (1, B, 4, 64, 64, 1)
  for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(pred)):
    np.testing.assert_allclose(a[0], b[s], rtol=1e-5, atol=1e-6)
  # Test-time Euler steps may differ from training's: the rollout is the exact 3-step one, and
  # fewer future frames with the same noise are the first frames of the longer prediction.
  short = PredNoise(noise.eps_y0[:1], noise.eps_z_post[:1], noise.eps_z_prior[:1, :, :2])
  pred3 = predict(model, x_cond, short, n_euler_steps=3)
  assert pred3.x_pred.shape == (1, B, 2, 64, 64, 1) and pred3.y.shape == (1, B, 3, model.ny)
  q_y0, q_z = pure(model, lambda m, x: (lambda hx: (m.infer_y0(hx), m.posterior_params(hx)))(
      m.encode(x, train=False)[0]), x_cond)
  y0 = np_sample(np.asarray(q_y0, np.float64), np.asarray(short.eps_y0[0]))
  ys_cond, _, _, _ = reference_integrate(model, y0, short.eps_z_post[0], 3, q_z)
  ys, _, _, _ = reference_integrate(model, ys_cond[:, -1], short.eps_z_prior[0], 3)
  np.testing.assert_allclose(pred3.y[0], np.concatenate([ys_cond[:, -1:], ys], 1), rtol=1e-4, atol=1e-5)
  assert not np.allclose(pred3.y[0, :, 1:], pred.y[0, :, 1:3], atol=1e-4)


def test_test_time_euler_steps_change_the_rollout_only(model, video):
  """Official test.py: inference over the conditioning frames with the training n_euler_steps (here 2),
  the test-time value only for the prior rollout."""
  nt_cond = 3
  noise = model.sample_pred_noise(jax.random.key(11), 2, B, nt_cond, 4)
  trained = predict(model, video[:, :nt_cond], noise, n_euler_steps=2)  # Test value = training value.
  for test_steps in (1, 3):
    pred = predict(model, video[:, :nt_cond], noise, n_euler_steps=test_steps, cond_euler_steps=2)
    np.testing.assert_array_equal(pred.x_cond_rec, trained.x_cond_rec)  # Conditioning reconstruction unchanged.
    np.testing.assert_array_equal(pred.y[:, :, 0], trained.y[:, :, 0])  # The last inferred state unchanged.
    assert not np.allclose(pred.y[:, :, 1:], trained.y[:, :, 1:], atol=1e-6)  # The rollout follows the test value.
    # Before the fix the inference pass used the test value too, which moves the inferred state.
    both = predict(model, video[:, :nt_cond], noise, n_euler_steps=test_steps)
    assert not np.allclose(both.y[:, :, 0], trained.y[:, :, 0], atol=1e-6)


def test_prediction_prefix_is_causal(model, video):
  x_cond = video[:, :3]
  noise = model.sample_pred_noise(jax.random.key(9), 3, B, 3, 4)
  one = jax.tree.map(lambda a: a[1:2], noise)
  long = predict(model, x_cond, one)
  short = predict(model, x_cond, PredNoise(one.eps_y0, one.eps_z_post, one.eps_z_prior[:, :, :2]), n_euler_steps=1)
  np.testing.assert_allclose(short.x_pred, long.x_pred[:, :, :2], rtol=1e-5, atol=1e-6)


def test_too_few_frames_for_nt_inf_is_an_error(model, video):
  with pytest.raises(ValueError, match='nt_inf=2'):
    model.predict(video[:, :1], model.sample_pred_noise(jax.random.key(0), 1, B, 1, 2))


# ------------------------------------------------------------------------------------------------
# Mixed precision.
def test_bfloat16_compute_keeps_float32_state_and_is_close(model, video):
  m16 = nnx.eval_shape(lambda: build_model(tiny_config(compute_dtype='bfloat16')))
  nnx.update(m16, nnx.state(model))  # Same parameters and statistics as the float32 model.
  noise = model.sample_train_noise(jax.random.key(10), B, T)

  def loss_and_grads(m):
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    @jax.jit
    def f(params, rest):
      def loss_fn(params):
        mm = nnx.merge(graphdef, params, rest, copy=True)
        out = mm(video, noise, n_euler_steps=2, train=True)
        return objective.loss_terms(video, out, obs_scale=1.0, beta_y=1.0, beta_z=1.0, l2_res=1.0)['loss'], (
            out, nnx.state(mm, nnx.BatchStat))
      return jax.value_and_grad(loss_fn, has_aux=True)(params)
    return f(params, rest)

  (loss32, (out32, stats32)), grads32 = loss_and_grads(model)
  (loss16, (out16, stats16)), grads16 = loss_and_grads(m16)
  assert loss16.dtype == jnp.float32 and out16.x_rec.dtype == jnp.float32 and out16.y.dtype == jnp.float32
  for leaf in jax.tree.leaves(nnx.state(m16, nnx.Param)) + jax.tree.leaves(grads16):
    assert leaf.dtype == jnp.float32
  for leaf in jax.tree.leaves(stats16):  # BatchNorm statistics, updated by the pass, in float32.
    assert leaf.dtype in (jnp.float32, jnp.int32)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stats16), jax.tree.leaves(nnx.state(model,
                                                                                                     nnx.BatchStat))))
  # Something does run in bfloat16, and the results stay close to float32.
  assert not np.array_equal(out16.x_rec, out32.x_rec)
  np.testing.assert_allclose(out16.x_rec, out32.x_rec, atol=0.05)
  assert abs(float(loss16) - float(loss32)) <= 0.02 * abs(float(loss32))
  for a, b in zip(jax.tree.leaves(stats16), jax.tree.leaves(stats32)):
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02)
  g16, g32 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (grads16, grads32))
  assert np.dot(g16, g32) / (np.linalg.norm(g16) * np.linalg.norm(g32)) > 0.95


def test_float64_parameter_dtype_runs_everything_in_float64(model, video):
  with pytest.raises(ValueError, match='jax_enable_x64'):
    build_model(tiny_config(param_dtype='float64'))
  with jax.enable_x64(True):
    m64 = nnx.eval_shape(lambda: build_model(tiny_config(param_dtype='float64')))
    nnx.update(m64, jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a,
                                 nnx.state(model)))
    for leaf in jax.tree.leaves(nnx.state(m64)):
      assert leaf.dtype in (jnp.float64, jnp.int32)
    x64 = jnp.asarray(video, jnp.float64)
    noise = m64.sample_train_noise(jax.random.key(10), B, T)
    assert noise.eps_y0.dtype == noise.eps_z.dtype == jnp.float64
    out64, _ = forward(m64, x64, noise, n_euler_steps=2)
    terms = objective.loss_terms(x64, out64, obs_scale=1.0, beta_y=1.0, beta_z=1.0, l2_res=1.0)
    for leaf in jax.tree.leaves(out64) + jax.tree.leaves(terms):
      assert leaf.dtype == jnp.float64
    noise32 = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, noise)
  out32, _ = forward(model, video, noise32, n_euler_steps=2)  # Same parameters and noise in float32.
  np.testing.assert_allclose(out64.x_rec, out32.x_rec, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Initialisation (docs/srvp.md section 3).
def test_initialisation_follows_the_official_code(model):
  cfg = tiny_config()
  groups = {'conv': [], 'bn_scale': []}
  uniform_checked = 0
  official = {t.name: layers.ours_to_torch(np.asarray(t.variable[...], np.float64), t.layout)
              for t in model.torch_tensors()}  # PyTorch layouts: weights (out, in, ...).
  for t in model.torch_tensors():
    v = official[t.name]
    leaf = t.name.rsplit('.', 1)[-1]
    if t.name.startswith(('encoder.', 'decoder.')):
      if t.layout in ('conv', 'conv_transpose'):
        groups['conv'].append(v.ravel())
      elif leaf == 'weight':
        groups['bn_scale'].append(v)
      elif leaf in ('bias', 'running_mean'):
        assert np.array_equal(v, np.zeros_like(v)), t.name
      elif leaf == 'running_var':
        assert np.array_equal(v, np.ones_like(v)), t.name
      else:
        assert leaf == 'num_batches_tracked' and v == 0, t.name
    elif t.name.startswith('dynamics.'):
      if leaf == 'bias':
        assert np.array_equal(v, np.zeros_like(v)), t.name
      else:  # Orthogonal with gain res_gain: orthonormal columns (or rows) times the gain.
        w = v if v.shape[0] >= v.shape[1] else v.T
        np.testing.assert_allclose(w.T @ w, cfg.res_gain**2 * np.eye(w.shape[1]), atol=1e-5, err_msg=t.name)
    else:  # PyTorch defaults: U(+-1/sqrt(fan_in)); the LSTM's fan is its hidden size.
      fan = cfg.nh_inf if t.name.startswith('inf_z.') else official[t.name[:-len(leaf)] + 'weight'].shape[1]
      bound = 1 / math.sqrt(fan)
      assert np.abs(v).max() <= bound, t.name
      if v.size >= 200:
        assert np.abs(v).max() > 0.9 * bound and abs(v.std() - bound / math.sqrt(3)) < 0.15 * bound, t.name
      uniform_checked += 1
  assert uniform_checked == 2 + 2 + 2 * cfg.nlayers_inf + 4 + 2 + 2 * cfg.nlayers_res
  conv = np.concatenate(groups['conv'])
  assert conv.size > 50_000 and abs(conv.mean()) < 3 * 0.02 / math.sqrt(conv.size)
  assert abs(conv.std() - 0.02) < 0.02 * 0.02
  scale = np.concatenate(groups['bn_scale'])
  assert scale.size > 200 and abs(scale.mean() - 1) < 4 * 0.02 / math.sqrt(scale.size)
  assert abs(scale.std() - 0.02) < 0.25 * 0.02
  # The key decides the initialisation.
  params = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))
  assert all(np.array_equal(a, b) for a, b in zip(params(model), params(build_model(cfg, jax.random.key(0)))))
  assert not any(np.array_equal(a, b) for a, b in zip(params(model), params(build_model(cfg, jax.random.key(1))))
                 if np.asarray(a).std() > 0)


# ------------------------------------------------------------------------------------------------
# Layer formulations (the fast forms equal the definition; float64, every branch of each layer).
@pytest.mark.parametrize('n_in,n_out,kernel,stride,padding,size', [
    (16, 8, 4, 2, 1, 4),  # Phase decomposition (the DCGAN decoder's strided layers).
    (6, 8, 4, 2, 1, 5),  # Phases, odd input size.
    (8, 16, 5, 3, 1, 3),  # Phases, stride 3 and a 5x5 kernel.
    (8, 3, 4, 2, 1, 4),  # Too few outputs: the lhs-dilated definition.
    (8, 16, 3, 2, 1, 4),  # Output size not a multiple of the stride: the definition.
    (10, 16, 4, 1, 0, 1),  # 1x1 input without padding (the decoders' first layer): a matrix product.
    (8, 3, 3, 1, 1, 6),  # Stride 1 (the VGG decoder's last layer).
])
def test_conv_transpose_equals_torch_definition(n_in, n_out, kernel, stride, padding, size):
  torch = pytest.importorskip('torch')
  with jax.enable_x64(True):
    layer = layers.ConvTranspose2d(n_in, n_out, kernel, stride, padding, dtype=jnp.float64, param_dtype=jnp.float64,
                                   rngs=nnx.Rngs(0))
    x = np.random.RandomState(0).randn(2, size, size, n_in)
    ours = np.asarray(layer(jnp.asarray(x)))
    ref_layer = torch.nn.ConvTranspose2d(n_in, n_out, kernel, stride, padding, bias=False).double()
    ref_layer.weight.data = torch.from_numpy(layers.ours_to_torch(np.asarray(layer.kernel[...]), 'conv_transpose').copy())
    ref = ref_layer(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-13)
    # The gradients agree with those of the definition (the lhs-dilated convolution).
    def definition(x, w):
      pad = kernel - 1 - padding
      return jax.lax.conv_general_dilated(x, w[::-1, ::-1], (1, 1), ((pad, pad),) * 2, lhs_dilation=(stride, stride),
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    graphdef, state = nnx.split(layer)
    def ours_fn(x, w):
      return nnx.merge(graphdef, jax.tree.map(lambda _: w, state))(x)
    grads = [jax.grad(lambda x, w, f=fn: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(jnp.asarray(x), layer.kernel[...])
             for fn in (ours_fn, definition)]
    for a, b in zip(*grads):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_conv_covering_its_input_is_a_matrix_product():
  with jax.enable_x64(True):
    layer = layers.Conv2d(8, 5, 4, 1, 0, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 4, 4, 8), jnp.float64)
    out = layer(x)
    assert out.shape == (3, 1, 1, 5)
    np.testing.assert_allclose(out, layer.conv(x), rtol=0, atol=1e-13)
