"""Validation, shrinking and atomic storage of downloaded image bodies.

Runs in worker threads, so an event loop only moves bytes. A file reaches its
final path only by ``os.replace`` of a fully written, fsync'ed temporary file:
it is either absent or complete, even after a SIGKILL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random

from mlimages_jax import decoding


class InvalidImage(ValueError):
  """A response body that is not a usable image; ``reason`` is a short code."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff_format(body: bytes) -> str | None:
  """Image format from magic bytes, or None."""
  for magic, fmt in _MAGIC:
    if body.startswith(magic):
      return fmt
  if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
    return "WEBP"
  return None


def _looks_like_html(body: bytes, content_type: str) -> bool:
  head = body[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
  return ("html" in content_type.lower() or head.startswith(b"<!doctype html")
          or head.startswith(b"<html") or head.startswith(b"<?xml")
          or head.startswith(b"<head") or head.startswith(b"<body"))


def _is_truncated(body: bytes, fmt: str) -> bool:
  """True when the format's end marker is missing (cut-off transfer/file)."""
  tail = body[-4096:]
  if fmt == "JPEG":
    return b"\xff\xd9" not in tail
  if fmt == "PNG":
    return b"IEND" not in tail
  if fmt == "GIF":
    return not body.rstrip(b"\x00").endswith(b"\x3b")
  return False


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
  placeholder_hashes: frozenset[str] = frozenset()
  verify: str = "header"  # "header" | "full"
  max_side: int | None = None
  quality: int = 90


def validate_image(body: bytes, content_type: str,
                   config: ValidationConfig) -> tuple[str, int, int]:
  """Checks a 200 response body; returns (format, width, height).

  Raises InvalidImage with a reason code: empty_body, html_page,
  not_an_image, placeholder_image, undecodable, truncated_image,
  too_many_pixels (the project's decode policy, `decoding`: checked from the
  header before anything is decoded).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if not body:
    raise InvalidImage("empty_body")
  fmt = sniff_format(body)
  if fmt is None:
    if _looks_like_html(body, content_type):
      raise InvalidImage("html_page", content_type)
    raise InvalidImage("not_an_image", repr(body[:16]))
  if config.placeholder_hashes:
    if hashlib.sha256(body).hexdigest() in config.placeholder_hashes:
      raise InvalidImage("placeholder_image")
  try:
    header = decoding.read_header(body)
  except decoding.ImageRejected as e:
    raise InvalidImage(e.kind, e.reason) from None
  width, height = header.width, header.height
  if config.verify == "full":
    try:
      with decoding.BUDGET.reserve(header.pixels), \
          Image.open(io.BytesIO(body)) as img:
        img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        img.load()
    except Exception as e:  # PIL raises many types for broken data.
      raise InvalidImage("undecodable", f"{type(e).__name__}: {e}") from None
  if _is_truncated(body, fmt):
    raise InvalidImage("truncated_image", fmt)
  return fmt, width, height


def shrink(body: bytes, fmt: str, max_side: int, quality: int
           ) -> tuple[bytes, int, int]:
  """Re-encodes an image whose longer side exceeds ``max_side``.

  JPEG stays JPEG (quality ``quality``), PNG stays PNG, everything else
  becomes JPEG. Returns (bytes, width, height).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with decoding.BUDGET.reserve(decoding.read_header(body).pixels), \
      Image.open(io.BytesIO(body)) as img:
    img.draft("RGB", (max_side, max_side))  # Fast DCT scaling for JPEG.
    img = decoding.to_8bit(img)  # 16-bit greyscale: >> 8, not clipped.
    img = img.convert("RGB") if img.mode not in ("RGB", "L") else img
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if fmt == "PNG":
      img.save(out, "PNG", optimize=False)
    else:
      img.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue(), img.size[0], img.size[1]


def write_atomic(path: str, data: bytes, partial_dir: str, *,
                 fsync: bool = True) -> None:
  """Writes ``data`` to ``path`` so that it is either absent or complete."""
  suffix = f"{os.getpid()}.{random.getrandbits(32):08x}"
  tmp = os.path.join(partial_dir, f"{os.path.basename(path)}.{suffix}")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      if fsync:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise


def store_image(body: bytes, content_type: str, path: str, partial_dir: str,
                config: ValidationConfig, *, fsync: bool = True) -> dict:
  """Validate, optionally shrink, write atomically; returns the size fields."""
  fmt, width, height = validate_image(body, content_type, config)
  data, out_w, out_h = body, width, height
  if config.max_side and max(width, height) > config.max_side:
    data, out_w, out_h = shrink(body, fmt, config.max_side, config.quality)
  write_atomic(path, data, partial_dir, fsync=fsync)
  return dict(stored_bytes=len(data), original_bytes=len(body), width=out_w,
              height=out_h, original_width=width, original_height=height)


def describe_existing(path: str) -> dict:
  """Size fields for a file adopted from disk (renamed, not yet journaled)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  size = os.path.getsize(path)
  try:
    with Image.open(path) as img:
      width, height = img.size
  except Exception:  # Unreadable: the caller refetches it.
    return {}
  return dict(stored_bytes=size, original_bytes=size, width=width,
              height=height, original_width=width, original_height=height)
