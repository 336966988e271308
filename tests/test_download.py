"""Downloader tests against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import collections
import hashlib
import http.server
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
from PIL import Image

from mlimages_jax.acquire import download as dl
from mlimages_jax.acquire import errors
from mlimages_jax.acquire import output_dir
from mlimages_jax.acquire import validation

from acquire_helpers import fast_config, make_jpeg, make_png

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


class Server:
  """A threaded HTTP/1.1 server whose behaviour is chosen per path.

  ``routes[path]`` is a list of responses (status, headers, body, delay_s)
  played in order; the last one repeats. Every request is counted and
  time-stamped per path, so tests can check retries, Retry-After waits and
  that finished images are never requested again.
  """

  def __init__(self, latency: float = 0.0):
    self.routes: dict[str, list[tuple[int, dict, bytes, float]]] = {}
    self.requests: collections.Counter = collections.Counter()
    self.times: dict[str, list[float]] = collections.defaultdict(list)
    self.latency = latency
    self.lock = threading.Lock()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def do_GET(self):  # noqa: N802 (http.server's naming)
        path = urllib.parse.urlsplit(self.path).path
        with server.lock:
          n = server.requests[path]
          server.requests[path] += 1
          server.times[path].append(time.monotonic())
        plays = server.routes.get(path, [(404, {}, b"not found", 0.0)])
        status, headers, body, delay = plays[min(n, len(plays) - 1)]
        time.sleep(delay + server.latency)
        try:
          self.send_response(status)
          for k, v in headers.items():
            self.send_header(k, v)
          self.send_header("Content-Length", str(len(body)))
          self.end_headers()
          self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
          pass

      def log_message(self, *args):
        pass

    class HTTPServer(http.server.ThreadingHTTPServer):
      request_queue_size = 256  # The default 5 drops bursts of connects.

    self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.port = self.httpd.server_address[1]
    self.thread = threading.Thread(target=self.httpd.serve_forever,
                                   daemon=True)
    self.thread.start()

  def url(self, path: str) -> str:
    return f"http://127.0.0.1:{self.port}{path}"

  def image(self, path: str, body: bytes, ctype: str = "image/jpeg") -> str:
    self.routes[path] = [(200, {"Content-Type": ctype}, body, 0.0)]
    return self.url(path)

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  s = Server()
  yield s
  s.close()


def read_im_list(out: pathlib.Path) -> list[tuple[str, str]]:
  lines = (out / "im_list.txt").read_text().splitlines()
  return [tuple(line.split("\t", 1)) for line in lines]


def read_failed(out: pathlib.Path) -> dict[str, tuple[str, int]]:
  rows = (out / "failed.tsv").read_text().splitlines()[1:]
  return {r.split("\t")[0]: (r.split("\t")[1], int(r.split("\t")[2]))
          for r in rows}


def assert_no_partials(out: pathlib.Path):
  assert not list((out / output_dir.PARTIAL_DIR).iterdir())
  assert all(not p.name.startswith(".") for p in (out / "images").iterdir())


def test_retry_after_and_backoff():
  assert dl.parse_retry_after("3") == 3.0
  assert dl.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT",
                              now=1445412470.0) == pytest.approx(10.0)
  assert dl.parse_retry_after("soon") is None
  rng = __import__("random").Random(0)
  delays = [dl.backoff_delay(k, 1.0, 5.0, rng) for k in (1, 2, 3, 4, 5)]
  assert all(0 <= d <= min(5.0, 2 ** (k - 1))
             for k, d in zip((1, 2, 3, 4, 5), delays))


# ----------------------------------------------------------------- runs


def test_download_outcomes_against_local_server(server, tmp_path):
  good = {i: make_jpeg(i) for i in range(4)}
  placeholder_png = make_png(99)
  bad_hash = make_jpeg(77)
  urls = {}
  urls["ok"] = server.image("/img/7/good_0.jpg", good[0])
  urls["404"] = server.url("/gone/7/missing.jpg")
  server.routes["/flaky/7/flaky.jpg"] = [
      (500, {}, b"oops", 0.0), (200, {"Content-Type": "image/jpeg"},
                                good[1], 0.0)]
  urls["500then200"] = server.url("/flaky/7/flaky.jpg")
  server.routes["/limited/7/limited.jpg"] = [
      (429, {"Retry-After": "1"}, b"slow down", 0.0),
      (200, {"Content-Type": "image/jpeg"}, good[2], 0.0)]
  urls["429"] = server.url("/limited/7/limited.jpg")
  server.routes["/stall/7/stall.jpg"] = [
      (200, {"Content-Type": "image/jpeg"}, good[3], 4.0)]
  urls["stall"] = server.url("/stall/7/stall.jpg")
  server.routes["/redir/7/moved.jpg"] = [
      (302, {"Location": "/img/8/target.jpg"}, b"", 0.0)]
  server.image("/img/8/target.jpg", good[3])
  urls["redirect"] = server.url("/redir/7/moved.jpg")
  server.routes["/redir/7/deleted.jpg"] = [
      (302, {"Location": "/photo_unavailable.png"}, b"", 0.0)]
  server.image("/photo_unavailable.png", placeholder_png, "image/png")
  urls["placeholder_redirect"] = server.url("/redir/7/deleted.jpg")
  server.routes["/loop/a.jpg"] = [(302, {"Location": "/loop/a.jpg"}, b"", 0.)]
  urls["loop"] = server.url("/loop/a.jpg")
  urls["placeholder_hash"] = server.image("/img/9/ph.jpg", bad_hash)
  server.routes["/html/7/page.jpg"] = [
      (200, {"Content-Type": "text/html"}, b"<html><body>No</body></html>",
       0.0)]
  urls["html"] = server.url("/html/7/page.jpg")
  urls["truncated"] = server.image("/img/7/cut.jpg",
                                   good[0][:len(good[0]) * 2 // 3])
  urls["escape"] = server.image("/img/..%2F..%2Fescape.jpg", good[2])
  urls["ftp"] = f"ftp://127.0.0.1:{server.port}/img/7/good_0.jpg"
  urls["file"] = "file:///etc/passwd"

  lst = tmp_path / "urls.txt"
  lst.write_text("".join(f"{u}\t{i}:0.9\t5:1\n" for i, u in
                         enumerate(urls.values())))
  out = tmp_path / "out"
  stats = dl.download(str(lst), str(out), fast_config(
      timeout=1.0, processes=2, validation=validation.ValidationConfig(
          placeholder_hashes=frozenset(
              {hashlib.sha256(bad_hash).hexdigest()}))))

  ok = read_im_list(out)
  expected_ok = ["ok", "500then200", "429", "redirect", "escape"]
  keys = list(urls)
  assert [name for name, _ in ok] == [
      "7_good_0.jpg", "7_flaky.jpg", "7_limited.jpg", "7_moved.jpg",
      "img___2F__2Fescape.jpg"]
  assert [ann for _, ann in ok] == [f"{keys.index(k)}:0.9\t5:1"
                                    for k in expected_ok]
  served = {"7_good_0.jpg": good[0], "7_flaky.jpg": good[1],
            "7_limited.jpg": good[2], "7_moved.jpg": good[3],
            "img___2F__2Fescape.jpg": good[2]}
  assert sorted(p.name for p in (out / "images").iterdir()) == sorted(served)
  for name, body in served.items():
    assert (out / "images" / name).read_bytes() == body
  # Nothing was written outside the output folder.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "urls.txt"]
  assert_no_partials(out)

  failed = read_failed(out)
  assert failed == {
      urls["404"]: ("http_404", 1),
      urls["stall"]: ("timeout", 3),
      urls["placeholder_redirect"]: ("placeholder_redirect", 1),
      urls["loop"]: ("too_many_redirects", 1),
      urls["placeholder_hash"]: ("placeholder_image", 1),
      urls["html"]: ("html_page", 1),
      urls["truncated"]: ("truncated_image", 1),
      urls["ftp"]: ("unsupported_scheme", 0),
      urls["file"]: ("unsupported_scheme", 0),
  }
  # Retry behaviour seen from the server.
  assert server.requests["/flaky/7/flaky.jpg"] == 2
  limited = server.times["/limited/7/limited.jpg"]
  assert len(limited) == 2 and limited[1] - limited[0] >= 0.95
  assert server.requests["/stall/7/stall.jpg"] == 3
  assert server.requests["/photo_unavailable.png"] <= 1
  assert stats["last_run"]["retry_reasons"] == {
      "http_429": 1, "http_500": 1, "timeout": 2}

  assert stats["ok"] == 5 and stats["failed"] == 9 and stats["pending"] == 0
  assert stats["failed_by_reason"]["unsupported_scheme"] == 2
  assert stats["bytes"] == sum(len(b) for b in served.values())
  assert json.loads((out / "stats.json").read_text())["ok"] == 5

  # A rerun is a no-op: nothing is requested again.
  before = sum(server.requests.values())
  dl.download(str(lst), str(out), fast_config(timeout=1.0))
  assert sum(server.requests.values()) == before
  assert read_im_list(out) == ok


def test_max_side_reencodes_and_keeps_original_size(server, tmp_path):
  big = make_jpeg(5, size=(400, 100))
  small = make_jpeg(6, size=(50, 40))
  lst = tmp_path / "urls.txt"
  lst.write_text(f"{server.image('/i/a/big.jpg', big)} 1\n"
                 f"{server.image('/i/a/small.jpg', small)} 2\n")
  out = tmp_path / "out"
  stats = dl.download(str(lst), str(out), fast_config(
      validation=validation.ValidationConfig(max_side=64, quality=80)))
  with Image.open(out / "images" / "a_big.jpg") as img:
    assert img.size == (64, 16) and img.format == "JPEG"
  assert (out / "images" / "a_small.jpg").read_bytes() == small
  assert stats["resized"] == 1
  assert stats["resized_original_bytes"] == len(big)
  assert stats["resized_max_original_side"] == 400
  assert stats["original_bytes"] == len(big) + len(small)


def test_shards_download_disjoint_parts(server, tmp_path):
  bodies = [make_jpeg(i) for i in range(10)]
  lst = tmp_path / "urls.txt"
  lst.write_text("".join(f"{server.image(f'/s/f/{i}.jpg', b)}\t{i}\n"
                         for i, b in enumerate(bodies)))
  lists = []
  for i in range(3):
    out = tmp_path / f"shard{i}"
    dl.download(str(lst), str(out), fast_config(shard=(i, 3)))
    lists.append(read_im_list(out))
  merged = [entry for part in lists for entry in part]
  assert merged == [(f"f_{i}.jpg", str(i)) for i in range(10)]
  assert all(v == 1 for v in server.requests.values())
  # A different shard into an existing folder is refused.
  with pytest.raises(errors.AcquireError, match="other arguments"):
    dl.download(str(lst), str(tmp_path / "shard0"), fast_config(shard=(1, 3)))


def test_invalid_lines_error_or_skip(server, tmp_path):
  from mlimages_jax.data import annotations
  lst = tmp_path / "urls.txt"
  good = server.image("/v/f/a.jpg", make_jpeg(0))
  lst.write_text(f"{good} 1:0.5\n{server.url('/v/f/b.jpg')} 3:2.5\n")
  with pytest.raises(annotations.LabelError, match=f"{lst}:2"):
    dl.download(str(lst), str(tmp_path / "o1"), fast_config())
  stats = dl.download(str(lst), str(tmp_path / "o2"),
                      fast_config(skip_invalid=True))
  assert stats["invalid_lines"] == 1 and stats["ok"] == 1
  assert read_im_list(tmp_path / "o2") == [("f_a.jpg", "1:0.5")]


def test_write_error_stops_cleanly_and_resumes(server, tmp_path):
  """A file-size limit (like a full disk) stops the run with a clear error;
  the journal stays intact and the same command finishes the job later."""
  small = [make_jpeg(i) for i in range(6)]
  big = make_jpeg(50, size=(400, 300))
  assert len(big) > 60_000 > max(len(b) for b in small)
  lines = [f"{server.image(f'/w/f/s{i}.jpg', b)}\t{i}:1\n"
           for i, b in enumerate(small[:3])]
  lines.append(f"{server.image('/w/f/big.jpg', big)}\t3:1\n")
  lines += [f"{server.image(f'/w/f/s{i}.jpg', b)}\t{i}:1\n"
            for i, b in enumerate(small[3:], start=3)]
  lst = tmp_path / "urls.txt"
  lst.write_text("".join(lines))
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "mlimages_jax", "download", str(lst), "--out",
         str(out), "--workers", "1", "--processes", "1", "--no-progress"]
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))

  def limit_file_size():
    import resource
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death.
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

  result = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          preexec_fn=limit_file_size)
  assert result.returncode == 1
  assert "stopped on a write error" in result.stderr
  assert "rerun the same command to resume" in result.stderr
  assert sorted(os.listdir(out / "images")) == ["f_s0.jpg", "f_s1.jpg",
                                                "f_s2.jpg"]
  assert_no_partials(out)
  result = subprocess.run(cmd, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert [n for n, _ in read_im_list(out)] == [
      "f_s0.jpg", "f_s1.jpg", "f_s2.jpg", "f_big.jpg", "f_s3.jpg",
      "f_s4.jpg", "f_s5.jpg"]
  assert (out / "images" / "f_big.jpg").read_bytes() == big
  assert all(server.requests[f"/w/f/s{i}.jpg"] == 1 for i in range(3))


def test_a_rerun_fetches_again_what_was_deleted(server, tmp_path):
  """The journal agrees with the disk: im_list.txt never names a missing
  file; a deleted image is fetched again (or reported failed)."""
  bodies = [make_jpeg(i) for i in range(3)]
  lst = tmp_path / "urls.txt"
  lst.write_text("".join(f"{server.image(f'/d/f/{i}.jpg', b)}\t{i}\n"
                         for i, b in enumerate(bodies)))
  out = tmp_path / "out"
  dl.download(str(lst), str(out), fast_config())
  for i in (0, 2):
    (out / "images" / f"f_{i}.jpg").unlink()
  server.routes["/d/f/2.jpg"] = [(404, {}, b"gone", 0.0)]
  stats = dl.download(str(lst), str(out), fast_config())
  assert read_im_list(out) == [("f_0.jpg", "0"), ("f_1.jpg", "1")]
  assert (out / "images" / "f_0.jpg").read_bytes() == bodies[0]
  assert read_failed(out) == {server.url("/d/f/2.jpg"): ("http_404", 1)}
  assert (stats["ok"], stats["failed"]) == (2, 1)
  assert stats["last_run"]["missing_on_disk"] == 2
  assert dict(server.requests) == {"/d/f/0.jpg": 2, "/d/f/1.jpg": 1,
                                   "/d/f/2.jpg": 2}


def test_a_rerun_keeps_what_dedup_did(server, tmp_path):
  """dedup --drop --in-place, then the same download again: the duplicate
  stays dropped (even once its file is deleted) and the merged labels
  stay."""
  from mlimages_jax.acquire import dedup  # pylint: disable=g-import-not-at-top
  same = make_jpeg(1)
  lst = tmp_path / "urls.txt"
  lst.write_text(f"{server.image('/u/f/a.jpg', same)}\t1:0.5\n"
                 f"{server.image('/u/f/b.jpg', make_jpeg(2))}\t2:1\n"
                 f"{server.image('/u/f/c.jpg', same)}\t1:1 3:1\n")
  out = tmp_path / "out"
  dl.download(str(lst), str(out), fast_config())
  dedup.drop_duplicates(dedup.find_duplicates([out], progress=False),
                        in_place=True)
  deduplicated = (out / "im_list.txt").read_text()
  assert deduplicated == "f_a.jpg\t1:1\t3:1\nf_b.jpg\t2:1\n"
  (out / "images" / "f_c.jpg").unlink()  # Redundant: the user frees space.
  stats = dl.download(str(lst), str(out), fast_config())
  assert (out / "im_list.txt").read_text() == deduplicated
  assert stats["dropped_as_duplicates"] == 1
  assert set(server.requests.values()) == {1}


def test_the_url_list_is_never_an_output(server, tmp_path):
  """A list saved where the run writes (im_list.txt, images/): refused."""
  out = tmp_path / "out"
  (out / "images").mkdir(parents=True)
  text = f"{server.image('/l/f/a.jpg', make_jpeg(1))}\t1\n"
  for where in ("im_list.txt", "images/urls.txt"):
    (out / where).write_text(text)
    with pytest.raises(ValueError, match=f"--out {where.split('/')[0]} "):
      dl.download(str(out / where), str(out), fast_config())
    assert (out / where).read_text() == text
  assert not server.requests
  (out / "urls.txt").write_text(text)  # Beside what the run writes: fine.
  dl.download(str(out / "urls.txt"), str(out), fast_config())
  assert read_im_list(out) == [("f_a.jpg", "1")]


def test_real_tiny_list_names(server, tmp_path, shared_dir):
  """The shipped 100-URL list, served locally under the same paths."""
  src = (shared_dir / "train_urls_tiny.txt").read_text().splitlines()
  local_lines, folder_names = [], []
  for i, line in enumerate(src):
    url, annotations = line.split("\t", 1)
    path = urllib.parse.urlsplit(url).path
    local_lines.append(f"{server.image(path, make_jpeg(i, (16, 12)))}\t"
                       f"{annotations}\n")
    folder_names.append(path.split("/")[-2] + "_" + path.split("/")[-1])
  lst = tmp_path / "train_urls_tiny_local.txt"
  lst.write_text("".join(local_lines))

  shipped = dict(line.split("\t", 1) for line in
                 (shared_dir / "train_im_list_tiny.txt").read_text()
                 .splitlines())
  out = tmp_path / "file_rule"
  stats = dl.download(str(lst), str(out), fast_config(name_rule="file"))
  assert stats["ok"] == 100
  got = read_im_list(out)
  # Same names and annotations (byte for byte) as the original's output.
  assert dict(got) == shipped
  assert [n for n, _ in got] == [urllib.parse.urlsplit(l.split("\t")[0])
                                 .path.rsplit("/", 1)[1] for l in src]
  out = tmp_path / "default_rule"
  dl.download(str(lst), str(out), fast_config())
  assert [n for n, _ in read_im_list(out)] == folder_names


# --------------------------------------------------------------- SIGKILL


def test_sigkill_then_resume(tmp_path):
  latency_server = Server(latency=0.03)
  try:
    n = 240
    bodies = {f"/k/{i % 7}/img{i}.jpg": make_jpeg(1000 + i) for i in range(n)}
    for path, body in bodies.items():
      latency_server.image(path, body)
    lst = tmp_path / "urls.txt"
    lst.write_text("".join(f"{latency_server.url(p)}\t{i}:1\n"
                           for i, p in enumerate(bodies)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mlimages_jax", "download", str(lst),
           "--out", str(out), "--workers", "8", "--processes", "2",
           "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    images = out / "images"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
      if images.is_dir() and len(os.listdir(images)) >= n // 3:
        break
      time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = set(os.listdir(images))
    assert n // 3 <= len(done_at_kill) < n, "kill did not land mid-run"
    by_name = {f"{p.split('/')[2]}_{p.split('/')[3]}": p for p in bodies}
    for name in done_at_kill:  # No partial file is visible.
      assert (images / name).read_bytes() == bodies[by_name[name]]
    requests_at_kill = sum(latency_server.requests.values())

    result = subprocess.run(cmd, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(images)) == sorted(by_name)
    for name, path in by_name.items():
      assert (images / name).read_bytes() == bodies[path]
    for name in done_at_kill:  # Finished before the kill: fetched once.
      assert latency_server.requests[by_name[name]] == 1
    # Only the few in flight at the kill may have been requested twice.
    assert sum(latency_server.requests.values()) <= n + 8
    assert sum(latency_server.requests.values()) - requests_at_kill <= (
        n - len(done_at_kill) + 8)
    assert read_im_list(out) == [(f"{p.split('/')[2]}_{p.split('/')[3]}",
                                  f"{i}:1") for i, p in enumerate(bodies)]
    assert_no_partials(out)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["ok"] == n and stats["pending"] == 0
  finally:
    latency_server.close()


def test_placeholder_hash_files_with_bom_crlf_and_bad_bytes(tmp_path):
  digest = hashlib.sha256(b"x").hexdigest()
  path = tmp_path / "hashes.txt"
  path.write_bytes(b"\xef\xbb\xbf" + digest.encode() + b"  # grey\r\n")
  assert dl.load_placeholder_hashes([str(path)], []) == frozenset({digest})
  path.write_bytes(digest.encode() + b"\n# caf\xe9\n")
  with pytest.raises(errors.AcquireError,
                     match=rf"^{path}:2: not UTF-8: byte 0xe9"):
    dl.load_placeholder_hashes([str(path)], [])
