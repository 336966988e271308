"""Training input from an array_record build vs a TFRecord build of the same
images: images/s per host CPU core at 224.

Writes the JPEGs of `input_pipeline_bench.py` (about 500x375, ~8 labels each
over 11,166 classes) twice, as TFRecords and as array_record, and times, in
alternating rounds, `pipeline.create_input_iterator(mode="pretrain")` with its
defaults on each: the TFRecord path (shard files interleaved and shuffled
through a buffer) against the array_record path (a global permutation per
epoch, records fetched by index from TFDS's data source in chunks); both then
run the same decoding and augmentation. The rate is images per CPU-second of
the process (all threads, the data source's readers included): images/s per
fully used core, as in `input_pipeline_bench.py`, whose dataset and timing
this reuses. Target: array_record >= 0.9x TFRecord.

  python benchmarks/array_record_input_bench.py [--num_images 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow_datasets as tfds  # noqa: E402

from input_pipeline_bench import BenchImages, throughput  # noqa: E402
from mlimages_jax.inputs import pipeline  # noqa: E402

FORMATS = ("tfrecord", "array_record")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_images", type=int, default=1024)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--images_per_round", type=int, default=2048,
                      help="images timed per format and round")
  parser.add_argument("--rounds", type=int, default=3,
                      help="alternating rounds; the best of each is kept")
  parser.add_argument("--data_dir", default=None,
                      help="reuse/keep the generated datasets here")
  args = parser.parse_args()
  cores = len(os.sched_getaffinity(0))
  root = pathlib.Path(args.data_dir or
                      tempfile.mkdtemp(prefix="array_record_bench_"))

  BenchImages.num_images = args.num_images
  for file_format in FORMATS:
    start = time.perf_counter()
    builder = BenchImages(data_dir=root / file_format,
                          file_format=file_format)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=16))
    assert builder.info.splits["train"].num_examples == args.num_images
    print(f"{file_format}: {args.num_images} JPEGs in {root / file_format} "
          f"({time.perf_counter() - start:.0f} s to write)")

  num_batches = max(1, args.images_per_round // args.batch_size)
  best = dict.fromkeys(FORMATS, 0.0)
  for round_index in range(args.rounds):
    for file_format in FORMATS:
      iterator = pipeline.create_input_iterator(
          dataset="bench_images", data_dir=str(root / file_format),
          split="train", global_batch_size=args.batch_size,
          image_size=args.image_size, mode="pretrain", label_mode="multi",
          seed=round_index, process_index=0, process_count=1,
          local_device_count=1)
      per_core, wall = throughput(iterator, args.batch_size, num_batches,
                                  warmup=4)
      best[file_format] = max(best[file_format], per_core)
      print(f"round {round_index}: {file_format:12s} {per_core:7.1f} "
            f"images/s per core (CPU time); {wall:7.1f} images/s wall on "
            f"{cores} cores")

  value, baseline = best["array_record"], best["tfrecord"]
  print(f"array_record {value:.1f} images/s/core vs tfrecord {baseline:.1f} "
        f"({value / baseline:.2f}x), best of {args.rounds} rounds")
  print(json.dumps({
      "benchmark": "array_record_input_pretrain_224",
      "value": round(value, 1),
      "unit": "images/s per host CPU core",
      "baseline": round(baseline, 1),
      "ratio": round(value / baseline, 3),
      "target": 0.9}))


if __name__ == "__main__":
  main()
