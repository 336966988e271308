"""One policy for every path that decodes a user's image.

The dataset build, the downloader, dedup and the inference clients (OpenCV
or tf.data) all decode files they did not make. Before any of them decodes:

- the header is read (PIL reads the size without decoding) and an image of
  more than `MAX_PIXELS` pixels is refused: a 2.6 MB PNG can declare
  30000x30000 pixels, 2.7 GB of RGB;
- the file is checked whole: a JPEG's entropy-coded stream is read to its end
  (at 1/8 scale, cheap), other formats are verified (PNG: every chunk and its
  CRC) or decoded. A truncated or corrupt file is refused with its reason
  instead of being decoded half grey (libjpeg only warns);
- decoders running in threads share a `PixelBudget`, so several workers at
  the limit never hold more than a bounded number of pixels at once.

16-bit images become 8-bit by dropping the low byte (`>> 8`), as OpenCV's
`imread` and TensorFlow's `decode_png` do; PIL's own conversion would clip
`I;16` to 255 (almost white).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import threading
import warnings
from typing import Iterator, Union

import numpy as np
from PIL import Image

# PIL's own DecompressionBombError threshold (twice its MAX_IMAGE_PIXELS):
# 179 million pixels, 0.5 GB as 8-bit RGB, e.g. 16384x10922.
MAX_PIXELS = 178_956_970
# Pixels that the threads of one process may decode at once: two images at
# the limit (~1 GB of RGB); smaller images share it.
PIXEL_BUDGET = 2 * MAX_PIXELS

# The limit above replaces PIL's warning (one per image between 89 and 179
# million pixels, which this module accepts or refuses itself).
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

Source = Union[bytes, str, os.PathLike]


class ImageRejected(ValueError):
  """An image the policy refuses; `reason` is one short line, `kind` one of
  `KINDS` (for tools that count rejections by code)."""

  KINDS = ("too_many_pixels", "undecodable", "truncated", "corrupt")

  def __init__(self, kind: str, reason: str):
    super().__init__(reason)
    self.kind = kind
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class ImageHeader:
  format: str
  width: int
  height: int
  mode: str

  @property
  def pixels(self) -> int:
    return self.width * self.height


def _open(source: Source) -> Image.Image:
  return Image.open(io.BytesIO(source) if isinstance(source, bytes)
                    else os.fspath(source))


def read_header(source: Source, max_pixels: int | None = None
                ) -> ImageHeader:
  """Format, size and mode from the header; refuses more than `max_pixels`
  (default `MAX_PIXELS`, read at each call). Nothing is decoded: safe on any
  file.
  """
  max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
  try:
    with _open(source) as image:
      header = ImageHeader(image.format or "?", *image.size, image.mode)
  except Image.DecompressionBombError as e:
    raise ImageRejected("too_many_pixels", f"too many pixels: {e}") from None
  except Image.UnidentifiedImageError:
    raise ImageRejected("undecodable", "not a decodable image") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise ImageRejected("undecodable", "not a decodable image "
                        f"({type(e).__name__}: {e})") from None
  if header.width <= 0 or header.height <= 0:
    raise ImageRejected("undecodable",
                        f"empty image ({header.width}x{header.height})")
  if header.pixels > max_pixels:
    raise ImageRejected(
        "too_many_pixels", f"too many pixels: {header.width}x{header.height} = "
        f"{header.pixels:,} > {max_pixels:,} (a decompression bomb?)")
  return header


def check_image(source: Source, max_pixels: int | None = None
                ) -> ImageHeader:
  """`read_header`, then reads the whole file: ImageRejected if truncated
  or corrupt. Decodes at most `max_pixels` (JPEG: at 1/8 scale), within
  `BUDGET`."""
  header = read_header(source, max_pixels)
  try:
    with _open(source) as image:
      if header.format == "JPEG":
        image.draft(image.mode, (max(1, header.width // 8),
                                 max(1, header.height // 8)))
        image.load()
      elif header.format == "PNG":
        image.verify()  # Every chunk's CRC, IEND included; no pixels.
      else:
        with BUDGET.reserve(header.pixels):
          image.load()
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    reason = str(e) or type(e).__name__
    kind = "truncated" if "runcated" in reason else "corrupt"
    raise ImageRejected(kind, f"{kind} {header.format} file ({reason})"
                        ) from None
  return header


def to_8bit(image: Image.Image) -> Image.Image:
  """16-bit greyscale (`I;16*`, `I`) as 8-bit `L` by `>> 8`; others as is."""
  if image.mode != "I" and not image.mode.startswith("I;16"):
    return image
  values = np.clip(np.asarray(image, np.int64), 0, 65535) >> 8
  return Image.fromarray(values.astype(np.uint8), "L")


class PixelBudget:
  """Bounds the pixels decoded at once by the threads of a process.

  A thread reserves an image's pixels before decoding it and waits while the
  others hold too many; one image alone always proceeds, so an image up to
  the pixel limit never waits forever.
  """

  def __init__(self, pixels: int = PIXEL_BUDGET):
    self.pixels = pixels
    self.in_use = 0
    self.waiting = 0  # Threads blocked in `reserve`.
    self._free = threading.Condition()

  @contextlib.contextmanager
  def reserve(self, pixels: int) -> Iterator[None]:
    with self._free:
      self.waiting += 1
      self._free.wait_for(
          lambda: self.in_use == 0 or self.in_use + pixels <= self.pixels)
      self.waiting -= 1
      self.in_use += pixels
    try:
      yield
    finally:
      with self._free:
        self.in_use -= pixels
        self._free.notify_all()


# The one budget of this process, shared by every decoding thread.
BUDGET = PixelBudget()
