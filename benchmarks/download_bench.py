"""Downloader throughput against a far-away image host, next to img2dataset.

A local aiohttp server (its own process) answers every request after an
injected latency (default 200 ms, a realistic far-away host) with one of
>= 3,000 distinct JPEGs of ~100 KB. The same URL list is downloaded in
alternation by
- ours: ``mlimages_jax.acquire.download`` with its default settings and
  validation on (magic bytes, PIL header, end marker, fsync'ed atomic writes,
  journal);
- the baseline: img2dataset (2 processes x 64 threads, no resizing or
  re-encoding, files output), found with ``--img2dataset-bin`` / $IMG2DATASET
  / PATH. If it is not installed, the baseline is the original ML-Images
  approach instead (20 threads with urllib), and the output says so.
Rates are images / second from each tool's own timing (interpreter start-up
excluded for both). Also printed: our rate as a fraction of the concurrency
limit (connections / latency). Ends with one JSON line.

  python benchmarks/download_bench.py                      # ~2 minutes
  python benchmarks/download_bench.py --images 10000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import glob
import io
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request

import numpy as np

from mlimages_jax.acquire import download as dl
from mlimages_jax.acquire import naming


def make_bodies(count: int, target_kb: int, seed: int = 0) -> list[bytes]:
  """``count`` distinct JPEGs of about ``target_kb`` KB.

  A few random-noise JPEGs are encoded once; each served image is one of them
  with a unique JPEG comment segment, so every URL's bytes differ.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  side = int((target_kb * 1024 / 1.6) ** 0.5)  # Noise at q90: ~1.6 B/px.
  bases = []
  for _ in range(8):
    img = Image.fromarray(rng.integers(0, 255, (side, side, 3), np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    bases.append(buf.getvalue())
  bodies = []
  for i in range(count):
    comment = f"mlimages-bench image {i}".encode()
    segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
    base = bases[i % len(bases)]
    bodies.append(base[:2] + segment + base[2:])
  return bodies


class _Host(asyncio.Protocol):
  """A minimal HTTP/1.1 keep-alive responder (GET /<folder>/<i>.jpg).

  Hand-written on asyncio.Protocol so that the simulated host costs far less
  CPU per request than the clients under test: on a 2-core machine an
  aiohttp.web server saturates first and would cap both tools alike.
  """

  def __init__(self, bodies: list[bytes], latency: float):
    self.bodies = bodies
    self.latency = latency
    self.buffer = b""
    self.transport = None

  def connection_made(self, transport):
    self.transport = transport

  def data_received(self, data: bytes):
    self.buffer += data
    loop = asyncio.get_running_loop()
    while b"\r\n\r\n" in self.buffer:
      head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
      path = head.split(b" ", 2)[1].decode()
      try:
        body = self.bodies[int(path.rsplit("/", 1)[1].split(".")[0])]
        status = b"200 OK"
      except (ValueError, IndexError):
        body, status = b"not found", b"404 Not Found"
      header = (b"HTTP/1.1 " + status + b"\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
      loop.call_later(self.latency, self._send, header, body)

  def _send(self, header: bytes, body: bytes):
    if not self.transport.is_closing():
      self.transport.writelines((header, body))


def serve(port_queue, count: int, target_kb: int, latency: float,
          hosts: int) -> None:
  """Server process: GET /<folder>/<i>.jpg -> body i after ``latency`` s.

  Listens on ``hosts`` loopback addresses, like the ~16 Flickr host names
  (farmN / cN.staticflickr.com) that serve ML-Images' URLs.
  """
  bodies = make_bodies(count, target_kb)

  async def main():
    loop = asyncio.get_running_loop()
    addresses = []
    for k in range(hosts):  # 127.0.0.0/8 is all loopback on Linux.
      server = await loop.create_server(lambda: _Host(bodies, latency),
                                        f"127.0.0.{k + 1}", 0, backlog=4096)
      addresses.append(server.sockets[0].getsockname()[:2])
    port_queue.put(addresses)
    await asyncio.Event().wait()

  asyncio.run(main())


def run_ours(url_list: str, out: str) -> tuple[float, int, float]:
  """(images/s over the download loops, images, wall seconds of the call)."""
  start = time.monotonic()
  stats = dl.download(url_list, out, dl.DownloadConfig(progress=False))
  run = stats["last_run"]
  return run["ok"] / run["download_s"], run["ok"], time.monotonic() - start


def run_img2dataset(binary: str, url_list: str, out: str, count: int
                    ) -> tuple[float, int, float]:
  """img2dataset, 2 processes x 64 threads, files, no resize/re-encoding."""
  per_shard = max(1, count // 8)  # Several shards, so both processes work.
  cmd = [binary, "--url_list", url_list, "--input_format", "txt",
         "--output_format", "files", "--output_folder", out,
         "--processes_count", "2", "--thread_count", "64",
         "--resize_mode", "no", "--disable_all_reencoding", "True",
         "--number_sample_per_shard", str(per_shard), "--timeout", "30",
         "--retries", "0", "--enable_wandb", "False",
         "--distributor", "multiprocessing"]
  env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")
  start = time.monotonic()
  subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  starts, ends, ok = [], [], 0
  for path in glob.glob(os.path.join(out, "*_stats.json")):
    with open(path) as f:
      s = json.load(f)
    starts.append(s["start_time"])
    ends.append(s["end_time"])
    ok += s["successes"]
  return ok / (max(ends) - min(starts)), ok, time.monotonic() - start


def run_threads_urllib(url_list: str, out: str, threads: int = 20
                       ) -> tuple[float, int, float]:
  """The original ML-Images approach: a thread pool over urllib."""
  with open(url_list) as f:
    urls = [line.split()[0] for line in f if line.strip()]
  os.makedirs(out, exist_ok=True)

  def fetch(url: str) -> bool:
    try:
      with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read()
    except OSError:
      return False
    with open(os.path.join(out, naming.name_from_url(url)), "wb") as f:
      f.write(body)
    return True

  start = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    ok = sum(pool.map(fetch, urls))
  wall = time.monotonic() - start
  return ok / wall, ok, wall


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=3000)
  parser.add_argument("--kb", type=int, default=100)
  parser.add_argument("--latency", type=float, default=0.2)
  parser.add_argument("--hosts", type=int, default=8,
                      help="distinct host addresses the URLs spread over")
  parser.add_argument("--rounds", type=int, default=3,
                      help="alternating rounds (ours, baseline) per tool")
  parser.add_argument("--img2dataset-bin",
                      default=os.environ.get("IMG2DATASET")
                      or shutil.which("img2dataset"))
  args = parser.parse_args()

  ctx = multiprocessing.get_context("spawn")
  port_queue = ctx.Queue()
  server = ctx.Process(target=serve, daemon=True,
                       args=(port_queue, args.images, args.kb, args.latency,
                             args.hosts))
  server.start()
  addresses = port_queue.get(timeout=120)
  work = tempfile.mkdtemp(prefix="download_bench_")
  try:
    url_list = os.path.join(work, "urls.txt")  # The release format.
    plain_list = os.path.join(work, "plain_urls.txt")  # img2dataset's "txt".
    urls = []
    for i in range(args.images):
      host, port = addresses[i % len(addresses)]
      urls.append(f"http://{host}:{port}/{i % 100}/{i}.jpg")
    with open(url_list, "w") as f:
      f.writelines(f"{u}\t{i % 11166}:1\n" for i, u in enumerate(urls))
    with open(plain_list, "w") as f:
      f.writelines(f"{u}\n" for u in urls)
    baseline_name = ("img2dataset (2 processes x 64 threads)"
                     if args.img2dataset_bin else
                     "original approach: 20 threads + urllib (img2dataset "
                     "not installed)")
    ours, base = [], []
    for r in range(args.rounds):
      rate, ok, wall = run_ours(url_list, os.path.join(work, f"ours{r}"))
      if ok != args.images:
        raise RuntimeError(f"ours fetched {ok} of {args.images} images")
      ours.append(rate)
      print(f"round {r}: ours {rate:8.1f} images/s ({ok} ok, call "
            f"{wall:.1f} s)", flush=True)
      out = os.path.join(work, f"base{r}")
      if args.img2dataset_bin:
        rate, ok, wall = run_img2dataset(args.img2dataset_bin, plain_list,
                                         out, args.images)
      else:
        rate, ok, wall = run_threads_urllib(url_list, out)
      if ok != args.images:
        raise RuntimeError(f"baseline fetched {ok} of {args.images} images")
      base.append(rate)
      print(f"round {r}: base {rate:8.1f} images/s ({ok} ok, call "
            f"{wall:.1f} s) [{baseline_name}]", flush=True)
      shutil.rmtree(os.path.join(work, f"ours{r}"))
      shutil.rmtree(out)
  finally:
    server.terminate()
    shutil.rmtree(work, ignore_errors=True)

  value = statistics.median(ours)
  baseline = statistics.median(base)
  connections = min(dl.DEFAULT_WORKERS, dl.DEFAULT_PER_HOST * args.hosts)
  limit = connections / args.latency
  print(f"ours: {value:.1f} images/s = {value / limit:.1%} of its "
        f"concurrency limit ({connections} connections / "
        f"{args.latency * 1000:.0f} ms = {limit:.0f}/s)")
  if args.img2dataset_bin:
    print(f"img2dataset: {baseline:.1f} images/s = "
          f"{baseline / (128 / args.latency):.1%} of its limit (128 / "
          f"{args.latency * 1000:.0f} ms)")
  print(json.dumps({
      "benchmark": "download_images_per_s_vs_" + (
          "img2dataset" if args.img2dataset_bin else "threads_urllib"),
      "value": round(value, 1), "unit": "images/s",
      "baseline": round(baseline, 1), "ratio": round(value / baseline, 2),
      "target": 1.5}))


if __name__ == "__main__":
  main()
