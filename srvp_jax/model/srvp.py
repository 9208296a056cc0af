"""The SRVP model: encoder, content variable w, latent residual dynamics, decoder (docs/srvp.md section 2).

Layouts are batch-major: videos (B, T, H, W, C), latent sequences (B, T, dim).

All randomness is explicit. ``TrainNoise`` holds the reparameterisation noise and the random frame
choices of one training pass, ``PredNoise`` the noise of a prediction; both are drawn from a PRNG
key by ``sample_*_noise`` or given by the caller (to replay a recorded run exactly).

The temporal model runs under ``jax.lax.scan`` over frames with an inner scan over the
``n_euler_steps`` Euler steps of each frame, so every positive number of Euler steps is exact (the
official loop is only right for powers of two) and, rolled (``scan_unroll`` 1, the CPU default),
compile time does not grow with the number of frames.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from srvp_jax.config import FRAME_SIZE
from srvp_jax.model import backend
from srvp_jax.model.conv import Decoder, Encoder
from srvp_jax.model.layers import LSTM, MLP, Linear, TorchTensor

Array = jax.Array


def acc_dtype(x: Array) -> jnp.dtype:
  """The accumulation dtype for ``x``: float32 for float32 and narrower floats, float64 for float64."""
  return jnp.promote_types(x.dtype, jnp.float32)


def gaussian(params: Array) -> tuple[Array, Array]:
  """(mean, std) of a Gaussian from raw parameters: mean half, std = softplus(raw half) + 1e-8."""
  params = params.astype(acc_dtype(params))
  mean, raw = jnp.split(params, 2, axis=-1)
  return mean, jax.nn.softplus(raw) + 1e-8


def rsample(params: Array, eps: Array) -> Array:
  """Reparameterised sample mean + std * eps."""
  mean, std = gaussian(params)
  return mean + std * eps


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainNoise:
  """Randomness of one training forward pass.

  eps_y0 (B, ny); eps_z (B, T-1, nz); w_frames (B, nt_inf) the distinct frames used for w, in
  summation order; skip_frame (B,) the frame whose encoder features feed the decoder skips.
  """
  eps_y0: Array
  eps_z: Array
  w_frames: Array
  skip_frame: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PredNoise:
  """Randomness of a prediction with S samples per video.

  eps_y0 (S, B, ny); eps_z_post (S, B, nt_cond-1, nz) for the inference pass over the
  conditioning frames; eps_z_prior (S, B, nt_pred, nz) for the prior rollout.
  """
  eps_y0: Array
  eps_z_post: Array
  eps_z_prior: Array


class Latents(NamedTuple):
  """What a forward pass infers, everything the loss needs (batch-major, parameter dtype)."""
  x_rec: Array  # (B, T, H, W, C) decoded frames.
  y: Array  # (B, T, ny) states at integer times.
  z: Array  # (B, T-1, nz).
  w: Array  # (B, nh_inf).
  q_y0: Array  # (B, 2 ny) raw Gaussian parameters.
  q_z: Array  # (B, T-1, 2 nz).
  p_z: Array  # (B, T-1, 2 nz).
  res: Array  # (B, (T-1) * n_euler_steps, ny) all residuals dt * f(y, z).


class Prediction(NamedTuple):
  """Output of ``SRVP.predict`` (samples first, then batch)."""
  x_pred: Array  # (S, B, nt_pred, H, W, C) predicted frames clamped to [0, 1].
  y: Array  # (S, B, nt_pred + 1, ny) rollout states, starting with the last inferred one.
  x_cond_rec: Array | None  # (S, B, nt_cond, H, W, C) reconstruction of the conditioning frames.


class Conditioning(NamedTuple):
  """What test-time frames give before sampling (``SRVP.condition``)."""
  w: Array  # (B, nh_inf) content variable.
  skips: list[Array] | None  # Decoder skips [(B, h, w, c)] deepest first (None without skip connections).
  q_y0: Array  # (B, 2 ny) raw parameters of q(y_1).
  q_z: Array  # (B, T-1, 2 nz) raw parameters of q(z_t).


class SRVP(nnx.Module):
  """Stochastic Latent Residual Video Predictor (official module names in ``torch_tensors``)."""

  def __init__(self, *, nx: int = FRAME_SIZE, nc: int, nf: int, nhx: int, ny: int, nz: int, skipco: bool, nt_inf: int,
               nh_inf: int, nlayers_inf: int, nh_res: int, nlayers_res: int, archi: str, res_gain: float = 1.41,
               dtype=jnp.float32, param_dtype=jnp.float32, precision: str = 'float32',
               scan_unroll: int | bool | None = None, rngs: nnx.Rngs):
    """``dtype``: compute dtype of convolutions and matrix products; ``param_dtype``: parameters,
    BatchNorm statistics, latent states, noise and every accumulation (float32, or float64 under
    ``jax_enable_x64``); ``precision``: of float32 convolutions and matrix products ('float32' or
    'tensorfloat32', ``layers.lax_precision``); ``scan_unroll``: steps per loop iteration of the frame,
    Euler and LSTM scans (``jax.lax.scan``'s ``unroll``, True: fully unrolled; None: the target platform's,
    ``backend.scan_unroll``; the same values either way)."""
    if nx != FRAME_SIZE:
      raise ValueError(f'nx={nx}: the official encoders and decoders are for {FRAME_SIZE}x{FRAME_SIZE} frames')
    self.nc, self.ny, self.nz, self.nhx = nc, ny, nz, nhx
    self.nt_inf, self.nh_inf, self.skipco = nt_inf, nh_inf, skipco
    self.param_dtype, self.scan_unroll = param_dtype, scan_unroll
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.encoder = Encoder(archi, nc, nhx, nf, **kw)
    self.decoder = Decoder(archi, nc, nh_inf + ny, nf, skipco, **kw)
    self.w_proj = Linear(nhx, nh_inf, **kw)
    self.w_inf = Linear(nh_inf, nh_inf, **kw)
    self.q_y = MLP(nt_inf * nhx, nh_inf, 2 * ny, nlayers_inf, **kw)
    self.inf_z = LSTM(nhx, nh_inf, scan_unroll=scan_unroll, **kw)
    self.q_z = Linear(nh_inf, 2 * nz, **kw)
    self.p_z = MLP(ny, nh_res, 2 * nz, nlayers_res, **kw)
    self.dynamics = MLP(ny + nz, nh_res, ny, nlayers_res, kernel_init=jax.nn.initializers.orthogonal(res_gain),
                        bias_init=jax.nn.initializers.zeros, **kw)

  # ----------------------------------------------------------------------------------------------
  # Building blocks.
  def encode(self, x: Array, train: bool) -> tuple[Array, list[Array]]:
    """x (B, T, H, W, C) -> hx (B, T, nhx) and skips [(B, T, h, w, c)] deepest first.

    BatchNorm statistics pool all B * T frames, as the official code does.
    """
    b, t = x.shape[:2]
    hx, skips = self.encoder(x.reshape(b * t, *x.shape[2:]), train)
    return hx.reshape(b, t, -1), [s.reshape(b, t, *s.shape[1:]) for s in skips]

  def infer_w(self, hx_w: Array) -> Array:
    """Content variable from the encodings (B, nt_inf, nhx) of the chosen frames."""
    h = jax.nn.relu(self.w_proj(hx_w)).astype(self.param_dtype).sum(axis=1)
    return jnp.tanh(self.w_inf(h)).astype(self.param_dtype)

  def infer_y0(self, hx: Array) -> Array:
    """Raw Gaussian parameters of q(y_1) from the encodings of the first nt_inf frames."""
    b = hx.shape[0]
    return self.q_y(hx[:, :self.nt_inf].reshape(b, self.nt_inf * self.nhx)).astype(self.param_dtype)

  def posterior_params(self, hx: Array) -> Array:
    """Raw parameters of q(z_t), t = 1..T-1: the LSTM over all given frames, then q_z."""
    return self.q_z(self.inf_z(hx)[:, 1:]).astype(self.param_dtype)

  def decode(self, w: Array, y: Array, skips: list[Array] | None, train: bool) -> Array:
    """Frames (B, T', H, W, C) from w (B, nh_inf), states y (B, T', ny) and per-video skips."""
    b, t = y.shape[:2]
    v = jnp.concatenate([jnp.broadcast_to(w[:, None], (b, t, w.shape[-1])), y], axis=-1)
    flat_skips = None
    if self.skipco:
      flat_skips = [jnp.broadcast_to(s[:, None], (b, t, *s.shape[1:])).reshape(b * t, *s.shape[1:]) for s in skips]
    x = self.decoder(v.reshape(b * t, -1), flat_skips, train)
    return x.reshape(b, t, *x.shape[1:])

  def integrate(self, y0: Array, eps: Array, n_euler_steps: int, q_params: Array | None = None):
    """Rolls the residual dynamics over K frames.

    For each frame t: the prior p(z_t | y_{t-1}) is computed; z_t is drawn with noise eps[:, t]
    from the posterior ``q_params[:, t]`` when given, else from the prior; then ``n_euler_steps``
    Euler steps y <- y + dt f([y, z_t]) are taken with that same z_t.

    Returns y (B, K, ny) the states at integer times after y0, z (B, K, nz), p_z (B, K, 2nz) and
    the residuals (B, K * n_euler_steps, ny).
    """
    ys, zs, ps, res, _ = self._rollout(y0, eps, n_euler_steps, q_params)
    return ys, zs, ps, res

  def integrate_path(self, y0: Array, eps: Array, n_euler_steps: int, q_params: Array | None = None) -> Array:
    """The states after every Euler step of ``integrate`` (same arguments): (B, K * n_euler_steps, ny).

    State t * n_euler_steps + j - 1 is the state at time t + j / n_euler_steps (j = 1..n_euler_steps), so
    every n_euler_steps-th one is a state at an integer time, the value ``integrate`` returns.
    """
    return self._rollout(y0, eps, n_euler_steps, q_params)[4]

  def _rollout(self, y0, eps, n_euler_steps, q_params):
    dt = 1.0 / n_euler_steps
    unroll = backend.scan_unroll() if self.scan_unroll is None else self.scan_unroll

    def euler(y, z):
      res = dt * self.dynamics(jnp.concatenate([y, z], axis=-1)).astype(self.param_dtype)
      y = y + res
      return y, (res, y)

    def frame(y, inputs):
      eps_t, q_t = inputs
      p_t = self.p_z(y).astype(self.param_dtype)
      z = rsample(p_t if q_t is None else q_t, eps_t)
      y, (res, path) = jax.lax.scan(lambda yy, _: euler(yy, z), y, None, length=n_euler_steps, unroll=unroll)
      return y, (y, z, p_t, res, path)

    xs = (jnp.swapaxes(eps, 0, 1), None if q_params is None else jnp.swapaxes(q_params, 0, 1))
    _, (ys, zs, ps, res, path) = jax.lax.scan(frame, y0.astype(self.param_dtype), xs, unroll=unroll)
    k, b = ys.shape[:2]

    def steps(a):  # (K, n, B, ny) -> (B, K n, ny)
      return jnp.moveaxis(a, 2, 0).reshape(b, k * n_euler_steps, -1)

    return jnp.swapaxes(ys, 0, 1), jnp.swapaxes(zs, 0, 1), jnp.swapaxes(ps, 0, 1), steps(res), steps(path)

  # ----------------------------------------------------------------------------------------------
  # Entry points.
  def sample_train_noise(self, key: Array, batch: int, nt: int) -> TrainNoise:
    """Draws the randomness of a training pass: noise, nt_inf distinct frames per video for w
    (uniform among the nt frames) and one frame per video for the skips."""
    k_y, k_z, k_w, k_s = jax.random.split(key, 4)
    return TrainNoise(
        eps_y0=jax.random.normal(k_y, (batch, self.ny), self.param_dtype),
        eps_z=jax.random.normal(k_z, (batch, nt - 1, self.nz), self.param_dtype),
        w_frames=jnp.argsort(jax.random.uniform(k_w, (batch, nt)), axis=1)[:, :self.nt_inf].astype(jnp.int32),
        skip_frame=jax.random.randint(k_s, (batch,), 0, nt, dtype=jnp.int32),
    )

  def eval_noise_frames(self, nt: int, batch: int) -> tuple[Array, Array]:
    """Frame choices of evaluation mode: the last nt_inf frames for w, the last frame for skips."""
    w_frames = jnp.broadcast_to(jnp.arange(nt - self.nt_inf, nt, dtype=jnp.int32), (batch, self.nt_inf))
    return w_frames, jnp.full((batch,), nt - 1, jnp.int32)

  def __call__(self, x: Array, noise: TrainNoise, *, n_euler_steps: int = 1, train: bool = True) -> Latents:
    """Forward pass with all T frames observed (what the training objective needs).

    ``train`` selects BatchNorm's mode; the frame choices always come from ``noise`` (use
    ``eval_noise_frames`` for the official evaluation-mode choices).
    """
    b, nt = x.shape[:2]
    if nt < self.nt_inf:
      raise ValueError(f'{nt} frames given but nt_inf={self.nt_inf} are needed to infer y_1 and w')
    hx, skips = self.encode(x, train)
    idx = jnp.arange(b)
    w = self.infer_w(hx[idx[:, None], noise.w_frames])
    skip = [s[idx, noise.skip_frame] for s in skips] if self.skipco else None
    q_y0 = self.infer_y0(hx)
    y0 = rsample(q_y0, noise.eps_y0)
    q_z = self.posterior_params(hx)
    ys, z, p_z, res = self.integrate(y0, noise.eps_z, n_euler_steps, q_z)
    y = jnp.concatenate([y0[:, None], ys], axis=1)
    x_rec = self.decode(w, y, skip, train)
    return Latents(x_rec=x_rec, y=y, z=z, w=w, q_y0=q_y0, q_z=q_z, p_z=p_z, res=res)

  def sample_pred_noise(self, key: Array, n_samples: int, batch: int, nt_cond: int, nt_pred: int) -> PredNoise:
    k_y, k_post, k_prior = jax.random.split(key, 3)
    return PredNoise(
        eps_y0=jax.random.normal(k_y, (n_samples, batch, self.ny), self.param_dtype),
        eps_z_post=jax.random.normal(k_post, (n_samples, batch, nt_cond - 1, self.nz), self.param_dtype),
        eps_z_prior=jax.random.normal(k_prior, (n_samples, batch, nt_pred, self.nz), self.param_dtype),
    )

  def sample_pred_noise_per_sample(self, key: Array, video_ids: Array, sample_ids: Array, nt_cond: int,
                                   nt_pred: int) -> PredNoise:
    """PredNoise with (K, B, ...) fields where sample s of video v has its own key: key -> fold_in(v)
    -> fold_in(s). A sample is then a function of (key, video, sample) only, whatever the chunking."""

    def one(k):
      return jax.tree.map(lambda a: a[0, 0], self.sample_pred_noise(k, 1, 1, nt_cond, nt_pred))

    per_video = jax.vmap(lambda v: jax.random.fold_in(key, v))(video_ids)
    keys = jax.vmap(lambda s: jax.vmap(lambda k: jax.random.fold_in(k, s))(per_video))(sample_ids)
    return jax.vmap(jax.vmap(one))(keys)

  def condition(self, x_cond: Array, x_content: Array | None = None) -> Conditioning:
    """What the given frames tell at test time (evaluation-mode BatchNorm), before any sampling.

    w from the last nt_inf frames of ``x_content`` and the skips of its last frame (default: of
    ``x_cond``; another clip gives the content / dynamics swap of the paper); q(y_1) from the first
    nt_inf frames of ``x_cond`` and the posterior of z over all of them.
    """
    nt_cond = x_cond.shape[1]
    if nt_cond < self.nt_inf:
      raise ValueError(f'nt_cond={nt_cond} conditioning frames given but nt_inf={self.nt_inf} are needed')
    hx, skips = self.encode(x_cond, train=False)
    if x_content is not None:
      if x_content.shape[1] < self.nt_inf:
        raise ValueError(f'{x_content.shape[1]} content frames given but nt_inf={self.nt_inf} are needed')
      hx_c, skips_c = self.encode(x_content, train=False)
    else:
      hx_c, skips_c = hx, skips
    w = self.infer_w(hx_c[:, hx_c.shape[1] - self.nt_inf:])
    skip = [sk[:, -1] for sk in skips_c] if self.skipco else None
    return Conditioning(w=w, skips=skip, q_y0=self.infer_y0(hx), q_z=self.posterior_params(hx))

  def predict(self, x_cond: Array, noise: PredNoise, *, n_euler_steps: int = 1, cond_euler_steps: int | None = None,
              reconstruct_cond: bool = False, x_content: Array | None = None) -> Prediction:
    """The official test-time protocol (evaluation-mode BatchNorm), S samples computed together.

    Encodes the conditioning frames once; per sample, infers y_1 and the posterior z's over the
    conditioning frames, then rolls the prior forward from the last inferred state and decodes
    with w from the last nt_inf conditioning frames and the skips of the last one (of
    ``x_content`` when given, see ``condition``).

    As the official ``test.py``, the inference pass over the conditioning frames integrates with
    ``cond_euler_steps`` (the model's *training* value; default ``n_euler_steps``) and only the
    prior rollout uses ``n_euler_steps`` (a test-time choice).
    """
    b = x_cond.shape[0]
    s = noise.eps_z_prior.shape[0]
    cond = self.condition(x_cond, x_content)

    def flat(a):  # (S, B, ...) -> (S * B, ...)
      return a.reshape(s * b, *a.shape[2:])

    def tile(a):  # (B, ...) -> (S * B, ...) sample-major, matching ``flat``.
      return jnp.broadcast_to(a[None], (s, *a.shape)).reshape(s * b, *a.shape[1:])

    y0 = rsample(tile(cond.q_y0), flat(noise.eps_y0))
    w_s = tile(cond.w)
    skip_s = [tile(sk) for sk in cond.skips] if cond.skips is not None else None
    ys_cond, _, _, _ = self.integrate(y0, flat(noise.eps_z_post), cond_euler_steps or n_euler_steps, tile(cond.q_z))
    y_cond = jnp.concatenate([y0[:, None], ys_cond], axis=1)
    y_last = y_cond[:, -1]
    ys_pred, _, _, _ = self.integrate(y_last, flat(noise.eps_z_prior), n_euler_steps)
    x_pred = jnp.clip(self.decode(w_s, ys_pred, skip_s, train=False), 0.0, 1.0)
    x_cond_rec = None
    if reconstruct_cond:
      x_cond_rec = self.decode(w_s, y_cond, skip_s, train=False)
      x_cond_rec = x_cond_rec.reshape(s, b, *x_cond_rec.shape[1:])
    y = jnp.concatenate([y_last[:, None], ys_pred], axis=1)
    return Prediction(x_pred=x_pred.reshape(s, b, *x_pred.shape[1:]), y=y.reshape(s, b, *y.shape[1:]),
                      x_cond_rec=x_cond_rec)

  # ----------------------------------------------------------------------------------------------
  def torch_tensors(self) -> Iterator[TorchTensor]:
    """Every tensor of the official ``state_dict``, in the official order, with our variable."""
    yield from self.encoder.torch_tensors('encoder.')
    yield from self.decoder.torch_tensors('decoder.')
    yield from self.w_proj.torch_tensors('w_proj.0.')
    yield from self.w_inf.torch_tensors('w_inf.0.')
    yield from self.q_y.torch_tensors('q_y.')
    yield from self.inf_z.torch_tensors('inf_z.')
    yield from self.q_z.torch_tensors('q_z.')
    yield from self.p_z.torch_tensors('p_z.')
    yield from self.dynamics.torch_tensors('dynamics.')


def param_count(model: nnx.Module) -> int:
  """Number of trainable parameters (what PyTorch's ``model.parameters()`` counts)."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
