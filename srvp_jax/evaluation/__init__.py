"""Evaluation as library code: the paper's protocol (docs/srvp.md section 5) for training validation, the
``python -m srvp_jax.evaluate`` tool and user tools.

* ``sampling``: the compiled best-of-N core (``Protocol``, ``BestOfN``, ``validation_psnr``,
  ``auto_chunk`` from the compiled program's memory analysis);
* ``runner``: ``evaluate_videos`` over a test set (double-buffered host loop);
* ``report``: official means / intervals, the paper's numbers beside ours (``compare``), JSON;
* ``outputs``: the official files and the figures;
* ``learned_metrics``: LPIPS (PyTorch) and FVD (I3D), the learned metrics, with their start-up checks.
"""

from srvp_jax.evaluation.runner import IMAGE_METRICS, evaluate_videos
from srvp_jax.evaluation.sampling import BestOfN, Protocol, auto_chunk, predictions, validation_psnr

__all__ = ['BestOfN', 'IMAGE_METRICS', 'Protocol', 'auto_chunk', 'evaluate_videos', 'predictions',
           'validation_psnr']
