"""DCGAN and VGG 64x64 frame encoders and decoders (docs/srvp.md section 2).

Encoders map a frame (N, 64, 64, nc) to a vector of size ``nhx`` plus four skip tensors (the
outputs of the four stages, deepest first). Decoders map a vector of size ``nh_inf + ny`` (and,
with skip connections, the skip tensors) to a frame in [0, 1].
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from srvp_jax.model.layers import (ConvBlock, Conv2d, ConvTranspose2d, TorchTensor, leaky_relu, max_pool,
                                   upsample)

Array = jax.Array


def _block(n_in, n_out, kernel, stride, padding, activation, *, dtype, param_dtype, precision, rngs, transpose=False,
           batch_norm=True):
  conv_cls = ConvTranspose2d if transpose else Conv2d
  conv = conv_cls(n_in, n_out, kernel, stride, padding, dtype=dtype, param_dtype=param_dtype, precision=precision,
                  rngs=rngs)
  return ConvBlock(conv, n_out, activation, batch_norm=batch_norm, param_dtype=param_dtype, rngs=rngs)


class Encoder(nnx.Module):
  """Frame encoder; ``archi`` is 'dcgan' (strided 4x4 convs) or 'vgg' (3x3 convs + max-pooling)."""

  def __init__(self, archi: str, nc: int, nhx: int, nf: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               precision: str = 'float32', rngs: nnx.Rngs):
    self.archi, self.nhx, self.param_dtype = archi, nhx, param_dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    if archi == 'dcgan':
      chans = [nc, nf, 2 * nf, 4 * nf, 8 * nf]
      self.stages = nnx.List([
          nnx.List([_block(chans[i], chans[i + 1], 4, 2, 1, leaky_relu, batch_norm=i > 0, **kw)])
          for i in range(4)
      ])
    elif archi == 'vgg':
      widths = [[nc, nf, nf], [nf, 2 * nf, 2 * nf], [2 * nf, 4 * nf, 4 * nf, 4 * nf],
                [4 * nf, 8 * nf, 8 * nf, 8 * nf]]
      self.stages = nnx.List([
          nnx.List([_block(a, b, 3, 1, 1, leaky_relu, **kw) for a, b in zip(w[:-1], w[1:])]) for w in widths
      ])
    else:
      raise ValueError(f"unknown architecture {archi!r}; expected 'dcgan' or 'vgg'")
    self.last = _block(8 * nf, nhx, 4, 1, 0, jnp.tanh, **kw)

  def __call__(self, x: Array, train: bool) -> tuple[Array, list[Array]]:
    """x: (N, 64, 64, nc) -> (h (N, nhx) in the parameter dtype, skips deepest first)."""
    skips = []
    h = x
    for i, stage in enumerate(self.stages):
      if self.archi == 'vgg' and i > 0:
        h = max_pool(h)
      for block in stage:
        h = block(h, train)
      skips.append(h)
    if self.archi == 'vgg':
      h = max_pool(h)
    h = self.last(h, train)
    return h.reshape(h.shape[0], self.nhx).astype(self.param_dtype), skips[::-1]

  def torch_tensors(self, prefix: str) -> Iterator[TorchTensor]:
    for i, stage in enumerate(self.stages):
      for j, block in enumerate(stage):
        if self.archi == 'dcgan':
          yield from block.torch_tensors(f'{prefix}conv.{i}.')
        else:  # VGG stages after the first start with a MaxPool2d at index 0.
          yield from block.torch_tensors(f'{prefix}conv.{i}.{j + (i > 0)}.')
    yield from self.last.torch_tensors(f'{prefix}last_conv.' + ('1.' if self.archi == 'vgg' else ''))


class Decoder(nnx.Module):
  """Frame decoder mirroring ``Encoder``; with ``skipco`` each stage input is concatenated
  (channels, decoder features first) with the matching skip tensor."""

  def __init__(self, archi: str, nc: int, n_in: int, nf: int, skipco: bool, *, dtype=jnp.float32,
               param_dtype=jnp.float32, precision: str = 'float32', rngs: nnx.Rngs):
    self.archi, self.skipco, self.param_dtype = archi, skipco, param_dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    coef = 2 if skipco else 1
    self.first = _block(n_in, 8 * nf, 4, 1, 0, leaky_relu, transpose=True, **kw)
    if archi == 'dcgan':
      chans = [8 * nf, 4 * nf, 2 * nf, nf]
      stages = [[_block(chans[i] * coef, chans[i + 1], 4, 2, 1, leaky_relu, transpose=True, **kw)]
                for i in range(3)]
      stages.append([ConvTranspose2d(nf * coef, nc, 4, 2, 1, **kw)])
    elif archi == 'vgg':
      widths = [[8 * nf, 8 * nf, 8 * nf, 4 * nf], [4 * nf, 4 * nf, 4 * nf, 2 * nf], [2 * nf, 2 * nf, nf]]
      stages = []
      for w in widths:
        ins = [w[0] * coef] + w[1:-1]
        stages.append([_block(a, b, 3, 1, 1, leaky_relu, **kw) for a, b in zip(ins, w[1:])])
      stages.append([_block(nf * coef, nf, 3, 1, 1, leaky_relu, **kw), ConvTranspose2d(nf, nc, 3, 1, 1, **kw)])
    else:
      raise ValueError(f"unknown architecture {archi!r}; expected 'dcgan' or 'vgg'")
    self.stages = nnx.List([nnx.List(s) for s in stages])

  def __call__(self, v: Array, skips: Sequence[Array] | None, train: bool) -> Array:
    """v: (N, n_in) -> frames (N, 64, 64, nc) in [0, 1] (parameter dtype, sigmoid applied)."""
    h = self.first(v[:, None, None, :], train)
    if self.archi == 'vgg':
      h = upsample(h)
    for i, stage in enumerate(self.stages):
      if self.skipco:
        h = jnp.concatenate([h, skips[i].astype(h.dtype)], axis=-1)
      for layer in stage:
        h = layer(h, train) if isinstance(layer, ConvBlock) else layer(h)
      if self.archi == 'vgg' and i < 3:
        h = upsample(h)
    return jax.nn.sigmoid(h.astype(self.param_dtype))

  def torch_tensors(self, prefix: str) -> Iterator[TorchTensor]:
    yield from self.first.torch_tensors(f'{prefix}first_upconv.' + ('0.' if self.archi == 'vgg' else ''))
    for i, stage in enumerate(self.stages):
      for j, layer in enumerate(stage):
        name = f'{prefix}conv.{i}.' if self.archi == 'dcgan' else f'{prefix}conv.{i}.{j}.'
        yield from layer.torch_tensors(name)
