"""Layers with the exact semantics (and initialisation) of the official PyTorch ones.

Every layer that holds weights also knows the names and layouts of its tensors in an official
``state_dict`` (``torch_tensors``), so that conversion in both directions is a walk over the model,
not a hand-written table that can drift from the architecture.

Layouts: activations are NHWC; conv kernels HWIO; dense kernels (in, out). Each layer takes two
dtypes: ``dtype``, the *compute* dtype of its convolutions and matrix products (float32, or bfloat16
for mixed precision), and ``param_dtype``, the dtype of its parameters, BatchNorm statistics and of
every accumulation (float32; float64 under ``jax_enable_x64`` for the reference replay); and the
``precision`` of float32 convolutions and matrix products (``lax_precision``): 'float32' is true
float32 (XLA's default on A100 / H100 GPUs would be TF32), 'tensorfloat32' allows TF32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from srvp_jax.model import backend, onednn

Array = jax.Array
Dtype = jnp.dtype

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch.
LEAKY_SLOPE = 0.2
PRECISIONS = ('float32', 'tensorfloat32')


def lax_precision(dtype: Dtype, precision: str) -> jax.lax.Precision | None:
  """The ``lax`` precision of a layer's convolutions / matrix products for a compute dtype and a setting.

  float32 (and float64) compute with 'float32' is ``HIGHEST``: XLA then computes in float32 on every
  backend (the GPU default for float32 is TF32 tensor cores). 'tensorfloat32' and bfloat16 compute keep
  XLA's default (None).
  """
  if precision not in PRECISIONS:
    raise ValueError(f'precision={precision!r}: expected one of {PRECISIONS}')
  if jnp.dtype(dtype).itemsize >= 4 and precision == 'float32':
    return jax.lax.Precision.HIGHEST
  return None


@dataclasses.dataclass(frozen=True)
class TorchTensor:
  """One tensor of an official ``state_dict`` and the variable of ours that holds it.

  ``layout`` says how to go from the PyTorch array to ours: 'conv' (O, I, kh, kw) -> (kh, kw, I, O),
  'conv_transpose' (I, O, kh, kw) -> (kh, kw, I, O), 'linear' (O, I) -> (I, O), 'same' otherwise.
  """
  name: str
  variable: nnx.Variable
  layout: str


def torch_to_ours(array, layout: str):
  """Rearranges a PyTorch-layout NumPy array into our layout."""
  if layout in ('conv', 'conv_transpose'):
    return array.transpose(2, 3, 1, 0) if layout == 'conv' else array.transpose(2, 3, 0, 1)
  if layout == 'linear':
    return array.T
  return array


def ours_to_torch(array, layout: str):
  """Inverse of ``torch_to_ours``."""
  if layout == 'conv':
    return array.transpose(3, 2, 0, 1)
  if layout == 'conv_transpose':
    return array.transpose(2, 3, 0, 1)
  if layout == 'linear':
    return array.T
  return array


def torch_uniform(fan_in: int) -> Callable:
  """PyTorch's default Linear/LSTM initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def normal(mean: float, std: float) -> Callable:
  """N(mean, std^2) initialiser (the official encoder/decoder initialisation)."""

  def init(key, shape, dtype=jnp.float32):
    return mean + std * jax.random.normal(key, shape, dtype)

  return init


