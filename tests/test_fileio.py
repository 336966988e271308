"""Tests for mlimages_jax.fileio: results appear complete or not at all."""

from __future__ import annotations

import http.server
import os
import pathlib
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from mlimages_jax import fileio


def test_atomic_writer_replaces_only_on_success(tmp_path):
  target = tmp_path / "sub" / "out.txt"
  with fileio.atomic_writer(target) as f:
    f.write("first\n")
    assert not target.exists()  # Invisible until the writer closes.
  assert target.read_text() == "first\n"

  with pytest.raises(RuntimeError):
    with fileio.atomic_writer(target) as f:
      f.write("half-written")
      raise RuntimeError("killed")
  assert target.read_text() == "first\n"
  assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_writer_binary_mode(tmp_path):
  target = tmp_path / "out.bin"
  with fileio.atomic_writer(target, "wb") as f:
    f.write(b"\x00\xff")
  assert target.read_bytes() == b"\x00\xff"


def test_atomic_writer_on_an_object_store_commits_only_on_success(
    monkeypatch):
  """Remote: one upload after the body succeeded; a failure writes nothing
  (no temporary object either), the previous content stays."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from remote_helpers import route_ram_through_epath  # pylint: disable=g-import-not-at-top
  root = route_ram_through_epath(monkeypatch)
  target = f"{root}/sub/out.txt"
  assert fileio.is_remote(target) and not fileio.is_remote("/tmp/x")
  with fileio.atomic_writer(target, encoding="utf-8") as f:
    f.write("first\n")
    assert not epath.Path(target).exists()  # Not committed yet.
  assert epath.Path(target).read_text() == "first\n"
  with pytest.raises(RuntimeError):
    with fileio.atomic_writer(target) as f:
      f.write("half-written")
      raise RuntimeError("killed")
  assert epath.Path(target).read_text() == "first\n"
  assert [p.name for p in epath.Path(f"{root}/sub").iterdir()] == ["out.txt"]
  with fileio.atomic_writer(f"{root}/out.bin", "wb") as f:
    f.write(b"\x00\xff")
  assert epath.Path(f"{root}/out.bin").read_bytes() == b"\x00\xff"


@pytest.mark.parametrize("remote", [False, True])
def test_append_text(tmp_path, monkeypatch, remote):
  from remote_helpers import route_ram_through_epath  # pylint: disable=g-import-not-at-top
  root = route_ram_through_epath(monkeypatch) if remote else str(tmp_path)
  path = fileio.as_path(f"{root}/log.jsonl")
  fileio.append_text(path, "a\n")
  fileio.append_text(path, "b\n")
  assert path.read_text() == "a\nb\n"


def test_atomic_directory_keeps_the_existing_one_unless_overwrite(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "MARK").write_text("x")
  with pytest.raises(FileExistsError, match="--overwrite"):
    with fileio.atomic_directory(out, marker="MARK"):
      pass
  with pytest.raises(RuntimeError):
    with fileio.atomic_directory(out, marker="MARK", overwrite=True) as tmp:
      (tmp / "new").write_text("y")
      raise RuntimeError("export failed half-way")
  assert sorted(p.name for p in out.iterdir()) == ["MARK"]
  with fileio.atomic_directory(out, marker="MARK", overwrite=True) as tmp:
    (tmp / "MARK").write_text("y")
  assert (out / "MARK").read_text() == "y"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_open_text_bom_crlf_and_bad_bytes(tmp_path):
  path = tmp_path / "t.txt"
  path.write_bytes(b"\xef\xbb\xbfkey\tx\r\nsecond\n\xef\xbb\xbfthird")
  with fileio.open_text(path) as lines:
    assert list(lines) == ["key\tx\n", "second\n", "\ufeffthird"]
  path.write_bytes(b"ok\nbad \xc3\x28 here\n")
  with pytest.raises(fileio.TextInputError, match=rf"^{path}:2: not UTF-8: "
                     r"byte 0xc3 at column 5 \(b'bad \\xc3\( here\\n'\)$"):
    with fileio.open_text(path) as lines:
      list(lines)

  class Own(ValueError):
    def __init__(self, source, lineno, message):
      super().__init__(f"own {source}:{lineno}: {message}")

  with pytest.raises(Own, match=rf"^own {path}:2: not UTF-8"):
    with fileio.open_text(path, Own) as lines:
      list(lines)


class _Handler(http.server.BaseHTTPRequestHandler):
  """/trickle: 100 bytes, one per 20 ms; /big: 5000 bytes, no length."""

  def do_GET(self):  # pylint: disable=invalid-name
    self.send_response(200)
    if self.path == "/trickle":
      self.send_header("Content-Length", "100")
    self.end_headers()
    try:
      if self.path == "/trickle":
        for _ in range(100):
          self.wfile.write(b"x")
          self.wfile.flush()
          time.sleep(0.02)
      else:
        self.wfile.write(b"y" * 5000)
    except OSError:  # The client gave up.
      pass

  def log_message(self, *args):
    pass


def test_read_url_has_a_total_deadline_and_a_size_cap():
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  base = f"http://127.0.0.1:{server.server_address[1]}"
  try:
    with pytest.raises(fileio.RemoteReadError,
                       match=r"/trickle: not complete after 0.3 s"):
      fileio.read_url(f"{base}/trickle", deadline=0.3)
    with pytest.raises(fileio.RemoteReadError,
                       match=r"/big: more than the 4,096 bytes allowed"):
      fileio.read_url(f"{base}/big", max_bytes=4096)
    assert fileio.read_url(f"{base}/big") == b"y" * 5000
  finally:
    server.shutdown()
    server.server_close()
def test_overwrite_replaces_only_a_directory_the_command_wrote(tmp_path):
  """A run, a dataset, a home: no marker, so --overwrite refuses them."""
  run = tmp_path / "run"
  run.mkdir()
  (run / "checkpoint").write_text("precious")
  with pytest.raises(FileExistsError, match="not written by this command"):
    with fileio.atomic_directory(run, marker="MARK", overwrite=True) as tmp:
      (tmp / "MARK").write_text("y")
  assert [p.name for p in run.iterdir()] == ["checkpoint"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_results_get_the_users_umask(tmp_path, umask):
  """Not mkstemp's 0600 nor mkdtemp's 0700: what open() and mkdir() give."""
  old = os.umask(umask)
  try:
    with fileio.atomic_writer(tmp_path / "out.txt") as f:
      f.write("x")
    with fileio.atomic_directory(tmp_path / "dir", marker="m") as tmp:
      (tmp / "m").write_text("")
  finally:
    os.umask(old)
  assert _mode(tmp_path / "out.txt") == 0o666 & ~umask
  assert _mode(tmp_path / "dir") == 0o777 & ~umask


def test_a_rewrite_keeps_the_files_mode(tmp_path):
  """An in-place rewrite (labels augment IN IN) keeps e.g. 0644 or 0640."""
  target = tmp_path / "list.txt"
  for mode in (0o644, 0o640):
    target.write_text("old")
    target.chmod(mode)
    with fileio.atomic_writer(target) as f:
      f.write("new")
    assert (_mode(target), target.read_text()) == (mode, "new")


def _mode(path: pathlib.Path) -> int:
  return stat.S_IMODE(path.stat().st_mode)


def test_the_next_write_removes_a_killed_writers_temporary(tmp_path):
  """Only our own temporaries of this output, of processes no longer alive."""
  target = tmp_path / "out.txt"
  killed = subprocess.Popen(
      [sys.executable, "-c", "import os, sys\n"
       "from mlimages_jax import fileio\n"
       "with fileio.atomic_writer(sys.argv[1]) as f:\n"
       "  f.write('x' * 100000); f.flush(); os.kill(os.getpid(), 9)",
       str(target)])
  assert killed.wait() == -9
  [left] = [p.name for p in tmp_path.iterdir()]
  assert left.startswith(f".out.txt.{killed.pid}.") and left.endswith(".tmp")
  keep = [tmp_path / f".out.txt.{os.getpid()}.abc_12.tmp",  # A live writer.
          tmp_path / ".out.txt.bak", tmp_path / ".out.txt.1.tmp",
          tmp_path / f".other.txt.{killed.pid}.abc.tmp"]
  for path in keep:
    path.write_text("keep")
  with fileio.atomic_writer(target) as f:
    f.write("done")
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      [p.name for p in keep] + ["out.txt"])


@pytest.mark.parametrize("out, how", [
    ("run", "is"), ("run/export", "is inside"), (".", "contains"),
    ("link/export", "is inside")])
def test_an_output_may_not_overlap_an_input(tmp_path, monkeypatch, out, how):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "run").mkdir()
  (tmp_path / "link").symlink_to(tmp_path / "run")
  with pytest.raises(fileio.OverlapError) as e:
    fileio.check_disjoint({"--checkpoint": "run", "--list": None},
                          {"--out": out})
  assert str(e.value) == (f"--out {out} {how} the input --checkpoint run: "
                          "refusing to write over an input")


def test_disjoint_paths_and_in_place_rewrites_pass(tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "list.txt").write_text("a\n")
  fileio.check_disjoint({"--checkpoint": tmp_path / "run"},
                        {"--out": tmp_path / "run2", "--x": None})
  fileio.check_disjoint({"INPUT": tmp_path / "list.txt"},
                        {"OUTPUT": tmp_path / "list.txt"}, in_place=True)
  with pytest.raises(fileio.OverlapError, match="contains the input"):
    fileio.check_disjoint({"INPUT": tmp_path / "list.txt"},
                          {"OUTPUT": tmp_path}, in_place=True)


def test_exclusive_use_names_the_holder_and_ends_with_it(tmp_path):
  """A live holder (another process) refuses a second user, by pid and host;
  once it is killed, even by SIGKILL, the folder is free: nothing stale."""
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time\nfrom mlimages_jax import fileio\n"
       "with fileio.exclusive_use(sys.argv[1], 'workdir'):\n"
       "  print('held', flush=True)\n  time.sleep(600)\n", str(tmp_path)],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(fileio.FolderInUseError,
                       match=rf"^--out {tmp_path} is in use by another run "
                             rf"\(process {holder.pid} on {socket.gethostname()}"
                             r"\): wait for it to end or stop it first$"):
      with fileio.exclusive_use(tmp_path, "--out"):
        pass
  finally:
    holder.kill()
    holder.wait()
  with fileio.exclusive_use(tmp_path, "--out"):
    assert (tmp_path / fileio.LOCK_FILE).read_text() == (
        f"process {os.getpid()} on {socket.gethostname()}\n")
