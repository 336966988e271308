"""The original inference clients' preprocessing (ML_IMAGES.md §9), exactly.

The original's `image_classification.py` and `extract_feature.py` read an
image with `cv2.imread` (8-bit BGR; EXIF orientation applied, also for PNG and
WebP; alpha dropped; grey replicated; 16-bit reduced to 8), resize it with
`cv2.resize` (bilinear) so that the shorter side is 256 and the longer one is
`int()` of the float `long / short * 256`, and cut 224 crops at
`int((new - 224) / 2)`. Feature extraction may cut 10: the 4 corners and the
centre, then the same 5 windows of the horizontally flipped image (so with an
odd margin the mirrored centre window is one pixel off the centre one's
mirror). The network gets RGB in [-1, 1].

This module calls OpenCV itself for decoding and resizing: that is what makes
the pixels those of the original (other JPEG decoders, EXIF handling and
bilinear resamplers differ by grey levels). Crops are returned as uint8 RGB;
`preprocessing.normalize` maps them to the original's [-1, 1] values within
one float32 rounding.

Before OpenCV decodes anything, the project's decode policy (`decoding`)
reads the header and the whole file: too many pixels, a truncated or a
corrupt file give an ImageError with the reason, and the decoding threads
share the process's pixel budget.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from mlimages_jax import decoding

RESIZE_SIDE = 256
CROP_SIZE = 224
# The original resizes whatever it gets; a 1 x 20,000 banner would need a
# 5,120,000 x 256 intermediate (4 GB). Beyond an aspect ratio of 256:1 we
# refuse the image instead (a deliberate difference, documented in README).
MAX_RESIZED_SIDE = 256 * RESIZE_SIDE


class ImageError(ValueError):
  """An image the clients' preprocessing cannot use; names the file."""

  def __init__(self, path: str | os.PathLike[str], reason: str):
    super().__init__(f"{os.fspath(path)}: {reason}")
    self.path = os.fspath(path)
    self.reason = reason


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
  """uint8 BGR [H, W, 3] exactly as the original's `cv2.imread(path)`.

  Only files that pass `decoding.check_image` reach OpenCV (ImageError with
  the policy's reason otherwise), within `decoding.BUDGET`.
  """
  try:
    header = decoding.check_image(path)
  except decoding.ImageRejected as e:
    raise ImageError(path, e.reason) from None
  with decoding.BUDGET.reserve(header.pixels):
    image = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)
  if image is None:
    raise ImageError(path, "not a decodable image")
  return image


def resized_size(height: int, width: int) -> tuple[int, int]:
  """(height, width) after the shorter side goes to 256, as the original.

  The float expression and its order (`long / short * 256`, truncated) are
  the original's: rounding instead would differ by a pixel for e.g. 1600x1067.
  """
  if height <= width:
    return RESIZE_SIDE, int(width / height * RESIZE_SIDE)
  return int(height / width * RESIZE_SIDE), RESIZE_SIDE


def crop_windows(height: int, width: int, ten_crop: bool
                 ) -> list[tuple[int, int]]:
  """(top, left) of the crops in a resized image: centre, or 4 corners + centre.

  `(new - 224) // 2` equals the original's `int((new_float - 224) / 2)`,
  since flooring the size first never changes the floor of the half margin.
  """
  dy, dx = height - CROP_SIZE, width - CROP_SIZE
  centre = (dy // 2, dx // 2)
  if not ten_crop:
    return [centre]
  return [(0, 0), (0, dx), (dy, 0), (dy, dx), centre]


def client_crops(image: np.ndarray, *, ten_crop: bool = False,
                 source: str | os.PathLike[str] = "<array>") -> np.ndarray:
  """uint8 RGB [1 or 10, 224, 224, 3] of a BGR image, in the original's order.

  Raises ImageError (naming `source`) for images more elongated than 256:1.
  """
  height, width = resized_size(*image.shape[:2])
  if max(height, width) > MAX_RESIZED_SIDE:
    raise ImageError(
        source, f"too elongated ({image.shape[1]}x{image.shape[0]}): resizing "
        f"the shorter side to {RESIZE_SIDE} would give {width}x{height}, more "
        f"than {MAX_RESIZED_SIDE} pixels on a side")
  resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
  views = [resized, resized[:, ::-1]] if ten_crop else [resized]
  windows = crop_windows(height, width, ten_crop)
  crops = np.stack([view[y:y + CROP_SIZE, x:x + CROP_SIZE]
                    for view in views for y, x in windows])
  return np.ascontiguousarray(crops[..., ::-1])


def load_crops(path: str | os.PathLike[str], *, ten_crop: bool = False
               ) -> np.ndarray:
  """`client_crops` of the file at `path` (ImageError if it cannot be used)."""
  try:
    return client_crops(read_image(path), ten_crop=ten_crop, source=path)
  except cv2.error as e:  # E.g. out of memory inside OpenCV.
    raise ImageError(path, f"OpenCV failed: {e.msg}") from e
