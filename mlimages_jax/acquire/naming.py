"""Output file names of list items: the naming rules and the collision table.

A name is a single safe path component derived from the item's key, whatever
the URL contains. Collisions are resolved over the whole list, so every shard
of a sharded run assigns the same names and shard outputs never collide.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import os
import re
import urllib.parse
from typing import Callable

import numpy as np

from mlimages_jax.acquire import image_list

_MAX_NAME_BYTES = 200


def sanitize_component(text: str) -> str:
  """A path component safe on every file system: no separators, no ``..``."""
  text = re.sub(r"[^A-Za-z0-9._+-]", "_", text)
  text = re.sub(r"\.{2,}", "_", text).lstrip(".")
  return text


def _truncate_name(name: str) -> str:
  if len(name.encode()) <= _MAX_NAME_BYTES:
    return name
  stem, ext = os.path.splitext(name)
  digest = hashlib.sha1(name.encode()).hexdigest()[:10]
  keep = _MAX_NAME_BYTES - len(ext) - len(digest) - 1
  return f"{stem[:keep]}-{digest}{ext}"


def name_from_url(url: str) -> str:
  """The original downloader's rule, ``<last URL folder>_<URL file name>``.

  Sanitised: the result is a single safe path component (no ``/``, ``\\``,
  ``..``, leading dot or NUL) whatever the URL contains; a URL without a
  folder uses its host name as the folder.
  """
  parts = urllib.parse.urlsplit(url)
  segments = parts.path.split("/")
  file_name = sanitize_component(segments[-1]) or "image"
  folders = [s for s in segments[:-1] if s]
  folder = sanitize_component(folders[-1] if folders else parts.hostname or "")
  return _truncate_name(f"{folder}_{file_name}" if folder else file_name)


def name_from_file_name(key: str) -> str:
  """Only the URL's (or ID's) last path component, sanitised.

  What the shipped ``train_im_list_tiny.txt`` actually contains for Flickr
  URLs, and the natural name for ImageNet IDs (``<wnid>_<n>.JPEG``).
  """
  last = urllib.parse.urlsplit(key).path.rsplit("/", 1)[-1]
  return _truncate_name(sanitize_component(last) or "image")


NAME_RULES: dict[str, Callable[[str], str]] = {
    "folder_file": name_from_url,
    "file": name_from_file_name,
}


def _name_hash(name: str) -> int:
  digest = hashlib.blake2b(name.casefold().encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little", signed=True)


@dataclasses.dataclass(frozen=True)
class NameTable:
  """Output names of list lines: ``rule(key)`` unless renamed on collision."""
  rule: Callable[[str], str]
  overrides: dict[int, str]

  def name(self, item: image_list.ListItem) -> str:
    return self.overrides.get(item.lineno) or self.rule(item.key)


def build_name_table(reader: image_list.ListReader, rule: Callable[[str], str]
                     ) -> NameTable:
  """Resolves name collisions over the whole list, deterministically.

  Built from the full list (all shards), so every shard of a sharded
  download assigns the same names and shard outputs never collide.
  Collisions are found case-insensitively (case-folding file systems). The
  first occurrence keeps its name; the k-th later one becomes
  ``<stem>_<k><ext>`` (the first such k whose name is free). The first pass
  keeps one 8-byte hash per line; only colliding lines are looked at again.
  """
  linenos, hashes = array.array("q"), array.array("q")
  for item in reader:
    linenos.append(item.lineno)
    hashes.append(_name_hash(rule(item.key)))
  uniq, counts = np.unique(np.frombuffer(hashes, dtype=np.int64),
                           return_counts=True)
  dup = set(uniq[counts > 1].tolist())
  if not dup:
    return NameTable(rule, {})
  taken = set(uniq.tolist())
  dup_lines = {n for n, h in zip(linenos, hashes) if h in dup}
  del linenos, hashes
  overrides: dict[int, str] = {}
  seen: dict[str, int] = {}
  for item in reader:
    if item.lineno not in dup_lines:
      continue
    name = rule(item.key)
    occurrence = seen.get(name.casefold(), 0)
    seen[name.casefold()] = occurrence + 1
    if occurrence == 0:
      continue
    stem, ext = os.path.splitext(name)
    k = occurrence
    while _name_hash(_truncate_name(f"{stem}_{k}{ext}")) in taken:
      k += 1
    candidate = _truncate_name(f"{stem}_{k}{ext}")
    taken.add(_name_hash(candidate))
    overrides[item.lineno] = candidate
  return NameTable(rule, overrides)

