"""Image validation: every rejection reason, --verify full, placeholders."""

from __future__ import annotations

import hashlib

import pytest

from mlimages_jax.acquire import validation

from acquire_helpers import make_jpeg, make_png


def test_validate_image_reasons():
  cfg = validation.ValidationConfig()
  jpeg = make_jpeg(1)
  assert validation.validate_image(jpeg, "image/jpeg", cfg) == (
      "JPEG", 40, 30)
  assert validation.validate_image(make_png(2), "", cfg) == ("PNG", 8, 8)
  cases = {
      b"": "empty_body",
      b"<!DOCTYPE html><html>gone</html>": "html_page",
      b"\x00\x01garbage": "not_an_image",
      jpeg[:len(jpeg) // 2]: "truncated_image",
      jpeg[:20]: "undecodable",
  }
  for body, reason in cases.items():
    with pytest.raises(validation.InvalidImage) as e:
      validation.validate_image(body, "", cfg)
    assert e.value.reason == reason
  # A corrupt PNG stream passes the header checks; --verify full decodes it.
  png = make_png(3)
  start = png.index(b"IDAT") + 8
  corrupt = png[:start] + bytes(b ^ 0xFF for b in png[start:start + 20]) + (
      png[start + 20:])
  assert validation.validate_image(corrupt, "", cfg) == ("PNG", 8, 8)
  with pytest.raises(validation.InvalidImage, match="undecodable"):
    validation.validate_image(corrupt, "",
                              validation.ValidationConfig(verify="full"))
  placeholder = validation.ValidationConfig(
      placeholder_hashes=frozenset({hashlib.sha256(jpeg).hexdigest()}))
  with pytest.raises(validation.InvalidImage, match="placeholder_image"):
    validation.validate_image(jpeg, "image/jpeg", placeholder)
