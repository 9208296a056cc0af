"""User clips for ``srvp_jax.predict``: read a GIF, a video, a folder of frames or an array; fit it to a model.

Readers (by path): ``.gif`` (Pillow, every frame composed onto RGB); ``.mp4 .avi .mov .mkv .webm .m4v``
(decoded by the ffmpeg binary of imageio-ffmpeg, RGB24; a truncated file, which decodes to fewer frames than its
container declares, is refused: ``srvp_jax.video_headers``); a folder of images (``.png .jpg .jpeg .bmp
.tif .tiff .webp``, in file-name order with numbers compared as numbers, ``frame-9`` before ``frame-10``);
``.npy`` / ``.npz`` arrays (``.npz``: its only array, or ``FILE.npz:KEY``) shaped (T, H, W), (T, H, W, 1) or
(T, H, W, 3), uint8 / integers in [0, 255] or floats in [0, 1].

Fitting to the model (``fit``), frame by frame: the largest centred square is cropped (``crop``, the
default; ``stretch`` squeezes the whole frame instead, as the KTH preparation's ``ffmpeg -s 64x64``
does), resized to 64x64 with Lanczos (as the Human3.6M preparation), then converted to the model's
channels: for nc=1 the ITU-R 601 luminance (Pillow ``convert('L')``), which for the grey videos of
KTH is exactly the first channel the dataset preparation keeps; for nc=3 a grey clip is repeated on
the three channels.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Iterator

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from srvp_jax import video_headers
from srvp_jax.config import FRAME_SIZE as NX
from srvp_jax.data.base import natural_key

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
ARRAY_EXTENSIONS = ('.npy', '.npz')
FITS = ('crop', 'stretch')


class ClipError(Exception):
  """A clip that cannot be read or used (the message is one line saying why and what to do)."""


@dataclasses.dataclass
class Clip:
  """Frames uint8 (T, H, W, C) with C in {1, 3}, and the frame rate when the file tells it."""
  frames: np.ndarray
  fps: float | None


def supported() -> str:
  return f'a GIF, a video ({" ".join(VIDEO_EXTENSIONS)}), a folder of images or a .npy / .npz array'


def _gif(path: str) -> Clip:
  try:
    with Image.open(path) as img:
      durations = []
      frames = []
      for frame in ImageSequence.Iterator(img):
        durations.append(frame.info.get('duration', 0))
        frames.append(np.asarray(frame.convert('RGB')))
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise ClipError(f'cannot read the GIF {path} ({e})') from None
  ms = float(np.median(durations)) if durations else 0.
  return Clip(np.stack(frames), 1000. / ms if ms > 0 else None)


def _video(path: str, max_frames: int | None) -> Clip:
  gen: Iterator = imageio_ffmpeg.read_frames(path)
  frames = []
  try:
    with warnings.catch_warnings():  # JAX warns on fork; subprocess execs ffmpeg at once, which is safe.
      warnings.filterwarnings('ignore', message='os.fork', category=RuntimeWarning)
      meta = next(gen)
    width, height = meta['size']
    for raw in gen:
      frames.append(np.frombuffer(raw, np.uint8).reshape(height, width, 3))
      if max_frames is not None and len(frames) >= max_frames:
        break
  except (OSError, RuntimeError, StopIteration, ValueError) as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = lines[-1][:200] if lines else type(e).__name__
    raise ClipError(f'cannot decode the video {path} with ffmpeg ({detail}): is it a valid video file?') from None
  finally:
    gen.close()
  if not frames:
    raise ClipError(f'the video {path} has no frame that ffmpeg can decode')
  if max_frames is None or len(frames) < max_frames:  # Read to its end: as many frames as its container declares?
    missing = video_headers.missing_frames(path, len(frames), duration=meta.get('duration'), fps=meta.get('fps'))
    if missing is not None:
      raise ClipError(f'the video {path} is truncated: it decodes to {missing}')
  fps = float(meta.get('fps') or 0.)
  return Clip(np.stack(frames), fps if fps > 0 else None)


def _folder(path: str) -> Clip:
  names = sorted((n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)), key=natural_key)
  if not names:
    raise ClipError(f'the folder {path} holds no image ({" ".join(IMAGE_EXTENSIONS)})')
  frames = []
  for name in names:
    try:
      with Image.open(os.path.join(path, name)) as img:
        frames.append(np.asarray(img.convert('L' if img.mode in ('L', 'I', 'I;16', 'F', '1') else 'RGB')))
    except (UnidentifiedImageError, OSError) as e:
      raise ClipError(f'cannot read the frame {os.path.join(path, name)} ({e})') from None
  shapes = {f.shape for f in frames}
  if len(shapes) > 1:
    raise ClipError(f'the frames of {path} do not all have the same size and mode: {sorted(shapes)}')
  frames = np.stack(frames)
  return Clip(frames[..., None] if frames.ndim == 3 else frames, None)


def _array(path: str, key: str | None) -> Clip:
  try:
    if path.endswith('.npy'):
      video = np.load(path, allow_pickle=False)
    else:
      with np.load(path, allow_pickle=False) as data:
        if key is None and len(data.files) != 1:
          raise ClipError(f'{path} holds the arrays {data.files}: name one as {path}:KEY')
        if key is not None and key not in data.files:
          raise ClipError(f'{path} has no array {key!r}; it holds {data.files}')
        video = data[key or data.files[0]]
  except (OSError, ValueError) as e:
    raise ClipError(f'cannot read the array file {path} ({" ".join(str(e).split())[:200]})') from None
  return Clip(_array_frames(video, path), None)


def _array_frames(video: np.ndarray, name: str) -> np.ndarray:
  """A (T, H, W[, C]) array as uint8 (T, H, W, C) frames, C in {1, 3}."""
  if video.ndim == 5 and video.shape[0] == 1:
    video = video[0]
  if video.ndim == 3:
    video = video[..., None]
  if video.ndim != 4 or video.shape[-1] not in (1, 3):
    raise ClipError(f'{name} has shape {video.shape}: expected (T, H, W), (T, H, W, 1) or (T, H, W, 3) '
                    '(frames, height, width, 1 or 3 channels)')
  if video.dtype == np.uint8:
    return video
  if np.issubdtype(video.dtype, np.integer):
    if video.size and (video.min() < 0 or video.max() > 255):
      raise ClipError(f'{name} holds integers outside [0, 255]')
    return video.astype(np.uint8)
  if np.issubdtype(video.dtype, np.floating):
    if not np.all(np.isfinite(video)) or (video.size and (video.min() < 0 or video.max() > 1)):
      raise ClipError(f'{name} holds floats outside [0, 1]: give frames in [0, 1] (or uint8 in [0, 255])')
    return np.round(video * 255.).astype(np.uint8)
  raise ClipError(f'{name} has dtype {video.dtype}: give uint8 frames or floats in [0, 1]')


def read(path: str, start: int = 0, stride: int = 1, n_frames: int | None = None) -> Clip:
  """Frames start, start + stride, ... (at most ``n_frames``) of a clip file or folder; fps divided by stride."""
  key = None
  if not os.path.exists(path) and ':' in os.path.basename(path):
    path, key = path.rsplit(':', 1)
  if not os.path.exists(path):
    raise ClipError(f'clip {path} not found')
  lower = path.lower()
  if key is not None and not lower.endswith('.npz'):
    raise ClipError(f'{path}:{key}: an array name applies to .npz files only')
  if os.path.isdir(path):
    clip = _folder(path)
  elif lower.endswith('.gif'):
    clip = _gif(path)
  elif lower.endswith(VIDEO_EXTENSIONS):
    clip = _video(path, None if n_frames is None else start + (n_frames - 1) * stride + 1)
  elif lower.endswith(ARRAY_EXTENSIONS):
    clip = _array(path, key)
  else:
    raise ClipError(f'unsupported clip {path}: give {supported()}')
  if len(clip.frames) == 0:
    raise ClipError(f'the clip {path} has 0 frames')
  frames = clip.frames[start::stride]
  if n_frames is not None:
    frames = frames[:n_frames]
  if len(frames) == 0:
    raise ClipError(f'{path} has {len(clip.frames)} frame(s): none left from --start {start}')
  return Clip(frames, None if clip.fps is None else clip.fps / stride)


def is_grey(frames: np.ndarray) -> bool:
  """Whether uint8 (T, H, W, C) frames are grey: one channel, or three equal ones (a grey video decoded as RGB)."""
  return frames.shape[-1] == 1 or bool(np.array_equal(frames[..., 0], frames[..., 1]) and
                                       np.array_equal(frames[..., 0], frames[..., 2]))


def fit(frames: np.ndarray, nc: int, mode: str = 'crop') -> np.ndarray:
  """uint8 (T, H, W, C) -> uint8 (T, 64, 64, nc): centred square crop (or stretch), Lanczos resize, channels."""
  if mode not in FITS:
    raise ValueError(f'fit mode {mode!r} not in {FITS}')
  out = np.empty((len(frames), NX, NX, nc), np.uint8)
  for t, frame in enumerate(frames):
    img = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
    if mode == 'crop':
      w, h = img.size
      side = min(w, h)
      left, top = (w - side) // 2, (h - side) // 2
      img = img.crop((left, top, left + side, top + side))
    if img.size != (NX, NX):
      img = img.resize((NX, NX), resample=Image.LANCZOS)
    if nc == 1:
      out[t, ..., 0] = np.asarray(img.convert('L'))
    else:
      out[t] = np.asarray(img.convert('RGB'))
  return out


def load(path: str, nc: int, *, start: int = 0, stride: int = 1, n_frames: int | None = None,
         mode: str = 'crop') -> Clip:
  """``read`` then ``fit``: uint8 (T, 64, 64, nc) frames of a clip and its frame rate (or None)."""
  clip = read(path, start, stride, n_frames)
  return Clip(fit(clip.frames, nc, mode), clip.fps)
