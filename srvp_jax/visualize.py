"""Figures of an evaluation: PNG / GIF grids of predictions and a per-frame metric plot (PIL only).

Videos are uint8 (T, H, W, C) arrays with C in {1, 3}. Frame borders tell the frames apart:
green for conditioning frames, blue for ground-truth future frames, red for predicted frames.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COND_COLOR = (40, 170, 40)
TRUTH_COLOR = (60, 110, 220)
PRED_COLOR = (210, 40, 40)
BORDER = 2
GAP = 2
LABEL_WIDTH = 78
GIF_FRAME_MS = 250
METRIC_TITLES = {'psnr': 'PSNR (dB, higher is better)', 'ssim': 'SSIM (higher is better)',
                 'lpips': 'LPIPS (lower is better)'}


def to_rgb(video: np.ndarray) -> np.ndarray:
  """(..., H, W, C) uint8 with C in {1, 3} -> (..., H, W, 3) uint8."""
  video = np.asarray(video)
  if video.dtype != np.uint8 or video.shape[-1] not in (1, 3):
    raise ValueError(f'expected uint8 frames (..., H, W, C) with C in (1, 3), got {video.dtype} {video.shape}')
  return np.repeat(video, 3, axis=-1) if video.shape[-1] == 1 else video


def bordered(frames: np.ndarray, colors: Sequence[tuple[int, int, int]]) -> np.ndarray:
  """Frames (T, H, W, C) uint8 -> (T, H + 2b, W + 2b, 3), frame t framed with colors[t]."""
  frames = to_rgb(frames)
  t, h, w, _ = frames.shape
  out = np.empty((t, h + 2 * BORDER, w + 2 * BORDER, 3), np.uint8)
  out[:] = np.asarray(colors, np.uint8)[:, None, None, :]
  out[:, BORDER:BORDER + h, BORDER:BORDER + w] = frames
  return out


def _label(height: int, text: str) -> np.ndarray:
  """A white (height, LABEL_WIDTH, 3) tile with `text` on it."""
  tile = Image.new('RGB', (LABEL_WIDTH, height), (255, 255, 255))
  ImageDraw.Draw(tile).text((3, max(0, height // 2 - 6)), text, fill=(0, 0, 0), font=ImageFont.load_default())
  return np.asarray(tile)


def _rows(cond: np.ndarray, truth: np.ndarray, preds: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
  """Labelled bordered videos of one test video: ground truth then each prediction (cond + predicted)."""
  nt_cond, nt_pred = cond.shape[0], truth.shape[0]
  rows = [('truth', bordered(np.concatenate([cond, truth]), [COND_COLOR] * nt_cond + [TRUTH_COLOR] * nt_pred))]
  for name, pred in preds.items():
    if pred.shape != truth.shape:
      raise ValueError(f'prediction {name!r} has shape {pred.shape}, the ground truth {truth.shape}')
    rows.append((name, bordered(np.concatenate([cond, pred]), [COND_COLOR] * nt_cond + [PRED_COLOR] * nt_pred)))
  return rows


def _check_inputs(cond, truth, preds, n_videos):
  n = min(int(n_videos), cond.shape[0])
  if n < 1:
    raise ValueError('no video to draw')
  if cond.shape[0] != truth.shape[0] or any(p.shape[0] != cond.shape[0] for p in preds.values()):
    raise ValueError('conditioning, ground truth and predictions must hold the same number of videos')
  return n


def grid_image(cond: np.ndarray, truth: np.ndarray, preds: Mapping[str, np.ndarray], n_videos: int = 4) -> np.ndarray:
  """Still grid (H, W, 3) uint8: for each of the first videos, one row per video kind, one column per frame.

  cond (N, nt_cond, H, W, C), truth (N, nt_pred, H, W, C), preds name -> (N, nt_pred, H, W, C).
  """
  n = _check_inputs(cond, truth, preds, n_videos)
  blocks = []
  for v in range(n):
    for name, video in _rows(cond[v], truth[v], {k: p[v] for k, p in preds.items()}):
      t, fh, fw, _ = video.shape
      strip = np.full((fh, t * (fw + GAP), 3), 255, np.uint8)
      for i in range(t):
        strip[:, i * (fw + GAP):i * (fw + GAP) + fw] = video[i]
      blocks.append(np.concatenate([_label(fh, f'{v}: {name}'), strip], axis=1))
      blocks.append(np.full((GAP, blocks[-1].shape[1], 3), 255, np.uint8))
    blocks.append(np.full((4 * GAP, blocks[-1].shape[1], 3), 255, np.uint8))
  return np.concatenate(blocks[:-1], axis=0)


def gif_frames(cond: np.ndarray, truth: np.ndarray, preds: Mapping[str, np.ndarray], n_videos: int = 4) -> np.ndarray:
  """Animated grid (T, H, W, 3) uint8: one row per test video, one column per video kind."""
  n = _check_inputs(cond, truth, preds, n_videos)
  rows = []
  for v in range(n):
    videos = [video for _, video in _rows(cond[v], truth[v], {k: p[v] for k, p in preds.items()})]
    t, fh, fw, _ = videos[0].shape
    row = np.full((t, fh + GAP, len(videos) * (fw + GAP), 3), 255, np.uint8)
    for i, video in enumerate(videos):
      row[:, :fh, i * (fw + GAP):i * (fw + GAP) + fw] = video
    rows.append(row)
  return np.concatenate(rows, axis=1)


def hold(video: np.ndarray, length: int) -> np.ndarray:
  """(T, H, W, C) -> (length, H, W, C): the last frame repeated (T <= length)."""
  return np.concatenate([video, np.repeat(video[-1:], length - len(video), axis=0)]) if len(video) < length else video


def panel_grid(panels: Sequence[tuple[str, np.ndarray]], ncols: int) -> np.ndarray:
  """Animated grid (T, H, W, 3) uint8 of labelled videos (T_i, h, w, 3), ``ncols`` per row, the label above each.

  Videos shorter than the longest hold their last frame.
  """
  if not panels:
    raise ValueError('no video to draw')
  t = max(len(v) for _, v in panels)
  fh, fw = panels[0][1].shape[1:3]
  label_h = 14
  ncols = max(1, min(int(ncols), len(panels)))
  nrows = -(-len(panels) // ncols)
  cell_h, cell_w = label_h + fh + GAP, fw + GAP
  grid = np.full((t, nrows * cell_h, ncols * cell_w, 3), 255, np.uint8)
  for i, (name, video) in enumerate(panels):
    r, c = divmod(i, ncols)
    y, x = r * cell_h, c * cell_w
    tile = Image.new('RGB', (fw, label_h), (255, 255, 255))
    ImageDraw.Draw(tile).text((1, 1), name, fill=(0, 0, 0), font=ImageFont.load_default())
    grid[:, y:y + label_h, x:x + fw] = np.asarray(tile)
    grid[:, y + label_h:y + label_h + fh, x:x + fw] = hold(to_rgb(video), t)
  return grid


def save_png(path: str, image: np.ndarray) -> None:
  """Writes an (H, W, 3) uint8 image."""
  Image.fromarray(np.asarray(image, np.uint8)).save(path)


def save_gif(path: str, frames: np.ndarray, frame_ms: int = GIF_FRAME_MS) -> None:
  """Writes (T, H, W, 3) uint8 frames as a looping GIF."""
  images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
  images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)


def save_comparison(png_path: str, gif_path: str, cond: np.ndarray, truth: np.ndarray,
                    preds: Mapping[str, np.ndarray], n_videos: int = 4) -> None:
  """Writes the PNG grid and the GIF of the first `n_videos` test videos."""
  save_png(png_path, grid_image(cond, truth, preds, n_videos))
  save_gif(gif_path, gif_frames(cond, truth, preds, n_videos))


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
  """About n round tick values covering [lo, hi]."""
  span = hi - lo if hi > lo else max(abs(hi), 1.)
  step = 10 ** math.floor(math.log10(span / n))
  for mult in (1, 2, 5, 10):
    if span / (step * mult) <= n:
      step *= mult
      break
  first = math.floor(lo / step) * step
  return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _panel(values: np.ndarray, frames: np.ndarray, title: str, size=(380, 290)) -> Image.Image:
  """One line plot of values against frame numbers."""
  width, height = size
  left, right, top, bottom = 58, 14, 26, 38
  img = Image.new('RGB', size, (255, 255, 255))
  draw = ImageDraw.Draw(img)
  font = ImageFont.load_default()
  draw.text((left, 6), title, fill=(0, 0, 0), font=font)
  finite = values[np.isfinite(values)]
  if finite.size == 0:
    draw.text((left, height // 2), 'no finite value', fill=(0, 0, 0), font=font)
    return img
  ticks = _ticks(float(finite.min()), float(finite.max()))
  y_lo, y_hi = ticks[0], ticks[-1] if ticks[-1] > ticks[0] else ticks[0] + 1.
  x_lo, x_hi = float(frames[0]), float(frames[-1]) if frames[-1] > frames[0] else float(frames[0]) + 1.

  def xy(x, y):
    px = left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)
    py = height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)
    return px, py

  draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
  for tick in ticks:
    _, py = xy(x_lo, tick)
    draw.line([left - 4, py, left, py], fill=(0, 0, 0))
    draw.line([left + 1, py, width - right - 1, py], fill=(225, 225, 225))
    draw.text((4, py - 6), f'{tick:.4g}', fill=(0, 0, 0), font=font)
  x_step = max(1, int(math.ceil(len(frames) / 10)))
  for x in frames[::x_step]:
    px, _ = xy(float(x), y_lo)
    draw.line([px, height - bottom, px, height - bottom + 4], fill=(0, 0, 0))
    draw.text((px - 6, height - bottom + 6), str(int(x)), fill=(0, 0, 0), font=font)
  draw.text((left + (width - left - right) // 2 - 16, height - 16), 'frame', fill=(0, 0, 0), font=font)
  points = [xy(float(x), float(y)) for x, y in zip(frames, values) if np.isfinite(y)]
  if len(points) > 1:
    draw.line(points, fill=PRED_COLOR, width=2)
  for px, py in points:
    draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=PRED_COLOR)
  return img


def plot_per_frame(path: str, curves: Mapping[str, Sequence[float]], first_frame: int) -> None:
  """Writes a PNG with one panel per metric: value of each predicted frame (numbered from first_frame)."""
  if not curves:
    raise ValueError('no per-frame curve to plot')
  panels = []
  for name, values in curves.items():
    values = np.asarray(values, np.float64)
    frames = np.arange(first_frame, first_frame + len(values))
    panels.append(_panel(values, frames, METRIC_TITLES.get(name, name)))
  out = Image.new('RGB', (sum(p.width for p in panels), panels[0].height), (255, 255, 255))
  x = 0
  for panel in panels:
    out.paste(panel, (x, 0))
    x += panel.width
  out.save(path)