class Linear(nnx.Module):
  """``torch.nn.Linear`` (weight and bias ~ U(+-1/sqrt(fan_in)) unless told otherwise)."""

  def __init__(self, n_in: int, n_out: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               precision: str = 'float32', kernel_init: Callable | None = None, bias_init: Callable | None = None,
               init_bound_fan: int | None = None, rngs: nnx.Rngs):
    default = torch_uniform(init_bound_fan or n_in)
    self.dense = nnx.Linear(n_in, n_out, dtype=dtype, param_dtype=param_dtype,
                            precision=lax_precision(dtype, precision), kernel_init=kernel_init or default,
                            bias_init=bias_init or default, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.dense(x)

  def torch_tensors(self, prefix: str, weight: str = 'weight', bias: str = 'bias') -> Iterator[TorchTensor]:
    yield TorchTensor(f'{prefix}{weight}', self.dense.kernel, 'linear')
    yield TorchTensor(f'{prefix}{bias}', self.dense.bias, 'same')


class MLP(nnx.Module):
  """Official MLP: ``n_layers`` linear layers with a ReLU before every one but the first.

  Official names: ``module.0.0`` for the first linear layer, ``module.{k}.1`` for the next ones
  (each is ``Sequential(ReLU, Linear)``).
  """

  def __init__(self, n_in: int, n_hid: int, n_out: int, n_layers: int, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, precision: str = 'float32', kernel_init: Callable | None = None,
               bias_init: Callable | None = None, rngs: nnx.Rngs):
    sizes = [n_in] + [n_hid] * (n_layers - 1) + [n_out]
    self.layers = nnx.List([
        Linear(a, b, dtype=dtype, param_dtype=param_dtype, precision=precision, kernel_init=kernel_init,
               bias_init=bias_init, rngs=rngs)
        for a, b in zip(sizes[:-1], sizes[1:])
    ])

  def __call__(self, x: Array) -> Array:
    for i, layer in enumerate(self.layers):
      x = layer(jax.nn.relu(x) if i > 0 else x)
    return x

  def torch_tensors(self, prefix: str) -> Iterator[TorchTensor]:
    for i, layer in enumerate(self.layers):
      yield from layer.torch_tensors(f'{prefix}module.{i}.{0 if i == 0 else 1}.')


class LSTM(nnx.Module):
  """One-layer ``torch.nn.LSTM`` (gate order i, f, g, o; two biases) run with ``lax.scan``."""

  def __init__(self, n_in: int, n_hid: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               precision: str = 'float32', scan_unroll: int | bool | None = None, rngs: nnx.Rngs):
    """``scan_unroll``: time steps per iteration of the scan's loop (``jax.lax.scan``'s ``unroll``; True: all;
    None: the target platform's, ``backend.scan_unroll``)."""
    self.n_hid, self.param_dtype, self.scan_unroll = n_hid, param_dtype, scan_unroll
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, init_bound_fan=n_hid, rngs=rngs)
    self.ih = Linear(n_in, 4 * n_hid, **kw)
    self.hh = Linear(n_hid, 4 * n_hid, **kw)

  def __call__(self, x: Array) -> Array:
    """x: (B, T, n_in) -> outputs (B, T, n_hid) in the parameter dtype."""
    batch = x.shape[0]
    acc = self.param_dtype
    gates_x = self.ih(x).astype(acc)  # All input projections in one matmul.

    def step(carry, gx):
      h, c = carry
      gates = gx + self.hh(h).astype(acc)
      i, f, g, o = jnp.split(gates, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (h, c), h

    zeros = jnp.zeros((batch, self.n_hid), acc)
    unroll = backend.scan_unroll() if self.scan_unroll is None else self.scan_unroll
    _, hs = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(gates_x, 0, 1), unroll=unroll)
    return jnp.swapaxes(hs, 0, 1)

  def torch_tensors(self, prefix: str) -> Iterator[TorchTensor]:
    # torch.nn.LSTM's order: both weights, then both biases.
    (w_ih, b_ih), (w_hh, b_hh) = (list(self.ih.torch_tensors(prefix, 'weight_ih_l0', 'bias_ih_l0')),
                                  list(self.hh.torch_tensors(prefix, 'weight_hh_l0', 'bias_hh_l0')))
    yield from (w_ih, w_hh, b_ih, b_hh)


