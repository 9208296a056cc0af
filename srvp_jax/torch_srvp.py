"""The official SRVP model in PyTorch: the side-by-side speed baseline of ``srvp_jax.benchmark``.

What this is for: the benchmark times a training step (and single layers) of this module next to
ours, so it must do exactly the computation of the official PyTorch release
(``module/srvp.py``, ``module/conv.py``, ``module/mlp.py`` and the ``train`` step of ``train.py``):
the same modules (``nn.Conv2d`` / ``nn.ConvTranspose2d`` without bias, ``nn.BatchNorm2d``, in-place
``nn.LeakyReLU(0.2)``, ``nn.LSTM``, nearest ``nn.Upsample``, ``nn.MaxPool2d``), NCHW frames and
time-major (T, B, ...) sequences, a Python loop over frames and Euler steps with one ``q_z`` and
one ``p_z`` call per frame, Gaussians built with ``torch.distributions`` (argument validation
included) and the official loss. Its ``state_dict`` has the official names and shapes, so official
checkpoints load with ``strict=True``. ``tests/test_torch_srvp.py`` checks, against the recorded
float64 outputs of the official code (``tests/data/golden/*/golden64.npz``), that the baseline does
that computation, gradients and BatchNorm statistics included.

It is never used to compute anything of ours (training, evaluation, conversion and parity all use
``srvp_jax.model``); only the benchmark and its test import it.

Differences from the official code, none of which changes the computation: all randomness is
passed in (``eps_*`` noise and frame choices) so that recorded runs replay exactly, and the Euler
loop counts steps with integers, so it is exact for every positive ``n_euler_steps`` (docs/srvp.md section 2;
the official ``linspace`` loop is only right for powers of two, where both agree).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.distributions as distrib
import torch.nn.functional as F
from torch import nn

from srvp_jax.config import MODEL_KEYS

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------------
# Building blocks (official module/conv.py and module/mlp.py).
def _activation(name: str) -> nn.Module:
  if name == 'relu':
    return nn.ReLU(inplace=True)
  if name == 'leaky_relu':
    return nn.LeakyReLU(0.2, inplace=True)
  if name == 'tanh':
    return nn.Tanh()
  raise ValueError(f'unknown activation {name!r}')


def _conv_block(conv: nn.Module, activation: str, bn: bool = True) -> nn.Sequential:
  """Official ``make_conv_block``: conv (``.0``) -> [BatchNorm2d (``.1``)] -> activation."""
  modules = [conv]
  if bn:
    modules.append(nn.BatchNorm2d(conv.out_channels))
  modules.append(_activation(activation))
  return nn.Sequential(*modules)


def _conv(n_in: int, n_out: int, kernel: int, stride: int, padding: int) -> nn.Conv2d:
  return nn.Conv2d(n_in, n_out, kernel, stride, padding, bias=False)


def _upconv(n_in: int, n_out: int, kernel: int, stride: int, padding: int) -> nn.ConvTranspose2d:
  return nn.ConvTranspose2d(n_in, n_out, kernel, stride, padding, bias=False)


class MLP(nn.Module):
  """Official MLP: ``module.0.0`` first Linear, then ``module.k`` = Sequential(ReLU, Linear)."""

  def __init__(self, n_in: int, n_hid: int, n_out: int, n_layers: int):
    super().__init__()
    blocks = []
    for i in range(n_layers):
      linear = nn.Linear(n_in if i == 0 else n_hid, n_out if i == n_layers - 1 else n_hid)
      blocks.append(nn.Sequential(linear) if i == 0 else nn.Sequential(_activation('relu'), linear))
    self.module = nn.Sequential(*blocks)

  def forward(self, x: Tensor) -> Tensor:
    return self.module(x)


class Encoder(nn.Module):
  """DCGAN or VGG 64x64 frame encoder (official ``DCGAN64Encoder`` / ``VGG64Encoder``)."""

  def __init__(self, archi: str, nc: int, nhx: int, nf: int):
    super().__init__()
    self.nhx = nhx
    if archi == 'dcgan':
      chans = [nc, nf, 2 * nf, 4 * nf, 8 * nf]
      self.conv = nn.ModuleList([
          _conv_block(_conv(chans[i], chans[i + 1], 4, 2, 1), 'leaky_relu', bn=i > 0) for i in range(4)
      ])
      self.last_conv = _conv_block(_conv(8 * nf, nhx, 4, 1, 0), 'tanh')
    elif archi == 'vgg':
      widths = [[nc, nf, nf], [nf, 2 * nf, 2 * nf], [2 * nf, 4 * nf, 4 * nf, 4 * nf],
                [4 * nf, 8 * nf, 8 * nf, 8 * nf]]
      stages = []
      for i, w in enumerate(widths):
        layers = [nn.MaxPool2d(kernel_size=2, stride=2, padding=0)] if i > 0 else []
        layers += [_conv_block(_conv(a, b, 3, 1, 1), 'leaky_relu') for a, b in zip(w[:-1], w[1:])]
        stages.append(nn.Sequential(*layers))
      self.conv = nn.ModuleList(stages)
      self.last_conv = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2, padding=0),
                                     _conv_block(_conv(8 * nf, nhx, 4, 1, 0), 'tanh'))
    else:
      raise ValueError(f"unknown architecture {archi!r}; expected 'dcgan' or 'vgg'")

  def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """x (N, nc, 64, 64) -> (h (N, nhx), the four stage outputs deepest first)."""
    skips = []
    h = x
    for layer in self.conv:
      h = layer(h)
      skips.append(h)
    return self.last_conv(h).view(-1, self.nhx), skips[::-1]


class Decoder(nn.Module):
  """DCGAN or VGG 64x64 frame decoder (official ``DCGAN64Decoder`` / ``VGG64Decoder``)."""

  def __init__(self, archi: str, nc: int, n_in: int, nf: int, skipco: bool):
    super().__init__()
    self.skipco = skipco
    coef = 2 if skipco else 1
    first = _conv_block(_upconv(n_in, 8 * nf, 4, 1, 0), 'leaky_relu')
    if archi == 'dcgan':
      self.first_upconv = first
      self.conv = nn.ModuleList([
          _conv_block(_upconv(8 * nf * coef, 4 * nf, 4, 2, 1), 'leaky_relu'),
          _conv_block(_upconv(4 * nf * coef, 2 * nf, 4, 2, 1), 'leaky_relu'),
          _conv_block(_upconv(2 * nf * coef, nf, 4, 2, 1), 'leaky_relu'),
          _upconv(nf * coef, nc, 4, 2, 1),
      ])
    elif archi == 'vgg':
      self.first_upconv = nn.Sequential(first, nn.Upsample(scale_factor=2, mode='nearest'))
      widths = [[8 * nf, 8 * nf, 8 * nf, 4 * nf], [4 * nf, 4 * nf, 4 * nf, 2 * nf], [2 * nf, 2 * nf, nf]]
      stages = []
      for w in widths:
        ins = [w[0] * coef] + w[1:-1]
        layers = [_conv_block(_conv(a, b, 3, 1, 1), 'leaky_relu') for a, b in zip(ins, w[1:])]
        stages.append(nn.Sequential(*layers, nn.Upsample(scale_factor=2, mode='nearest')))
      stages.append(nn.Sequential(_conv_block(_conv(nf * coef, nf, 3, 1, 1), 'leaky_relu'),
                                  _upconv(nf, nc, 3, 1, 1)))
      self.conv = nn.ModuleList(stages)
    else:
      raise ValueError(f"unknown architecture {archi!r}; expected 'dcgan' or 'vgg'")

  def forward(self, v: Tensor, skips: Sequence[Tensor] | None) -> Tensor:
    """v (N, n_in) and skips [(N, c, h, w)] deepest first -> frames (N, nc, 64, 64) in [0, 1]."""
    if (skips is not None) != self.skipco:
      raise ValueError('skip tensors must be given exactly when the decoder has skip connections')
    h = self.first_upconv(v.view(*v.shape, 1, 1))
    for i, layer in enumerate(self.conv):
      if skips is not None:
        h = torch.cat([h, skips[i]], 1)
      h = layer(h)
    return torch.sigmoid(h)


# ------------------------------------------------------------------------------------------------
# Gaussians (official module/utils.py).
def make_normal(raw_params: Tensor) -> distrib.Normal:
  """Official ``make_normal_from_raw_params``: mean half, std = softplus(raw half) + 1e-8."""
  loc, raw_scale = torch.chunk(raw_params, 2, -1)
  return distrib.Normal(loc, F.softplus(raw_scale) + 1e-8)


def rsample(raw_params: Tensor, eps: Tensor) -> Tensor:
  """``make_normal(raw_params).rsample()`` with the standard normal noise ``eps`` given."""
  normal = make_normal(raw_params)
  return normal.loc + eps * normal.scale


class Outputs(NamedTuple):
  """A forward pass, time-major (official return order first, then intermediate tensors)."""
  x_rec: Tensor  # (T, B, nc, 64, 64) decoded frames.
  y: Tensor  # (T, B, ny) states at integer times.
  z: Tensor | None  # (T-1, B, nz).
  w: Tensor  # (B, nh_inf).
  q_y_0_params: Tensor  # (B, 2 ny).
  q_z_params: Tensor | None  # (T-1, B, 2 nz).
  p_z_params: Tensor | None  # (T-1, B, 2 nz).
  res: Tensor  # ((T-1) n_euler_steps, B, ny) every residual dt f([y, z]).
  hx: Tensor  # (T, B, nhx) frame encodings.
  hx_z: Tensor  # (T, B, nh_inf) LSTM outputs.
  skips: list[Tensor] | None  # [(B, c, h, w)] deepest first, of the chosen frame.


class Prediction(NamedTuple):
  """Output of ``TorchSRVP.predict`` (time-major)."""
  x_cond_rec: Tensor  # (nt_cond, B, nc, 64, 64) reconstruction of the conditioning frames.
  y: Tensor  # (nt_pred + 1, B, ny) rollout states, starting with the last inferred one.
  x_pred: Tensor  # (nt_pred, B, nc, 64, 64) predicted frames clamped to [0, 1].


# ------------------------------------------------------------------------------------------------
class TorchSRVP(nn.Module):
  """The official ``StochasticLatentResidualVideoPredictor`` (same submodules and state_dict names)."""

  def __init__(self, cfg: Mapping[str, Any], init: bool = True):
    """Builds the model from a config mapping (official keys; unknown keys ignored).

    Args:
      cfg: needs nc, ny, nz and nt_inf; the other model keys and res_gain default to the official
        values.
      init: apply the official initialisation (docs/srvp.md section 3), as the official ``model.init``.
    """
    super().__init__()
    c = {'nx': 64, 'nf': 64, 'nhx': 128, 'skipco': False, 'nh_inf': 256, 'nlayers_inf': 3, 'nh_res': 512,
         'nlayers_res': 4, 'archi': 'dcgan', 'res_gain': 1.41}
    c.update({k: cfg[k] for k in (*MODEL_KEYS, 'res_gain') if k in cfg})
    if c['nx'] != 64:
      raise ValueError(f"nx={c['nx']}: the official encoders and decoders are for 64x64 frames")
    self.nc, self.ny, self.nz, self.nhx = int(c['nc']), int(c['ny']), int(c['nz']), int(c['nhx'])
    self.skipco, self.nt_inf, self.nh_inf = bool(c['skipco']), int(c['nt_inf']), int(c['nh_inf'])
    nf, archi = int(c['nf']), str(c['archi'])
    self.encoder = Encoder(archi, self.nc, self.nhx, nf)
    self.decoder = Decoder(archi, self.nc, self.nh_inf + self.ny, nf, self.skipco)
    self.w_proj = nn.Sequential(nn.Linear(self.nhx, self.nh_inf), nn.ReLU(inplace=True))
    self.w_inf = nn.Sequential(nn.Linear(self.nh_inf, self.nh_inf), nn.Tanh())
    self.q_y = MLP(self.nhx * self.nt_inf, self.nh_inf, 2 * self.ny, int(c['nlayers_inf']))
    self.inf_z = nn.LSTM(self.nhx, self.nh_inf, 1)
    self.q_z = nn.Linear(self.nh_inf, 2 * self.nz)
    self.p_z = MLP(self.ny, int(c['nh_res']), 2 * self.nz, int(c['nlayers_res']))
    self.dynamics = MLP(self.ny + self.nz, int(c['nh_res']), self.ny, int(c['nlayers_res']))
    if init:
      self.init_weights(float(c['res_gain']))

  def init_weights(self, res_gain: float = 1.41) -> None:
    """Official ``init``: N(0, 0.02) conv weights, BatchNorm N(1, 0.02) / 0, orthogonal dynamics."""
    for m in (*self.encoder.modules(), *self.decoder.modules()):
      if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight.data, 0.0, 0.02)
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0.0)
    for m in self.dynamics.modules():
      if isinstance(m, nn.Linear):
        nn.init.orthogonal_(m.weight.data, gain=res_gain)
        nn.init.constant_(m.bias.data, 0.0)

  # ----------------------------------------------------------------------------------------------
  def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """x (T, B, nc, 64, 64) -> hx (T, B, nhx) and skips [(T, B, c, h, w)] deepest first."""
    nt, bsz = x.shape[:2]
    hx, skips = self.encoder(x.reshape(nt * bsz, *x.shape[2:]))
    return hx.view(nt, bsz, self.nhx), [s.view(nt, bsz, *s.shape[1:]) for s in skips]

  def decode(self, w: Tensor, y: Tensor, skips: Sequence[Tensor] | None) -> Tensor:
    """Frames (T', B, nc, 64, 64) from w (B, nh_inf), states y (T', B, ny), skips [(B, c, h, w)]."""
    nt, bsz = y.shape[:2]
    dec_inp = torch.cat([w.repeat(nt, 1, 1).view(nt * bsz, self.nh_inf), y.reshape(nt * bsz, self.ny)], 1)
    flat_skips = None
    if skips is not None:
      flat_skips = [s.expand(nt, *s.shape).reshape(nt * bsz, *s.shape[1:]) for s in skips]
    x = self.decoder(dec_inp, flat_skips)
    return x.view(nt, bsz, *x.shape[1:])

  def infer_w(self, hx: Tensor, w_frames: Tensor | None) -> Tensor:
    """Content variable from the frames ``w_frames`` (nt_inf, B) of hx, or the last nt_inf if None."""
    bsz = hx.shape[1]
    if w_frames is None:
      h = hx[-self.nt_inf:]
    else:
      index = torch.arange(bsz, device=hx.device).repeat(self.nt_inf, 1)
      h = hx[w_frames.reshape(-1), index.view(-1)].view(self.nt_inf, bsz, self.nhx)
    return self.w_inf(self.w_proj(h).sum(0))

  def generate(self, y_0: Tensor, hx_z: Tensor | None, eps_z: Tensor, nt: int,
               n_euler_steps: int) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor]:
    """Rolls the residual dynamics from y_0 to nt states at integer times (y_0 included).

    For each frame t = 1..nt-1: p(z_t | y_{t-1}) is computed; z_t is drawn with ``eps_z[t-1]`` from
    the posterior q_z(hx_z[t]) when frame t is observed (t < len(hx_z)), else from the prior; then
    ``n_euler_steps`` Euler steps are taken with that z_t.

    Returns y (nt, B, ny), z, q_z params, p_z params (each (nt-1, B, .) or None) and the residuals.
    """
    if n_euler_steps < 1:
      raise ValueError(f'n_euler_steps={n_euler_steps} must be a positive integer')
    dt = 1 / n_euler_steps
    n_obs = 0 if hx_z is None else len(hx_z)
    y, z, q_z_params, p_z_params, res = [y_0], [], [], [], []
    y_t = y_0
    for t in range(1, nt):
      p_z_t = self.p_z(y_t)
      p_z_params.append(p_z_t)
      if t < n_obs:
        q_z_t = self.q_z(hx_z[t])
        q_z_params.append(q_z_t)
        z_t = rsample(q_z_t, eps_z[t - 1])
      else:
        z_t = rsample(p_z_t, eps_z[t - 1])
      z.append(z_t)
      for _ in range(n_euler_steps):
        res_t = dt * self.dynamics(torch.cat([y_t, z_t], 1))
        y_t = y_t + res_t
        res.append(res_t)
      y.append(y_t)

    def stack(seq):
      return torch.stack(seq) if seq else None

    return torch.stack(y), stack(z), stack(q_z_params), stack(p_z_params), stack(res)

  def forward(self, x: Tensor, eps_y0: Tensor, eps_z: Tensor, w_frames: Tensor | None = None,
              skip_frame: Tensor | None = None, n_euler_steps: int = 1) -> Outputs:
    """Forward pass with all T frames observed (z from the posterior), as the official training.

    Args:
      x: (T, B, nc, 64, 64) video in [0, 1].
      eps_y0: (B, ny) noise of y_1.
      eps_z: (T-1, B, nz) noise of each z_t.
      w_frames: (nt_inf, B) frames whose encodings are summed (in that order) into w; None: the
        last nt_inf frames (evaluation choice).
      skip_frame: (B,) frame whose encoder features feed the decoder skips; None: the last frame
        (evaluation choice).
      n_euler_steps: Euler steps per frame.
    """
    nt, bsz = x.shape[:2]
    if nt < self.nt_inf:
      raise ValueError(f'{nt} frames given but nt_inf={self.nt_inf} are needed to infer y_1 and w')
    hx, all_skips = self.encode(x)
    skips = None
    if self.skipco:
      if skip_frame is None:
        skips = [s[-1] for s in all_skips]
      else:
        index = torch.arange(bsz, device=x.device)
        skips = [s[skip_frame, index] for s in all_skips]
    w = self.infer_w(hx, w_frames)
    q_y_0_params = self.q_y(hx[:self.nt_inf].permute(1, 0, 2).reshape(bsz, self.nt_inf * self.nhx))
    y_0 = rsample(q_y_0_params, eps_y0)
    hx_z = self.inf_z(hx)[0]
    y, z, q_z_params, p_z_params, res = self.generate(y_0, hx_z, eps_z, nt, n_euler_steps)
    x_rec = self.decode(w, y, skips)
    return Outputs(x_rec, y, z, w, q_y_0_params, q_z_params, p_z_params, res, hx, hx_z, skips)

  @torch.no_grad()
  def predict(self, x_cond: Tensor, eps_y0: Tensor, eps_z_post: Tensor, eps_z_prior: Tensor, nt_pred: int,
              n_euler_steps: int = 1) -> Prediction:
    """The official test protocol (``test.py``, docs/srvp.md section 5), BatchNorm in evaluation mode.

    Infers the states of the conditioning frames x_cond (nt_cond, B, ...) with noise eps_y0 (B, ny)
    and eps_z_post (nt_cond-1, B, nz), then rolls the prior forward nt_pred frames from the last
    inferred state with eps_z_prior (nt_pred, B, nz); w from the last nt_inf conditioning frames,
    skips from the last one.
    """
    if eps_z_prior.shape[0] != nt_pred:
      raise ValueError(f'eps_z_prior has {eps_z_prior.shape[0]} steps for nt_pred={nt_pred}')
    was_training = self.training
    self.eval()
    try:
      out = self(x_cond, eps_y0, eps_z_post, n_euler_steps=n_euler_steps)
      y, _, _, _, _ = self.generate(out.y[-1], None, eps_z_prior, nt_pred + 1, n_euler_steps)
      x_pred = self.decode(out.w, y[1:], out.skips).clamp(0, 1)
    finally:
      self.train(was_training)
    return Prediction(x_cond_rec=out.x_rec, y=y, x_pred=x_pred)


# ------------------------------------------------------------------------------------------------
def loss_terms(x: Tensor, out: Outputs, obs_scale: float, beta_y: float, beta_z: float,
               l2_res: float) -> dict[str, Tensor]:
  """The official objective (``train.py``; docs/srvp.md section 4), each term summed then divided by B.

  Returns nll, kl_y_0, kl_z, l2_res (the sum of Euclidean norms of the residuals) and loss =
  nll + beta_y kl_y_0 + beta_z kl_z + l2_res * l2 (the last term only when l2_res > 0).
  """
  n = x.shape[1]
  nll = -distrib.Normal(out.x_rec, obs_scale).log_prob(x).sum()
  kl_y_0 = distrib.kl_divergence(make_normal(out.q_y_0_params), distrib.Normal(0, 1)).sum()
  kl_z = distrib.kl_divergence(make_normal(out.q_z_params), make_normal(out.p_z_params)).sum()
  loss = nll + beta_y * kl_y_0 + beta_z * kl_z
  l2 = torch.norm(out.res, p=2, dim=2).sum()
  if l2_res > 0:
    loss = loss + l2_res * l2
  return {'nll': nll / n, 'kl_y_0': kl_y_0 / n, 'kl_z': kl_z / n, 'l2_res': l2 / n, 'loss': loss / n}


def draw_frames(nt: int, bsz: int, nt_inf: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
  """The official training frame choices with torch's RNG: skip_frame (B,), w_frames (nt_inf, B)."""
  skip_frame = torch.randint(nt, size=(bsz,)).to(device)
  w_frames = torch.stack([torch.randperm(nt)[:nt_inf] for _ in range(bsz)], 1).to(device)
  return skip_frame, w_frames


