"""LPIPS (PyTorch) and FVD (I3D in JAX) as the evaluation uses them, with their start-up checks.

The evaluation's entry point imports torch first when LPIPS is asked for (``srvp_jax.cli.start``), so
TensorFlow (imported later by a data pipeline) cannot crash the process.

Test hook: SRVP_LPIPS_ALLOW_RANDOM_BACKBONE=1 lets LPIPS run with a RANDOM AlexNet when no weights are
found (loud warning; results.json marks LPIPS as not comparable). Never use it for reported numbers.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from srvp_jax.metrics import fvd as fvd_lib
from srvp_jax.metrics import lpips_bridge

RANDOM_BACKBONE_ENV = 'SRVP_LPIPS_ALLOW_RANDOM_BACKBONE'
RANDOM_BACKBONE_NOTE = 'random backbone - not comparable'


class LearnedMetricError(Exception):
  """A metric that cannot run (missing / corrupt weights, import order): one line."""


def resolve_lpips_backbone(path: str | None) -> str | None:
  """The AlexNet weights file, or None for the explicit random-backbone test hook (loud warning)."""
  try:
    return lpips_bridge.check_lpips_available(path)
  except FileNotFoundError:
    if path is None and os.environ.get(RANDOM_BACKBONE_ENV) == '1':
      print(f'WARNING: {RANDOM_BACKBONE_ENV}=1 and no AlexNet weights: LPIPS uses a RANDOM backbone; '
            'its values are NOT comparable to any published number (tests only)', file=sys.stderr)
      return None
    if path is not None:
      raise LearnedMetricError(f'--lpips_backbone {path} not found: give torchvision\'s AlexNet weights '
                      f'{lpips_bridge.ALEXNET_FILE} ({lpips_bridge.ALEXNET_URL})') from None
    raise LearnedMetricError(f'LPIPS needs the torchvision AlexNet weights: download {lpips_bridge.ALEXNET_URL} to '
                    f'{lpips_bridge.default_backbone_path()} or give --lpips_backbone PATH '
                    '(or leave lpips out of --metrics)') from None


class LpipsOnFrames:
  """LPIPS v0.1 AlexNet per frame through the torch bridge; a corrupt weights file is a LearnedMetricError."""

  def __init__(self, backbone_path: str | None):
    try:
      self.model = lpips_bridge.LPIPS(backbone_path, allow_random_backbone=backbone_path is None)
    except ValueError as e:
      raise LearnedMetricError(str(e)) from None

  def features(self, frames):
    """The target side of distances computed once (``lpips_bridge.LPIPS.features``)."""
    return self.model.features(frames)

  def __call__(self, pred, target):
    return self.model(pred, target)


def check_fvd(nt_gen: int, weights: str | None) -> str:
  """The I3D weights file for FVD on videos of ``nt_gen`` frames (LearnedMetricError when it cannot run)."""
  if nt_gen < fvd_lib.I3D_MIN_FRAMES:
    raise LearnedMetricError(f'FVD needs videos of at least {fvd_lib.I3D_MIN_FRAMES} frames, nt_gen={nt_gen}: '
                    'raise --nt_gen or drop fvd from --metrics')
  try:
    return fvd_lib.check_i3d_available(weights)
  except FileNotFoundError as e:
    raise LearnedMetricError(str(e)) from None


def fvd(videos: np.ndarray, nt_cond: int, first_sample: np.ndarray, weights: str) -> float:
  """Official FVD: conditioning + ground truth against conditioning + the first random sample."""
  fake = np.concatenate([videos[:, :nt_cond], first_sample], axis=1)
  return float(fvd_lib.compute_fvd(videos, fake, weights_path=weights))