class BatchNorm(nnx.Module):
  """``torch.nn.BatchNorm2d`` (affine, eps 1e-5, momentum 0.1) on NHWC inputs.

  Training mode normalises with the biased batch variance but updates the running variance with
  the *unbiased* one, as PyTorch does. Statistics are computed in the parameter dtype whatever the
  input dtype; under ``jax.jit`` with a batch-sharded input the means are over the global batch
  (SyncBatchNorm semantics).
  """

  def __init__(self, n: int, *, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.scale = nnx.Param(normal(1.0, 0.02)(rngs.params(), (n,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((n,), param_dtype))
    self.mean = nnx.BatchStat(jnp.zeros((n,), param_dtype))
    self.var = nnx.BatchStat(jnp.ones((n,), param_dtype))
    self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))  # num_batches_tracked.

  def __call__(self, x: Array, train: bool) -> Array:
    dtype = x.dtype
    xf = x.astype(self.scale.dtype)
    axes = tuple(range(x.ndim - 1))
    if train:
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      n = math.prod(x.shape[:-1])
      unbiased = var * (n / max(n - 1, 1))
      self.mean[...] = (1 - BN_MOMENTUM) * self.mean[...] + BN_MOMENTUM * mean
      self.var[...] = (1 - BN_MOMENTUM) * self.var[...] + BN_MOMENTUM * unbiased
      self.count[...] = self.count[...] + 1
    else:
      mean, var = self.mean[...], self.var[...]
    # PyTorch's CPU kernel form: x * alpha + beta.
    alpha = jax.lax.rsqrt(var + BN_EPS) * self.scale[...]
    beta = self.bias[...] - mean * alpha
    return (xf * alpha + beta).astype(dtype)

  def torch_tensors(self, prefix: str) -> Iterator[TorchTensor]:
    yield TorchTensor(f'{prefix}weight', self.scale, 'same')
    yield TorchTensor(f'{prefix}bias', self.bias, 'same')
    yield TorchTensor(f'{prefix}running_mean', self.mean, 'same')
    yield TorchTensor(f'{prefix}running_var', self.var, 'same')
    yield TorchTensor(f'{prefix}num_batches_tracked', self.count, 'same')


class Conv2d(nnx.Module):
  """``torch.nn.Conv2d`` without bias (cross-correlation, symmetric zero padding).

  A kernel that covers the whole unpadded input (the encoders' last 4x4 'valid' convolution on
  4x4 features) is computed as the matrix product it is: on CPU 5x faster forward and backward
  than XLA's convolution.
  """

  def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, padding: int, *, dtype: Dtype,
               param_dtype: Dtype = jnp.float32, precision: str = 'float32', rngs: nnx.Rngs):
    self.precision = lax_precision(dtype, precision)
    self.conv = nnx.Conv(n_in, n_out, (kernel, kernel), (stride, stride), padding=((padding, padding),) * 2,
                         use_bias=False, dtype=dtype, param_dtype=param_dtype, precision=self.precision,
                         kernel_init=normal(0.0, 0.02), rngs=rngs)
    self.kernel_size, self.stride, self.padding, self.dtype = kernel, stride, padding, dtype

  def __call__(self, x: Array) -> Array:
    if self.padding == 0 and x.shape[-3:-1] == (self.kernel_size, self.kernel_size):
      kernel = self.conv.kernel[...].astype(self.dtype)
      out = jnp.matmul(x.astype(self.dtype).reshape(*x.shape[:-3], -1), kernel.reshape(-1, kernel.shape[-1]),
                       precision=self.precision)
      return out[..., None, None, :]
    if onednn.enabled(self.dtype):
      kernel = self.conv.kernel[...]
      route = onednn.route_for(False, self.kernel_size, self.stride, *kernel.shape[-2:])
      if route.any:
        return onednn.conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding, route)
    return self.conv(x)

  def torch_tensors(self, prefix: str) -> Iterator[TorchTensor]:
    yield TorchTensor(f'{prefix}weight', self.conv.kernel, 'conv')


# Output channels from which a strided transposed convolution runs as stride-1 phase convolutions
# (measured on CPU, 240 frames, forward + backward: 512->256 at 4x4 7.3 s -> 0.38 s, 256->128 at 8x8
# 7.7 s -> 0.42 s, 128->64 at 16x16 5.7 s -> 0.99 s; but 64->1 at 32x32 0.12 s -> 0.60 s, where the
# four one-channel convolutions cost more than the dilated form saves).
PHASE_MIN_CHANNELS = 8


