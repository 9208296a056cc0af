"""What a video file's container declares about its frames, to tell a complete decode from a truncated file.

ffmpeg decodes a truncated file without an error: it returns the frames it found (a KTH AVI cut to 40% of its
bytes decodes to a single frame). The raw decoders of the data preparation and of your clips therefore compare
the decoded frame count with the count the container declares (``missing_frames``):

- an AVI declares its frame count and rate in its header, at the start of the file (RIFF ``avih``, the video
  stream's ``strh``, OpenDML's ``dmlh``), so a cut-off AVI still says how many frames it had; one frame fewer
  is allowed (the usual off-by-one of AVI writers);
- other containers (MP4, MKV, WebM, ...) through ffmpeg's header: duration x frame rate. The duration is
  rounded and spans every stream (an audio track may outlast the video), so up to 2 frames or 2% fewer are
  allowed. A file whose header is lost with its end (an MP4 without its ``moov``) does not decode at all.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

AVI_TOLERANCE = 1  # Frames an AVI may decode short of its header's count.
DURATION_TOLERANCE = (2, 0.02)  # Frames, fraction: what a duration-based count may decode short of.
_HEADER_BYTES = 1 << 20  # The AVI header list read at most (its stream headers and index stubs).


class Declared(NamedTuple):
  """A container's frame count and frame rate, the frames a complete decode may lack, and who says so."""
  frames: float
  fps: float
  tolerance: float
  source: str


def _chunks(data: bytes):
  """(id, payload) of the RIFF chunks in ``data`` (payloads padded to even sizes); stops at a cut chunk."""
  pos = 0
  while pos + 8 <= len(data):
    kind, size = data[pos:pos + 4], struct.unpack('<I', data[pos + 4:pos + 8])[0]
    yield kind, data[pos + 8:pos + 8 + size]
    pos += 8 + size + (size & 1)


def avi_header(path: str) -> tuple[int, float] | None:
  """(frames, fps) of an AVI's first video stream as its header declares them; None when ``path`` is no AVI
  or its header does not say (a cut header, zero counts)."""
  try:
    with open(path, 'rb') as f:
      head = f.read(24)
      if len(head) < 24 or head[:4] != b'RIFF' or head[8:12] != b'AVI ' or head[12:16] != b'LIST' or \
          head[20:24] != b'hdrl':
        return None
      hdrl = f.read(min(struct.unpack('<I', head[16:20])[0] - 4, _HEADER_BYTES))
  except OSError:
    return None
  total, length, dml, fps = 0, 0, 0, 0.0
  for kind, data in _chunks(hdrl):
    if kind == b'avih' and len(data) >= 20:
      us_per_frame, total = struct.unpack('<I', data[0:4])[0], struct.unpack('<I', data[16:20])[0]
      fps = fps or (1e6 / us_per_frame if us_per_frame else 0.0)
    elif kind == b'LIST' and data[:4] == b'strl' and not length:
      for sub, strh in _chunks(data[4:]):
        if sub == b'strh' and len(strh) >= 36 and strh[:4] == b'vids':
          scale, rate, _, length = struct.unpack('<4I', strh[20:36])
          fps = rate / scale if scale and rate else fps
    elif kind == b'LIST' and data[:4] == b'odml':
      for sub, dmlh in _chunks(data[4:]):
        if sub == b'dmlh' and len(dmlh) >= 4:
          dml = struct.unpack('<I', dmlh[:4])[0]
  frames = max(total, length, dml)  # avih counts the first RIFF of an OpenDML file only.
  return (frames, fps) if frames and fps > 0 else None


def declared(path: str, duration: float | None = None, fps: float | None = None) -> Declared | None:
  """What the container of ``path`` declares: its AVI header, else ffmpeg's ``duration`` (s) x ``fps``; None when
  neither is known."""
  header = avi_header(path)
  if header is not None:
    return Declared(float(header[0]), header[1], AVI_TOLERANCE, 'its AVI header declares')
  if duration and fps and duration > 0 and fps > 0:
    frames = duration * fps
    return Declared(frames, float(fps), max(DURATION_TOLERANCE[0], DURATION_TOLERANCE[1] * frames),
                    f'its duration ({duration:.2f} s at {fps:g} fps) declares')
  return None


def missing_frames(path: str, decoded: int, *, rate: float | None = None, duration: float | None = None,
                   fps: float | None = None) -> str | None:
  """None when ``decoded`` frames are what the container of ``path`` declares (or it declares nothing), else
  how many are missing, e.g. ``'1 of the 50 frames its header declares'``.

  ``rate``: the frame rate the decoder resampled to (ffmpeg ``-r``), None for the file's own; ``duration`` and
  ``fps``: ffmpeg's header values (used for containers other than AVI).
  """
  found = declared(path, duration, fps)
  if found is None:
    return None
  expected = found.frames * (rate / found.fps if rate else 1.0)
  if decoded >= math.floor(expected - found.tolerance + 1e-6):
    return None
  return f'{decoded} of the {int(round(expected))} frames {found.source}'
