"""Tests for mlimages_jax.inputs.client_preprocessing.

Our crops against the oracle (`original_clients`, a transcription of the
original clients' `preprocess` functions) on the original's 4 photos and on
generated images of awkward sizes, modes and formats, for the centre crop and
all 10 crops in order. EXIF orientations 1-8 are checked against the EXIF
specification itself (applied with NumPy to the stored pixels), so a decoder
that ignored or misread the tag fails even though the oracle reads with
OpenCV too. A last test shows that the comparison catches each plausible
mistake.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

import original_clients as oracle
from mlimages_jax import decoding
from mlimages_jax.inputs import client_preprocessing as cp
from mlimages_jax.inputs import preprocessing

# One grey level of the original's [-1, 1] scale. OpenCV does the decoding
# and resizing on both sides, so the pixels agree exactly; what remains is
# float32 (ours, `normalize`) against float64 (the original's scaling),
# ~1e-7.
GREY_LEVEL = 2.0 / 255.0


def _network_input(crops: np.ndarray) -> np.ndarray:
  """Our uint8 crops as the network gets them (the project's normalize)."""
  return np.asarray(preprocessing.normalize(crops), np.float64)


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> dict[str, str]:
  return oracle.awkward_images(tmp_path_factory.mktemp("awkward"))


def test_geometry_of_the_issue_sizes():
  # (height, width) -> resized (height, width) and the centre window. Worked
  # by hand from the original's float expressions, e.g. 1600 / 1067 * 256 =
  # 383.88 -> 383 (rounding would give 384), margin (383 - 224) / 2 = 79.5
  # -> 79.
  assert cp.resized_size(1067, 1600) == (256, 383)
  assert cp.crop_windows(256, 383, False) == [(16, 79)]
  assert cp.resized_size(500, 333) == (384, 256)
  assert cp.crop_windows(384, 256, False) == [(80, 16)]
  assert cp.resized_size(4000, 257) == (3984, 256)
  assert cp.crop_windows(3984, 256, True) == [
      (0, 0), (0, 32), (3760, 0), (3760, 32), (1880, 16)]
  assert cp.resized_size(3, 5) == (256, 426)
  assert cp.resized_size(7, 7) == (256, 256)


def _compare(path: str) -> float:
  """Max |ours - oracle| over both clients' inputs (centre and 10 crops)."""
  original = cv2.imread(path)
  ours_centre = _network_input(cp.load_crops(path))
  ours_ten = _network_input(cp.load_crops(path, ten_crop=True))
  assert ours_centre.shape == (1, 224, 224, 3)
  assert ours_ten.shape == (10, 224, 224, 3)
  return max(
      np.abs(ours_centre[0] - oracle.classification_input(original)).max(),
      np.abs(ours_centre - oracle.feature_input(original, "center")).max(),
      np.abs(ours_ten - oracle.feature_input(original, "10crop")).max())


@pytest.mark.parametrize("name", [
    "1600x1067.jpg", "333x500.png", "257x4000.jpg", "gray.jpg", "cmyk.jpg",
    "alpha.png", "lossless.webp", "tiny_5x3.png", "line_200x1.png",
    "16bit.png"])
def test_generated_images_match_the_oracle(awkward, name):
  difference = _compare(awkward[name])
  print(f"{name}: max |ours - original| = {difference / GREY_LEVEL:.2g} "
        "grey levels")  # The README's figure (pytest -s).
  assert difference <= GREY_LEVEL


def test_real_photos_match_the_oracle(shared_dir):
  for i in range(4):
    difference = _compare(str(shared_dir / "images" / f"im_{i}.jpg"))
    print(f"im_{i}.jpg: max |ours - original| = "
          f"{difference / GREY_LEVEL:.2g} grey levels")
    assert difference <= GREY_LEVEL


# The EXIF specification: how the stored pixels are turned for display.
EXIF_ORIENTATION = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                       # mirrored horizontally
    3: lambda a: a[::-1, ::-1],                    # rotated 180
    4: lambda a: a[::-1],                          # mirrored vertically
    5: lambda a: a.transpose(1, 0, 2),             # transposed
    6: lambda a: np.rot90(a, -1),                  # rotated 90 clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transversed
    8: lambda a: np.rot90(a, 1),                   # rotated 90 anticlockwise
}


def test_exif_table_agrees_with_pillow():
  """The table above against an independent implementation (Pillow's)."""
  stored = oracle.textured(6, 10, 0)
  for orientation, turn in EXIF_ORIENTATION.items():
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    shown = np.asarray(ImageOps.exif_transpose(image))
    np.testing.assert_array_equal(shown, turn(stored), str(orientation))


@pytest.mark.parametrize("suffix,options", [
    (".jpg", {"quality": 95}), (".png", {}), (".webp", {"lossless": True})])
