"""How fast `tfds build` turns local JPEGs into ml_images records.

Writes a manual directory of photo-sized JPEGs (default 2,000 train + 100
validation, 500x375), then, in the same run:
- baseline: merely reading every image file's bytes (the floor any builder
  pays), in images/s;
- value: building the `openimages` config from it (parse + augment labels,
  fully decode each JPEG to validate it, write shuffled records), examples/s;
and prints the on-disk bytes per example next to the source JPEG size, plus
the time to build the `synthetic` config (the README demo's dataset).

  python benchmarks/tfds_build_bench.py [--num_images=2000] [--beam]
      [--file_format=array_record]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import numpy as np
from PIL import Image
import tensorflow as tf  # noqa: F401  (imported up front, not in the timing)
import tensorflow_datasets as tfds

from mlimages_jax.data import synthetic
from mlimages_jax.datasets.ml_images import create_dummy_data as dummy
from mlimages_jax.datasets.ml_images import ml_images_dataset_builder as mib

# On 2 cores: 1M images in under 1.5 h on one machine; the 17.6M of the full
# dataset then take a day there, or an hour on ~25 such Beam workers.
TARGET_EXAMPLES_PER_S = 200.0


def _photo_jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
  """A photo-like JPEG: smooth colour fields plus sensor-like noise."""
  width, height = size
  coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC),
                      np.float32)
  noisy = smooth + rng.normal(0, 12, (height, width, 3))
  image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
  return dummy.jpeg_bytes(image, quality=90)


def make_manual_dir(root: pathlib.Path, num_images: int,
                    size: tuple[int, int], seed: int = 0) -> list[pathlib.Path]:
  rng = np.random.default_rng(seed)
  hierarchy = dummy.dummy_hierarchy()
  dummy.write_manual_root(root, hierarchy)
  files = []
  for split, count in (("train", num_images),
                       ("validation", max(1, num_images // 20))):
    images = [(f"{split}_{i:07d}.jpg", _photo_jpeg(rng, size))
              for i in range(count)]
    dummy.write_split(root / "openimages" / split, images,
                      [dummy.random_labels(rng, hierarchy.num_classes)
                       for _ in images])
    files += [root / "openimages" / split / "images" / name
              for name, _ in images]
  return files


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_images", type=int, default=2000)
  parser.add_argument("--width", type=int, default=500)
  parser.add_argument("--height", type=int, default=375)
  parser.add_argument("--file_format", default="tfrecord",
                      choices=["tfrecord", "array_record"])
  parser.add_argument("--beam", action="store_true",
                      help="build on Beam's DirectRunner (2 processes)")
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    t0 = time.perf_counter()
    files = make_manual_dir(tmp / "manual", args.num_images,
                            (args.width, args.height))
    print(f"wrote {len(files)} JPEGs in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    source_bytes = sum(len(path.read_bytes()) for path in files)
    read_rate = len(files) / (time.perf_counter() - t0)

    download_config = tfds.download.DownloadConfig(manual_dir=str(
        tmp / "manual"))
    if args.beam:
      import apache_beam as beam
      download_config.beam_options = beam.options.pipeline_options.\
          PipelineOptions(["--runner=DirectRunner", "--direct_num_workers=2",
                           "--direct_running_mode=multi_processing"])
    builder = mib.Builder(config="openimages", data_dir=str(tmp / "data"),
                          file_format=args.file_format)
    t0 = time.perf_counter()
    builder.download_and_prepare(download_config=download_config)
    build_s = time.perf_counter() - t0
    build_rate = len(files) / build_s
    num_examples = builder.info.splits.total_num_examples
    disk_bytes = sum(s.num_bytes for s in builder.info.splits.values())

    t0 = time.perf_counter()
    mib.Builder(config="synthetic", data_dir=str(tmp / "data")
                ).download_and_prepare()
    synthetic_s = time.perf_counter() - t0

  sizes = synthetic.DEFAULT_SPLIT_SIZES
  print(f"read bytes only : {read_rate:10.1f} images/s")
  print(f"tfds build      : {build_rate:10.1f} examples/s "
        f"({num_examples} examples in {build_s:.1f} s, "
        f"{'beam' if args.beam else 'local'}, {args.file_format})")
  print(f"on disk         : {disk_bytes / num_examples:10.0f} bytes/example "
        f"(source JPEG {source_bytes / len(files):.0f} bytes/image)")
  print(f"synthetic build : {synthetic_s:10.1f} s "
        f"({sizes['train']} + {sizes['validation']} images)")
  print(json.dumps({
      "benchmark": "tfds_build", "value": round(build_rate, 1),
      "unit": "examples/s", "baseline": round(read_rate, 1),
      "ratio": round(build_rate / read_rate, 4),
      "target": TARGET_EXAMPLES_PER_S}))


if __name__ == "__main__":
  main()
