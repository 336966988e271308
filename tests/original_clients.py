"""Test oracle: the original inference clients' preprocessing, transcribed.

`classification_input` restates `preprocess` of the original's
`image_classification.py` and `feature_input` that of `extract_feature.py`,
step by step as they are written there (float sizes, `cv2.resize` with its
default interpolation, slicing, `cv2.flip`, float64 scaling, BGR -> RGB), on
the image `cv2.imread(path)` returns, as the original reads it. They are
written independently of `mlimages_jax.inputs.client_preprocessing` (which
computes integer windows and flips by slicing) so that the tests comparing
the two catch a wrong size, offset, crop order, channel order or scaling.

`awkward_images` writes the generated test images the issue asks for.
"""

from __future__ import annotations

import pathlib

import cv2
import numpy as np
from PIL import Image

CROP = 224.0


def _resize_shorter_side_256(img: np.ndarray
                             ) -> tuple[np.ndarray, float, float]:
  raw_h, raw_w = float(img.shape[0]), float(img.shape[1])
  new_h, new_w = 256.0, 256.0
  if raw_h <= raw_w:
    new_w = (raw_w / raw_h) * new_h
  else:
    new_h = (raw_h / raw_w) * new_w
  return cv2.resize(img, (int(new_w), int(new_h))), new_h, new_w


def classification_input(img: np.ndarray) -> np.ndarray:
  """float64 RGB [224, 224, 3] in [-1, 1], as image_classification.py feeds."""
  img, new_h, new_w = _resize_shorter_side_256(img)
  top, left = int((new_h - CROP) / 2), int((new_w - CROP) / 2)
  img = img[top:top + int(CROP), left:left + int(CROP)]
  img = ((img / 255.0) - 0.5) * 2.0
  return img[..., ::-1]


def feature_input(img: np.ndarray, kind: str = "center") -> np.ndarray:
  """float64 RGB [1 or 10, 224, 224, 3], as extract_feature.py feeds."""
  img, new_h, new_w = _resize_shorter_side_256(img)
  if kind == "center":
    out = np.zeros((1, 224, 224, 3))
    top, left = int((new_h - 224) / 2), int((new_w - 224) / 2)
    out[0] = img[top:top + 224, left:left + 224]
  elif kind == "10crop":
    out = np.zeros((10, 224, 224, 3))
    starts = [(0, 0), (0, int(new_w - 224)), (int(new_h - 224), 0),
              (int(new_h - 224), int(new_w - 224)),
              (int((new_h - 224) / 2), int((new_w - 224) / 2))]
    for k, (top, left) in enumerate(starts):
      out[k] = img[top:top + 224, left:left + 224]
    img = cv2.flip(img, 1)
    for k, (top, left) in enumerate(starts):
      out[5 + k] = img[top:top + 224, left:left + 224]
  else:
    raise ValueError(kind)
  out = ((out / 255.0) - 0.5) * 2.0
  return out[..., ::-1]


def textured(height: int, width: int, seed: int) -> np.ndarray:
  """uint8 RGB with detail at every scale: a shift by one pixel shows."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3),
                        dtype=np.uint8)
  image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
  noise = rng.integers(-40, 41, (height, width, 3))
  return np.clip(image.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def awkward_images(folder: pathlib.Path) -> dict[str, str]:
  """name -> path of generated images in awkward sizes, modes and formats."""
  folder.mkdir(parents=True, exist_ok=True)
  paths = {}

  def save(name: str, image: Image.Image, **kwargs) -> None:
    paths[name] = str(folder / name)
    image.save(paths[name], **kwargs)

  # Sizes are width x height, as the issue names them.
  save("1600x1067.jpg", Image.fromarray(textured(1067, 1600, 0)), quality=90)
  save("333x500.png", Image.fromarray(textured(500, 333, 1)))
  save("257x4000.jpg", Image.fromarray(textured(4000, 257, 2)), quality=90)
  save("gray.jpg", Image.fromarray(textured(300, 410, 3)[..., 0]))
  save("cmyk.jpg", Image.fromarray(textured(280, 350, 4)).convert("CMYK"),
       quality=92)
  rgba = np.dstack([textured(240, 320, 5), textured(240, 320, 6)[..., 0]])
  save("alpha.png", Image.fromarray(rgba, "RGBA"))
  save("lossless.webp", Image.fromarray(textured(230, 260, 7)), lossless=True)
  save("tiny_5x3.png", Image.fromarray(textured(3, 5, 8)))
  save("line_200x1.png", Image.fromarray(textured(1, 200, 9)))
  deep = (textured(250, 300, 10).astype(np.uint16) * 256
          + textured(250, 300, 11))  # Low bytes that 8-bit decoding drops.
  paths["16bit.png"] = str(folder / "16bit.png")
  cv2.imwrite(paths["16bit.png"], deep[..., ::-1])
  return paths
