"""Summaries of an evaluation: official means and intervals, the paper's numbers beside ours, JSON.

The official interval is 1.96 * std / sqrt(n) (NumPy std, ddof 0, as ``test.py`` applies ``.std()`` to
NumPy arrays). ``compare`` puts a reference (the paper's numbers, or a user's JSON file of the same
shape) next to ours and says whether the two 95% intervals overlap.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from srvp_jax.metrics.fvd import I3D_CHUNK

# The paper's numbers (SRVP, ICML 2020, Table 1 protocol: best of 100 samples, mean over test videos +/- 95%
# interval). Source: as reprinted by Akan et al. (SLAMP, ICCV 2021, numbers provided by the SRVP authors) and by
# Papers with Code; BAIR FVD is 162 +/- 4 there (SLAMP prints 163 +/- 4). Datasets without an entry were not
# available to us: give them with --compare_official FILE.
PAPER_RESULTS: dict[str, dict[str, dict[str, float]]] = {
    'smmnist': {'psnr': {'mean': 16.93, 'interval95': 0.07}, 'ssim': {'mean': 0.7799, 'interval95': 0.0020}},
    'kth': {'psnr': {'mean': 29.69, 'interval95': 0.32}, 'ssim': {'mean': 0.8697, 'interval95': 0.0046},
            'lpips': {'mean': 0.0736, 'interval95': 0.0029}, 'fvd': {'mean': 222., 'interval95': 3.}},
    'bair': {'psnr': {'mean': 19.59, 'interval95': 0.27}, 'ssim': {'mean': 0.8196, 'interval95': 0.0084},
             'lpips': {'mean': 0.0574, 'interval95': 0.0032}, 'fvd': {'mean': 162., 'interval95': 4.}},
}


def summarize(values: np.ndarray) -> dict[str, float]:
  """Mean over videos and the official 95% interval 1.96 * std / sqrt(n) (NumPy std, ddof 0)."""
  values = np.asarray(values, np.float64)
  std = float(values.std())
  return {'mean': float(values.mean()), 'std': std, 'interval95': 1.96 * std / float(np.sqrt(len(values)))}


def jsonable(value):
  """Floats that JSON can hold: non-finite ones become strings ('inf', 'nan')."""
  if isinstance(value, dict):
    return {k: jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if np.isfinite(value) else str(float(value))
  if isinstance(value, np.integer):
    return int(value)
  return value


def fvd_note(n_videos: int) -> str | None:
  """Why an FVD on fewer than 16 videos (one I3D chunk) is not comparable with the paper's (None from 16 on)."""
  chunk = I3D_CHUNK
  if n_videos >= chunk:
    return None
  return (f'FVD on {n_videos} < {chunk} videos: the official code needs at least one chunk of '
          f'{chunk} videos. Ours computes it (I3D chunks are completed with the first videos and inference '
          f'BatchNorm keeps each embedding independent of them), but the Frechet distance then rests on the mean and '
          f'covariance of only {n_videos} 400-dimensional embeddings (covariance rank < {n_videos}): a noisy, biased '
          'value, not comparable with the paper\'s FVD on the full test set.')


def load_reference(path: str) -> dict[str, dict[str, float]]:
  """A reference file: JSON {metric: {"mean": m, "interval95": i}} (or {metric: m}); ValueError one line."""
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except OSError as e:
    raise ValueError(f'--compare_official {path}: {e.strerror or e}') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'--compare_official {path} is not JSON ({e.msg}, line {e.lineno})') from None
  if not isinstance(data, dict):
    raise ValueError(f'--compare_official {path}: expected {{metric: {{"mean": m, "interval95": i}}}}')
  out = {}
  for name, entry in data.items():
    if isinstance(entry, (int, float)):
      entry = {'mean': float(entry), 'interval95': 0.}
    if not isinstance(entry, dict) or not isinstance(entry.get('mean'), (int, float)):
      raise ValueError(f'--compare_official {path}: metric {name!r} needs a numeric "mean"')
    out[str(name).lower()] = {'mean': float(entry['mean']), 'interval95': float(entry.get('interval95', 0.))}
  return out


def compare(ours: Mapping[str, Mapping[str, float]], reference: Mapping[str, Mapping[str, float]],
            source: str) -> dict[str, Any]:
  """Per metric in both: ours, the reference, the difference and whether the 95% intervals overlap."""
  rows = {}
  for name, ref in reference.items():
    if name not in ours:
      continue
    mine = ours[name]
    diff = mine['mean'] - ref['mean']
    rows[name] = {'ours': mine['mean'], 'ours_interval95': mine.get('interval95', 0.), 'reference': ref['mean'],
                  'reference_interval95': ref['interval95'], 'difference': diff,
                  'intervals_overlap': bool(abs(diff) <= mine.get('interval95', 0.) + ref['interval95'])}
  return {'source': source, 'metrics': rows}


def format_table(summary: Mapping[str, Mapping[str, float]], fvd: float | None, n_videos: int, n_samples: int,
                 comparison: Mapping[str, Any] | None = None) -> str:
  """The results table (best sample per video, mean over videos +/- 95% interval), with the reference."""
  rows = (comparison or {}).get('metrics', {})
  header = f'{"metric":<8}{"mean":>14}{"95% interval":>18}'
  if rows:
    header += f'{"reference":>14}{"+/-":>10}  overlap'
  lines = [f'Results over {n_videos} test videos, best of {n_samples} samples per video:', header]
  values = dict(summary)
  if fvd is not None:
    values['fvd'] = {'mean': fvd, 'interval95': None}
  for name, s in values.items():
    interval = '' if s['interval95'] is None else '+/- ' + format(s['interval95'], '.5f')
    line = f'{name:<8}{s["mean"]:>14.5f}{interval:>18}'
    if name in rows:
      r = rows[name]
      line += f'{r["reference"]:>14.5g}{r["reference_interval95"]:>10.4g}  {"yes" if r["intervals_overlap"] else "NO"}'
    lines.append(line)
  if comparison:
    lines.append(f'reference: {comparison["source"]}')
  return '\n'.join(lines)
