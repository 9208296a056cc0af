"""What the raw-data readers share: their errors, the ffmpeg binary, PNG streams.

The readers of each dataset's raw files, as their owners distribute them, are in ``kth.py`` (class
archives / AVI files), ``human.py`` (MP4 videos) and ``bair.py`` (TFRecords, TFDS). Each gives, video
for video, exactly what the official preprocessing script would store, without writing its intermediate
files (``prepare`` turns these videos into the video store). Missing data raises ``RawDataMissingError``
and an unreadable file ``CorruptRawFileError``, both with a one-line message naming the path and the fix.
"""

from __future__ import annotations

import struct

import imageio_ffmpeg

SPLITS = ('train', 'test')

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


class RawDataMissingError(FileNotFoundError):
  """Raw data not found where expected; the message names what is missing and how to get it."""


class CorruptRawFileError(ValueError):
  """A raw file exists but cannot be read; the message names the file."""


def first_line(text: str) -> str:
  """The first non-empty line of ``text`` ('unknown error' when there is none)."""
  lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
  return lines[0] if lines else 'unknown error'


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')


def ffmpeg_exe() -> str:
  """The ffmpeg binary of the imageio-ffmpeg wheel (decodes KTH's AVI and Human3.6M's MP4 files)."""
  return imageio_ffmpeg.get_ffmpeg_exe()


def split_png_stream(data: bytes, source: str) -> list[bytes]:
  """The PNG files of a concatenated PNG stream (ffmpeg ``-f image2pipe -c:v png``)."""
  images, pos = [], 0
  while pos < len(data):
    if data[pos:pos + 8] != _PNG_SIGNATURE:
      raise CorruptRawFileError(f'ffmpeg output for {source} is not a PNG stream at byte {pos}')
    end = pos + 8
    while True:
      if end + 8 > len(data):
        raise CorruptRawFileError(f'ffmpeg output for {source} ends inside a PNG image')
      length, kind = struct.unpack('>I4s', data[end:end + 8])
      end += 12 + length
      if kind == b'IEND':
        break
    images.append(data[pos:end])
    pos = end
  return images
