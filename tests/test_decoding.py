"""Tests for mlimages_jax.decoding: the one decode policy for user images.

Bombs are PNG headers that declare a huge size (`conftest.bomb_png_header`):
only ever read through the policy, which must refuse them before decoding.
"""

from __future__ import annotations

import io
import threading
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import bomb_png_header
from mlimages_jax import decoding


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, fmt)
  return buffer.getvalue()


def test_too_many_pixels_are_refused_from_the_header(tmp_path):
  bomb = tmp_path / "bomb.png"
  bomb.write_bytes(bomb_png_header(30000, 30000))
  for source in (bomb, bomb.read_bytes()):
    with pytest.raises(decoding.ImageRejected,
                       match="too many pixels.*900,?000,?000") as e:
      decoding.check_image(source)
    assert e.value.kind == "too_many_pixels"
  with pytest.raises(decoding.ImageRejected, match="too many pixels: "
                     "300x200 = 60,000 > 59,999"):
    decoding.read_header(bomb_png_header(300, 200), max_pixels=59_999)
  assert decoding.read_header(bomb_png_header(300, 200)) == (
      decoding.ImageHeader("PNG", 300, 200, "RGB"))


def test_truncated_and_corrupt_files_are_refused():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
  jpeg, png = _encode(pixels, "JPEG"), _encode(pixels, "PNG")
  assert decoding.check_image(jpeg) == decoding.ImageHeader(
      "JPEG", 80, 64, "RGB")
  assert decoding.check_image(png).format == "PNG"
  for data, fmt in ((jpeg, "JPEG"), (png, "PNG")):
    with pytest.raises(decoding.ImageRejected,
                       match=f"^truncated {fmt} file") as e:
      decoding.check_image(data[:len(data) // 3])
    assert e.value.kind == "truncated"
  start = png.index(b"IDAT") + 8
  flipped = png[:start] + bytes(b ^ 0xFF for b in png[start:start + 20]) + (
      png[start + 20:])
  with pytest.raises(decoding.ImageRejected, match="^corrupt PNG file"):
    decoding.check_image(flipped)
  with pytest.raises(decoding.ImageRejected, match="^not a decodable image$"):
    decoding.check_image(b"plain text")


def test_16_bit_greyscale_is_scaled_as_opencv_reads_it(tmp_path):
  deep = np.array([[0, 255, 256, 32896, 40000, 65280, 65535]], np.uint16)
  path = str(tmp_path / "deep.png")
  Image.fromarray(deep).save(path)
  with Image.open(path) as image:
    assert image.mode == "I;16"
    scaled = np.asarray(decoding.to_8bit(image))
  np.testing.assert_array_equal(scaled, [[0, 0, 1, 128, 156, 255, 255]])
  np.testing.assert_array_equal(scaled, cv2.imread(path)[..., 0])
  rgb = Image.fromarray(np.zeros((2, 2, 3), np.uint8))
  assert decoding.to_8bit(rgb) is rgb


def _wait_for(condition) -> None:
  for _ in range(10_000):
    if condition():
      return
    time.sleep(0.001)
  raise AssertionError("condition never became true")


def test_pixel_budget_bounds_concurrent_decodes():
  budget = decoding.PixelBudget(100)
  entered = threading.Event()

  def second() -> None:
    with budget.reserve(50):
      entered.set()

  with budget.reserve(60):
    thread = threading.Thread(target=second)
    thread.start()
    _wait_for(lambda: budget.waiting == 1)
    assert not entered.is_set() and budget.in_use == 60
  thread.join()
  assert entered.is_set() and budget.in_use == 0
  with budget.reserve(250):  # Alone, an image above the budget proceeds.
    assert budget.in_use == 250

  peak, lock = [], threading.Lock()

  def worker(pixels: int) -> None:
    with budget.reserve(pixels):
      with lock:
        peak.append(budget.in_use)
      time.sleep(0.001)

  threads = [threading.Thread(target=worker, args=(p,))
             for p in np.random.default_rng(0).integers(10, 100, 40).tolist()]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(peak) == 40 and max(peak) <= 100 and budget.in_use == 0
