"""Files an evaluation writes (the official ones, and figures people look at), and how to recognise them."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from srvp_jax import visualize


RESULTS = 'results.json'
# Every file name write_outputs and the evaluation write (results.json last).
NAMES = re.compile(r'(results\.(json|npz)|sample_metrics\.npz|random_\d+\.npz|cond_rec\.npz|'
                   r'[a-z]+_(best|worst)\.npz|comparison\.(png|gif)|per_frame\.png)')


def is_evaluation(path: str) -> bool:
  """Whether the folder ``path`` holds an earlier evaluation's outputs and nothing else (then it may be replaced)."""
  names = os.listdir(path)
  if RESULTS not in names or not all(NAMES.fullmatch(n) for n in names):
    return False
  try:
    with open(os.path.join(path, RESULTS), encoding='utf-8') as f:
      return 'checkpoint' in json.load(f)
  except (OSError, ValueError, TypeError):
    return False


def _save_samples(out_dir: str, name: str, samples: np.ndarray) -> None:
  np.savez_compressed(os.path.join(out_dir, f'{name}.npz'), samples=samples)


def write_outputs(out_dir: str, videos: np.ndarray, nt_cond: int, res: Mapping[str, Any], n_show: int) -> None:
  """results.npz, sample_metrics.npz, the official sample files, comparison.png/.gif and per_frame.png."""
  names = list(res['best_value'])
  np.savez_compressed(os.path.join(out_dir, 'results.npz'), **res['best_value'])
  extra = {}
  for m in names:
    extra[m] = res['sample_values'][m]
    extra[f'{m}_best_index'] = res['best_index'][m]
    extra[f'{m}_worst_index'] = res['worst_index'][m]
    extra[f'{m}_worst'] = res['worst_value'][m]
    extra[f'{m}_per_frame'] = res['per_frame'][m]
  np.savez_compressed(os.path.join(out_dir, 'sample_metrics.npz'), **extra)
  for i, video in enumerate(res['random']):
    _save_samples(out_dir, f'random_{i + 1}', video)
  _save_samples(out_dir, 'cond_rec', res['cond_rec'])
  for m in names:
    _save_samples(out_dir, f'{m}_best', res['best'][m])
    _save_samples(out_dir, f'{m}_worst', res['worst'][m])
  if n_show > 0:
    preds = {}
    if names:
      key = 'psnr' if 'psnr' in names else names[0]
      preds[f'best {key}'] = res['best'][key]
    for i, video in enumerate(res['random'][:2]):
      preds[f'random {i + 1}'] = video
    visualize.save_comparison(os.path.join(out_dir, 'comparison.png'), os.path.join(out_dir, 'comparison.gif'),
                              videos[:, :nt_cond], videos[:, nt_cond:], preds, n_show)
  if names:
    curves = {m: res['per_frame'][m].mean(axis=0) for m in names}
    visualize.plot_per_frame(os.path.join(out_dir, 'per_frame.png'), curves, first_frame=nt_cond + 1)