def test_exif_orientations(tmp_path, suffix, options):
  """Each orientation 1-8: the crops of the image as EXIF says to show it."""
  stored = oracle.textured(300, 420, 11)
  for orientation in (range(1, 9) if suffix == ".jpg" else (6, 8)):
    path = str(tmp_path / f"o{orientation}{suffix}")
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif, **options)
    raw = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    shown = np.ascontiguousarray(EXIF_ORIENTATION[orientation](raw))
    ours = _network_input(cp.load_crops(path, ten_crop=True))
    assert ours.shape == (10, 224, 224, 3)
    np.testing.assert_allclose(ours, oracle.feature_input(shown, "10crop"),
                               rtol=0, atol=GREY_LEVEL, err_msg=path)


def test_unusable_images_raise_naming_the_file(tmp_path):
  text = tmp_path / "notes.jpg"
  text.write_text("not an image\n")
  for path in (text, tmp_path / "missing.png", tmp_path):
    with pytest.raises(cp.ImageError, match="not a decodable image") as e:
      cp.load_crops(path)
    assert e.value.path == str(path) and str(path) in str(e.value)
  banner = tmp_path / "banner.png"
  Image.fromarray(oracle.textured(1, 300, 0)).save(banner)
  with pytest.raises(cp.ImageError, match="too elongated .300x1.*76800x256"):
    cp.load_crops(banner)


def test_decode_policy_before_opencv(tmp_path, monkeypatch):
  """A JPEG cut to a third (OpenCV only warns and decodes it half grey) and
  too many pixels (a lowered limit) are refused with the reason; 16-bit PNG
  is read as `>> 8`, as `decoding.to_8bit` does on the other paths."""
  path = tmp_path / "photo.jpg"
  Image.fromarray(oracle.textured(300, 400, 3)).save(path, quality=90)
  data = path.read_bytes()
  cut = tmp_path / "cut.jpg"
  cut.write_bytes(data[:len(data) // 3])
  with pytest.raises(cp.ImageError, match="cut.jpg: truncated JPEG file"):
    cp.load_crops(cut)
  deep = (oracle.textured(230, 250, 4)[..., 0].astype(np.uint16) * 257 + 99)
  Image.fromarray(deep).save(tmp_path / "deep.png")
  Image.fromarray((deep >> 8).astype(np.uint8)).save(tmp_path / "eight.png")
  np.testing.assert_array_equal(cp.load_crops(tmp_path / "deep.png"),
                                cp.load_crops(tmp_path / "eight.png"))
  monkeypatch.setattr(decoding, "MAX_PIXELS", 300 * 400 - 1)
  with pytest.raises(cp.ImageError, match="photo.jpg: too many pixels: "
                     "400x300 = 120,000 > 119,999"):
    cp.load_crops(path)


def _ten_crops(resized: np.ndarray, windows, mirror_by_flip: bool = True
               ) -> np.ndarray:
  """10 RGB crops of a resized BGR image at `windows` (a mutable recipe)."""
  crops = [resized[y:y + 224, x:x + 224] for y, x in windows]
  if mirror_by_flip:
    flipped = resized[:, ::-1]
    crops += [flipped[y:y + 224, x:x + 224] for y, x in windows]
  else:
    crops += [c[:, ::-1] for c in crops]
  return np.stack(crops)[..., ::-1]


def test_the_comparison_catches_each_mistake(awkward, tmp_path):
  """Plausible mistakes all move some pixel by more than one grey level."""
  path = awkward["1600x1067.jpg"]  # Resized to 383 x 256: odd margin.
  image = cv2.imread(path)
  want = oracle.feature_input(image, "10crop")

  def off(crops: np.ndarray) -> float:
    return np.abs(_network_input(crops) - want).max()

  resized = cv2.resize(image, (383, 256))
  windows = cp.crop_windows(256, 383, True)
  assert off(_ten_crops(resized, windows)) <= GREY_LEVEL
  assert off(_ten_crops(resized, windows)[..., ::-1]) > GREY_LEVEL  # BGR
  assert off(_ten_crops(resized, windows[::-1])) > GREY_LEVEL       # order
  assert off(_ten_crops(resized, windows, False)) > GREY_LEVEL      # mirrors
  assert off(_ten_crops(resized, [*windows[:4], (16, 80)])) > GREY_LEVEL
  rounded = cv2.resize(image, (384, 256))                  # round(), not int()
  assert off(_ten_crops(rounded, cp.crop_windows(256, 384, True))) > GREY_LEVEL
  area = cv2.resize(image, (383, 256), interpolation=cv2.INTER_AREA)
  assert off(_ten_crops(area, windows)) > GREY_LEVEL       # another resampler
  # EXIF ignored: an image stored turned, tagged 6.
  turned = tmp_path / "turned.jpg"
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.open(path).save(turned, exif=exif, quality=95)
  raw = cv2.imread(str(turned),
                   cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
  shown = np.ascontiguousarray(EXIF_ORIENTATION[6](raw))
  want = oracle.feature_input(shown, "10crop")
  assert off(cp.load_crops(turned, ten_crop=True)) <= GREY_LEVEL
  assert off(cp.client_crops(raw, ten_crop=True)) > GREY_LEVEL
