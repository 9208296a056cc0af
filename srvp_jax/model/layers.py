"""Layers with the exact semantics (and initialisation) of the official PyTorch ones.

Every layer that holds weights also knows the names and layouts of its tensors in an official
``state_dict`` (``torch_tensors``), so that conversion in both directions is a walk over the model,
not a hand-written table that can drift from the architecture.

Layouts: activations are NHWC; conv kernels HWIO; dense kernels (in, out). Each layer takes two
dtypes: ``dtype``, the *compute* dtype of its convolutions and matrix products (float32, or bfloat16
for mixed precision), and ``param_dtype``, the dtype of its parameters, BatchNorm statistics and of
every accumulation (float32; float64 under ``jax_enable_x64`` for the reference replay).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
Dtype = jnp.dtype

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch.
LEAKY_SLOPE = 0.2


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
               kernel_init: Callable | None = None, bias_init: Callable | None = None,
               init_bound_fan: int | None = None, rngs: nnx.Rngs):
    default = torch_uniform(init_bound_fan or n_in)
    self.dense = nnx.Linear(n_in, n_out, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init or default,
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
               param_dtype: Dtype = jnp.float32, kernel_init: Callable | None = None,
               bias_init: Callable | None = None, rngs: nnx.Rngs):
    sizes = [n_in] + [n_hid] * (n_layers - 1) + [n_out]
    self.layers = nnx.List([
        Linear(a, b, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
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
               rngs: nnx.Rngs):
    self.n_hid, self.param_dtype = n_hid, param_dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, init_bound_fan=n_hid, rngs=rngs)
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
    _, hs = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(gates_x, 0, 1))
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
  """``torch.nn.Conv2d`` without bias (cross-correlation, symmetric zero padding)."""

  def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, padding: int, *, dtype: Dtype,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.conv = nnx.Conv(n_in, n_out, (kernel, kernel), (stride, stride), padding=((padding, padding),) * 2,
                         use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=normal(0.0, 0.02),
                         rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.conv(x)

  def torch_tensors(self, prefix: str) -> Iterator[TorchTensor]:
    yield TorchTensor(f'{prefix}weight', self.conv.kernel, 'conv')


class ConvTranspose2d(nnx.Module):
  """``torch.nn.ConvTranspose2d`` without bias.

  Computed as a stride-1 convolution of the ``stride``-dilated input, padded by
  ``kernel - 1 - padding``, with the spatially flipped kernel: the definition of the transposed
  convolution, so output sizes and values equal PyTorch's. The kernel is stored as
  (kh, kw, in, out) in PyTorch's orientation (not flipped), so conversion is a transpose.
  """

  def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, padding: int, *, dtype: Dtype,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.kernel = nnx.Param(normal(0.0, 0.02)(rngs.params(), (kernel, kernel, n_in, n_out), param_dtype))
    self.stride, self.pad, self.dtype = stride, kernel - 1 - padding, dtype

  def __call__(self, x: Array) -> Array:
    kernel = self.kernel[...][::-1, ::-1].astype(self.dtype)
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel, window_strides=(1, 1), padding=((self.pad, self.pad),) * 2,
        lhs_dilation=(self.stride, self.stride), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def torch_tensors(self, prefix: str) -> Iterator[TorchTensor]:
    yield TorchTensor(f'{prefix}weight', self.kernel, 'conv_transpose')


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