def make_train_step(model: TorchSRVP, cfg: Mapping[str, Any]) -> Callable[[Tensor], float]:
  """A callable ``step(x)``: one official training step on x (T, B, nc, 64, 64), returns the loss.

  Draws the noise and frame choices with torch's RNG, runs the training forward (BatchNorm with
  batch statistics), the loss, backward and an Adam step (lr ``cfg['lr']`` (default 3e-4), betas
  (0.9, 0.999), eps 1e-8). Other config keys used: n_euler_steps, obs_scale, beta_y, beta_z, l2_res.
  """

  def get(key: str, default: Any) -> Any:
    return cfg[key] if key in cfg else default

  n_euler_steps = int(get('n_euler_steps', 1))
  weights = {k: float(get(k, 1.0)) for k in ('obs_scale', 'beta_y', 'beta_z', 'l2_res')}
  optimizer = torch.optim.Adam(model.parameters(), lr=float(get('lr', 3e-4)), betas=(0.9, 0.999), eps=1e-8)
  param = next(model.parameters())

  def step(x: Tensor) -> float:
    x = torch.as_tensor(x, dtype=param.dtype, device=param.device)
    nt, bsz = x.shape[:2]
    model.train()
    optimizer.zero_grad()
    skip_frame, w_frames = draw_frames(nt, bsz, model.nt_inf, x.device)
    eps_y0 = torch.randn(bsz, model.ny, dtype=x.dtype, device=x.device)
    eps_z = torch.randn(nt - 1, bsz, model.nz, dtype=x.dtype, device=x.device)
    out = model(x, eps_y0, eps_z, w_frames, skip_frame, n_euler_steps)
    loss = loss_terms(x, out, **weights)['loss']
    loss.backward()
    optimizer.step()
    return loss.item()

  return step


def param_count(model: nn.Module) -> int:
  """Number of trainable parameters."""
  return sum(p.numel() for p in model.parameters())