class ConvTranspose2d(nnx.Module):
  """``torch.nn.ConvTranspose2d`` without bias.

  The kernel is stored as (kh, kw, in, out) in PyTorch's orientation (not flipped), so conversion is
  a transpose. Three equivalent formulations (same values up to rounding; the choice only depends
  on static shapes), because XLA's gradient of the textbook one is slow:

  - a 1x1 input with no padding (the decoders' first layer) is a matrix product:
    out[h, w] = x W[h, w];
  - on CPU (``backend.target_platform()``: the platform the program is traced for), a strided layer
    with at least ``PHASE_MIN_CHANNELS`` outputs is split into its ``stride^2`` output phases: output
    pixel (s m + r) only sees the taps k = r + p - s d, so each phase is a stride-1 convolution with a
    sub-kernel, and the phases are interleaved. Forward and backward then are ordinary stride-1
    convolutions (the lhs-dilated form's gradient falls on a slow path of XLA's CPU backend, ~20x
    slower);
  - otherwise (and on GPUs, where XLA maps it to cuDNN's native backward-data kernel, one call instead
    of four), the definition: a stride-1 convolution of the ``stride``-dilated input padded by
    ``kernel - 1 - padding`` with the spatially flipped kernel.
  """

  def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, padding: int, *, dtype: Dtype,
               param_dtype: Dtype = jnp.float32, precision: str = 'float32', rngs: nnx.Rngs):
    self.kernel = nnx.Param(normal(0.0, 0.02)(rngs.params(), (kernel, kernel, n_in, n_out), param_dtype))
    self.stride, self.padding, self.dtype = stride, padding, dtype
    self.precision = lax_precision(dtype, precision)

  def __call__(self, x: Array) -> Array:
    kernel, x = self.kernel[...].astype(self.dtype), x.astype(self.dtype)
    if x.shape[-3:-1] == (1, 1) and self.padding == 0:
      return jnp.einsum('...c,hwco->...hwo', x[..., 0, 0, :], kernel, precision=self.precision)
    if onednn.enabled(self.dtype):
      route = onednn.route_for(True, kernel.shape[0], self.stride, *kernel.shape[-2:])
      if route.any:
        return onednn.conv_transpose2d(x, kernel, self.stride, self.padding, self.xla_form, route)
    return self.xla_form(x, kernel)

  def xla_form(self, x: Array, kernel: Array) -> Array:
    """The layer on XLA (the phase or the dilated form below; the 1x1 case is ``__call__``'s)."""
    k, s, p = kernel.shape[0], self.stride, self.padding
    size = x.shape[-3]
    out_size = (size - 1) * s - 2 * p + k
    if (s > 1 and kernel.shape[-1] >= PHASE_MIN_CHANNELS and out_size % s == 0 and x.shape[-3] == x.shape[-2]
        and backend.target_platform() == 'cpu'):
      return _phase_conv_transpose(x, kernel, s, p, out_size // s, self.precision)
    pad = k - 1 - p
    return jax.lax.conv_general_dilated(x, kernel[::-1, ::-1], window_strides=(1, 1), padding=((pad, pad),) * 2,
                                        lhs_dilation=(s, s), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        precision=self.precision)

  def torch_tensors(self, prefix: str) -> Iterator[TorchTensor]:
    yield TorchTensor(f'{prefix}weight', self.kernel, 'conv_transpose')


def _phase_taps(k: int, s: int, p: int, r: int, size: int, m: int) -> tuple[list[int], tuple[int, int]]:
  """Kernel taps and padding of output phase r (outputs s*i + r, i < m) along one axis.

  Output s*i + r receives x[i + d] * W[k_] for every tap k_ = r + p - s*d in [0, k): a stride-1
  cross-correlation over x padded by (-d_min, m - size + d_max) with the taps in increasing d.
  """
  ds = sorted(d for d in range(-k, k + 1) if 0 <= r + p - s * d < k)
  return [r + p - s * d for d in ds], (-ds[0], m - size + ds[-1])


def _phase_conv_transpose(x: Array, kernel: Array, s: int, p: int, m: int,
                          precision: jax.lax.Precision | None = None) -> Array:
  """Transposed convolution (NHWC, square) as ``s * s`` stride-1 phase convolutions, interleaved."""
  k, size = kernel.shape[0], x.shape[-3]
  lead, n_out = x.shape[:-3], kernel.shape[-1]
  x = x.reshape(-1, *x.shape[-3:])
  taps = [_phase_taps(k, s, p, r, size, m) for r in range(s)]
  rows = []
  for ky, pad_y in taps:
    cols = []
    for kx, pad_x in taps:
      sub = kernel[jnp.asarray(ky)][:, jnp.asarray(kx)]
      cols.append(jax.lax.conv_general_dilated(x, sub, (1, 1), (pad_y, pad_x),
                                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision))
    rows.append(jnp.stack(cols, axis=3))  # (N, m, m, s_x, C)
  out = jnp.stack(rows, axis=2)  # (N, m, s_y, m, s_x, C)
  return out.reshape(*lead, m * s, m * s, n_out)


def leaky_relu(x: Array) -> Array:
  """LeakyReLU(0.2) with PyTorch's derivative at 0 (the slope, where ``jax.nn.leaky_relu`` uses 1)."""
  return jnp.where(x > 0, x, LEAKY_SLOPE * x)


class ConvBlock(nnx.Module):
  """Official ``make_conv_block``: conv -> [BatchNorm] -> activation (names ``.0`` conv, ``.1`` BN)."""

  def __init__(self, conv: Conv2d | ConvTranspose2d, n_out: int, activation: Callable[[Array], Array], *,
               batch_norm: bool = True, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.conv = conv
    self.bn = BatchNorm(n_out, param_dtype=param_dtype, rngs=rngs) if batch_norm else None
    self.activation = activation

  def __call__(self, x: Array, train: bool) -> Array:
    h = self.conv(x)
    if self.bn is not None:
      h = self.bn(h, train)
    return self.activation(h)

  def torch_tensors(self, prefix: str) -> Iterator[TorchTensor]:
    yield from self.conv.torch_tensors(f'{prefix}0.')
    if self.bn is not None:
      yield from self.bn.torch_tensors(f'{prefix}1.')


def max_pool(x: Array) -> Array:
  """2x2 stride-2 max-pooling (``nn.MaxPool2d(2, 2)``)."""
  return nnx.max_pool(x, (2, 2), (2, 2))


def upsample(x: Array) -> Array:
  """x2 nearest-neighbour upsampling (``nn.Upsample(scale_factor=2)``)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)
