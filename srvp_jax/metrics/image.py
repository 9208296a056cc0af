"""Per-frame PSNR and SSIM in JAX, matching the official SRVP `test.py` definitions.

Frames are float arrays of shape (..., H, W, C) with values in [0, 1]; every function returns one
value per frame, shape (...). The per-video score of the paper is the mean over the frame axis
(axis 1 of our (B, T, H, W, C) layout) of the predicted frames. Both functions are jit-friendly.
"""

import dm_pix as pix
import jax.numpy as jnp

SSIM_FILTER_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(pred, target):
  """Validates two frame batches of the same (..., H, W, C) shape."""
  if pred.shape != target.shape:
    raise ValueError(f'pred and target shapes differ: {pred.shape} vs {target.shape}')
  if pred.ndim < 3:
    raise ValueError(f'expected frames shaped (..., H, W, C), got shape {pred.shape}')


def psnr(pred, target):
  """PSNR per frame: mean over channels of 10 log10(1 / MSE_c), MSE_c over the H x W pixels.

  A frame identical to its target gives +inf, as in the official code.
  """
  _check_pair(pred, target)
  pred = jnp.asarray(pred, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  mse = jnp.mean(jnp.square(pred - target), axis=(-3, -2))
  return jnp.mean(10. * jnp.log10(1. / mse), axis=-1)


def ssim(pred, target):
  """SSIM per frame: 11x11 Gaussian window (sigma 1.5), k1 .01, k2 .03, valid convolution.

  The SSIM map is averaged over pixels then channels (dm-pix averages over both at once, which is
  the same mean since every channel has the same number of pixels).
  """
  _check_pair(pred, target)
  lead, frame = pred.shape[:-3], pred.shape[-3:]
  if min(frame[:2]) < SSIM_FILTER_SIZE:
    raise ValueError(f'frames must be at least {SSIM_FILTER_SIZE}x{SSIM_FILTER_SIZE} for SSIM, got {frame[:2]}')
  pred = jnp.asarray(pred, jnp.float32).reshape((-1,) + frame)
  target = jnp.asarray(target, jnp.float32).reshape((-1,) + frame)
  values = pix.ssim(pred, target, max_val=1., filter_size=SSIM_FILTER_SIZE, filter_sigma=SSIM_SIGMA,
                    k1=SSIM_K1, k2=SSIM_K2)
  return values.reshape(lead)
