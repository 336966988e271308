"""Helpers shared by the tests of the acquisition modules: small real
images, and a downloader config that fails fast against a local server."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mlimages_jax.acquire import download as dl


def make_jpeg(seed: int, size=(40, 30)) -> bytes:
  rng = np.random.default_rng(seed)
  img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8))
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=90)
  return buf.getvalue()


def make_png(seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def fast_config(**kw) -> dl.DownloadConfig:
  base = dict(workers=16, per_host=16, timeout=2.0, retries=2, backoff=0.02,
              max_backoff=0.05, progress=False, seed=0, processes=1)
  base.update(kw)
  return dl.DownloadConfig(**base)
