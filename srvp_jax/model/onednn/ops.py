"""Convolutions and transposed convolutions whose passes run on oneDNN, with their own ``custom_vjp``.

A layer's three passes (forward, gradient of the input, gradient of the kernel) are the three passes
of one oneDNN convolution: for ``Conv2d`` directly, for ``ConvTranspose2d`` with the roles exchanged
(its forward is the convolution's backward-data pass with the kernel's in/out axes swapped, its input
gradient the convolution's forward, its kernel gradient the convolution's backward-weights with input
and output exchanged). ``Route`` says which passes run on oneDNN; the others are XLA's own passes of
the layer's XLA form, so every route computes the same function.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
TARGET = 'srvp_onednn_conv'
FORWARD, BACKWARD_DATA, BACKWARD_WEIGHTS = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Route:
  """Which of a layer's passes run on oneDNN (the others on XLA)."""
  forward: bool = True
  input_grad: bool = True
  kernel_grad: bool = True

  @property
  def any(self) -> bool:
    return self.forward or self.input_grad or self.kernel_grad


ALL = Route()


@dataclasses.dataclass(frozen=True)
class Spec:
  """A layer's static description: transposed or not, stride, padding and its XLA form ``xla(x, w)``."""
  transpose: bool
  stride: int
  padding: int
  xla: Callable[[Array, Array], Array]


def _call(mode: int, shape: tuple[int, ...], a: Array, b: Array, stride: int, padding: int) -> Array:
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method='sequential')(
      a, b, mode=np.int64(mode), stride=np.int64(stride), padding=np.int64(padding))


def _out_size(spec: Spec, size: int, k: int) -> int:
  if spec.transpose:
    return (size - 1) * spec.stride - 2 * spec.padding + k
  return (size + 2 * spec.padding - k) // spec.stride + 1


def _forward(spec: Spec, x: Array, w: Array) -> Array:
  k = w.shape[0]
  shape = (x.shape[0], _out_size(spec, x.shape[1], k), _out_size(spec, x.shape[2], k), w.shape[3])
  if spec.transpose:
    return _call(BACKWARD_DATA, shape, x, jnp.swapaxes(w, 2, 3), spec.stride, spec.padding)
  return _call(FORWARD, shape, x, w, spec.stride, spec.padding)


def _input_grad(spec: Spec, x: Array, w: Array, g: Array) -> Array:
  if spec.transpose:
    return _call(FORWARD, x.shape, g, jnp.swapaxes(w, 2, 3), spec.stride, spec.padding)
  return _call(BACKWARD_DATA, x.shape, g, w, spec.stride, spec.padding)


def _kernel_grad(spec: Spec, x: Array, w: Array, g: Array) -> Array:
  if spec.transpose:
    k, _, n_in, n_out = w.shape
    return jnp.swapaxes(_call(BACKWARD_WEIGHTS, (k, k, n_out, n_in), g, x, spec.stride, spec.padding), 2, 3)
  return _call(BACKWARD_WEIGHTS, w.shape, x, g, spec.stride, spec.padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _routed(spec: Spec, route: Route, x: Array, w: Array) -> Array:
  return _forward(spec, x, w) if route.forward else spec.xla(x, w)


def _routed_fwd(spec: Spec, route: Route, x: Array, w: Array):
  return _routed(spec, route, x, w), (x, w)


def _routed_bwd(spec: Spec, route: Route, residuals, g: Array):
  x, w = residuals
  if route.input_grad:
    dx = _input_grad(spec, x, w, g)
  else:
    dx = jax.vjp(lambda x_: spec.xla(x_, w), x)[1](g)[0]
  if route.kernel_grad:
    dw = _kernel_grad(spec, x, w, g)
  else:
    dw = jax.vjp(lambda w_: spec.xla(x, w_), w)[1](g)[0]
  return dx, dw


_routed.defvjp(_routed_fwd, _routed_bwd)


def _apply(spec: Spec, route: Route, x: Array, w: Array) -> Array:
  lead = x.shape[:-3]
  out = _routed(spec, route, x.reshape(-1, *x.shape[-3:]), w)
  return out.reshape(*lead, *out.shape[1:])


def xla_conv2d(x: Array, w: Array, stride: int, padding: int) -> Array:
  """XLA's cross-correlation (NHWC, HWIO, symmetric zero padding): the reference of ``conv2d``."""
  return jax.lax.conv_general_dilated(x, w, (stride, stride), ((padding, padding),) * 2,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def conv2d(x: Array, w: Array, stride: int, padding: int, route: Route = ALL) -> Array:
  """``torch.nn.Conv2d`` without bias on float32 (..., H, W, C) inputs and an HWIO kernel."""
  xla = functools.partial(xla_conv2d, stride=stride, padding=padding)
  return _apply(Spec(False, stride, padding, xla), route, x, w)


def conv_transpose2d(x: Array, w: Array, stride: int, padding: int, xla: Callable[[Array, Array], Array],
                     route: Route = ALL) -> Array:
  """``torch.nn.ConvTranspose2d`` without bias; ``w`` is (kh, kw, in, out) in PyTorch's orientation and
  ``xla(x, w)`` the layer's XLA form (used for the passes ``route`` leaves to XLA)."""
  return _apply(Spec(True, stride, padding, xla), route, x, w)
