"""Open Images tags -> ML-Images annotation lines (step 1 of §3).

Open Images labels images with its own label ids (``/m/...``); a mapping file
gives each id's ML-Images class. `remap_openimages_file` turns the Open
Images tag lists (our line format, or the image-level CSV) into annotation
lines, dropping and counting the ids the mapping does not know.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Iterator

import numpy as np

from mlimages_jax import fileio
from mlimages_jax.fileio import PathLike, atomic_writer
from mlimages_jax.data.annotation_reader import compressed_writer
from mlimages_jax.data.annotation_reader import open_binary
from mlimages_jax.data.annotations import LabelError
from mlimages_jax.data.annotations import MAX_EXAMPLES
from mlimages_jax.data.annotations import WHITESPACE
from mlimages_jax.data.annotations import format_line
from mlimages_jax.data.annotations import reduce_max


def load_openimages_mapping(path: PathLike, num_classes: int
                            ) -> dict[str, int]:
  """Reads ``<Open Images label id> <ML-Images index>`` lines (TAB or spaces).

  Several Open Images ids may map to one class (merged synonyms); one id
  mapping to two classes is an error. ``#`` lines are comments, and a first
  line whose second column is not a number is a header.
  """
  source = str(path)
  mapping: dict[str, int] = {}
  first_line: dict[str, int] = {}
  with fileio.open_text(path, LabelError) as f:
    for lineno, line in enumerate(f, start=1):
      fields = line.split()
      if not fields or fields[0].startswith("#"):
        continue
      if len(fields) < 2:
        raise LabelError(source, lineno, "expected an Open Images label id "
                         f"and an ML-Images index, got {line.strip()!r}")
      try:
        index = int(fields[1])
      except ValueError:
        if not mapping and lineno == 1:
          continue  # Header.
        raise LabelError(source, lineno, f"ML-Images index {fields[1]!r} is "
                         "not an integer") from None
      if not 0 <= index < num_classes:
        raise LabelError(source, lineno, f"ML-Images index {index} out of "
                         f"range 0..{num_classes - 1}")
      label = fields[0]
      if label in mapping and mapping[label] != index:
        raise LabelError(source, lineno, f"{label} maps to {index} here but to "
                         f"{mapping[label]} on line {first_line[label]}")
      mapping[label] = index
      first_line.setdefault(label, lineno)
  return mapping


@dataclasses.dataclass
class RemapSummary:
  """What `remap_openimages_file` kept and dropped."""

  rows_in: int = 0
  rows_out: int = 0
  rows_empty: int = 0  # Rows left without any mapped tag.
  tags_in: int = 0
  tags_kept: int = 0
  tags_dropped: int = 0
  invalid: int = 0
  unmapped: dict[str, int] = dataclasses.field(default_factory=dict)
  invalid_examples: list[str] = dataclasses.field(default_factory=list)


def remap_openimages_file(input_path: PathLike, output_path: PathLike,
                          mapping: dict[str, int], *,
                          keep_empty: bool = False,
                          skip_invalid: bool = False,
                          progress: Callable[[int], None] | None = None
                          ) -> RemapSummary:
  """Open Images tags -> ML-Images annotation lines (step 1 of §3).

  Input: either lines ``key label_id[:confidence] ...`` (TABs or spaces), or
  the Open Images image-level CSV (``ImageID,Source,LabelName,Confidence``,
  rows grouped by image), recognised by its header. Tags outside `mapping`
  are dropped and counted per label id; rows left without tags are dropped
  unless `keep_empty`. Output is written atomically.
  """
  summary = RemapSummary()
  source = str(input_path)

  def invalid(error: LabelError) -> None:
    if not skip_invalid:
      raise error
    summary.invalid += 1
    if len(summary.invalid_examples) < MAX_EXAMPLES:
      summary.invalid_examples.append(str(error))

  with atomic_writer(output_path, "wb") as raw, compressed_writer(
      raw, output_path) as out:
    stream, file = open_binary(input_path)
    with stream, file:
      text = fileio.decode_lines(stream, source, LabelError)
      for lineno, (key, tags) in enumerate(_openimages_rows(text, source,
                                                            invalid)):
        summary.rows_in += 1
        idx, conf = [], []
        for label, c in tags:
          summary.tags_in += 1
          index = mapping.get(label)
          if index is None:
            summary.tags_dropped += 1
            summary.unmapped[label] = summary.unmapped.get(label, 0) + 1
            continue
          idx.append(index)
          conf.append(c)
        summary.tags_kept += len(idx)
        if not idx:
          summary.rows_empty += 1
          if not keep_empty:
            continue
        _, idx_a, conf_a = reduce_max(
            np.zeros(len(idx), np.int64), np.array(idx, np.int32),
            np.array(conf, np.float32), 1, max(idx, default=0) + 1)
        out.write((format_line(key, idx_a, conf_a) + "\n").encode())
        summary.rows_out += 1
        if progress is not None and lineno % 4096 == 0:
          progress(file.tell())
  return summary


def _openimages_rows(text: Iterator[str], source: str,
                     invalid: Callable[[LabelError], None]
                     ) -> Iterator[tuple[str, list[tuple[str, float]]]]:
  """(key, [(label id, confidence)]) from either input format."""
  lines = enumerate(text, start=1)
  first = next(lines, None)
  if first is None:
    return
  header = [c.strip() for c in first[1].split(",")]
  if header[:1] == ["ImageID"] and "LabelName" in header:
    yield from _openimages_csv_rows(lines, header, source, invalid)
    return
  for lineno, line in itertools.chain([first], lines):
    tokens = WHITESPACE.split(line.strip(" \t\r\n\v\f"))
    if not tokens[0]:
      continue
    tags = []
    try:
      for token in tokens[1:]:
        label, colon, conf_s = token.rpartition(":")
        if not colon:
          label, conf_s = conf_s, "1"
        conf = _confidence(conf_s, token, source, lineno)
        tags.append((label, conf))
    except LabelError as e:
      invalid(e)
      continue
    yield tokens[0], tags


def _confidence(text: str, token: str, source: str, lineno: int) -> float:
  try:
    conf = float(text)
  except ValueError:
    raise LabelError(source, lineno, f"bad tag {token!r}: expected "
                     "label_id or label_id:confidence") from None
  if not -1.0 <= conf <= 1.0:
    raise LabelError(source, lineno, f"confidence {text!r} outside [-1, 1]")
  return conf


def _openimages_csv_rows(lines, header: list[str], source: str,
                         invalid: Callable[[LabelError], None]
                         ) -> Iterator[tuple[str, list[tuple[str, float]]]]:
  image_col, label_col = header.index("ImageID"), header.index("LabelName")
  conf_col = header.index("Confidence") if "Confidence" in header else None
  key, tags = None, []
  for lineno, line in lines:
    fields = [c.strip() for c in line.rstrip("\r\n").split(",")]
    if fields == [""]:
      continue
    try:
      if len(fields) != len(header):
        raise LabelError(source, lineno, f"expected {len(header)} CSV "
                         f"columns, got {len(fields)}")
      conf = (1.0 if conf_col is None else
              _confidence(fields[conf_col], line.strip(), source, lineno))
    except LabelError as e:
      invalid(e)
      continue
    if fields[image_col] != key:
      if key is not None:
        yield key, tags
      key, tags = fields[image_col], []
    tags.append((fields[label_col], conf))
  if key is not None:
    yield key, tags
