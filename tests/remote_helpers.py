"""A non-local filesystem for the remote-storage tests: TF's ``ram://``.

epath sends URIs to tf.io.gfile, whose GCS and S3 filesystems need the
network; its in-process RAM filesystem (``ram://``) is a real non-local
filesystem (no os/pathlib/open works on it) that the same calls reach.
epath only routes the URI schemes it lists (gs, s3, az, hf), so
`route_ram_through_epath` adds ``ram`` to those tables (TensorFlow's
backend, like ``gs://``). Two quirks of TF's RAM filesystem are corrected
(`_RamBackend`), where GCS and S3 behave as a filesystem should: opening an
existing file for writing appends to it instead of replacing it, and a path
"exists" when it is a mere prefix of another (``f.npy`` of
``f.npy.partial/``). What
``ram://`` cannot show: Orbax writes arrays
through TensorStore, which knows gs:// and local files but not TF's RAM
filesystem; `gcs_emulator` serves a real ``gs://`` on 127.0.0.1 for that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
from typing import Iterator
import uuid

import pytest
from etils.epath import backend
from etils.epath import gpath
from etils.epath import register


class _RamBackend(backend._TfBackend):  # pylint: disable=protected-access
  """tf.io.gfile on ram://, with the semantics of GCS (see above)."""

  def exists(self, path) -> bool:
    parent, name = os.fspath(path).rstrip("/").rsplit("/", 1)
    return (super().exists(path)
            and name in [c.rstrip("/") for c in self.listdir(parent)])

  def isdir(self, path) -> bool:
    return self.exists(path) and super().isdir(path)

  def open(self, path, mode):
    if "w" in mode and self.exists(path):
      self.remove(path)
    return super().open(path, mode)


_RAM_BACKEND = _RamBackend()


class _RamPath(gpath.PosixGPath):
  """``ram://`` paths (epath picks tf.io.gfile for every URI; this one gets
  the corrected backend)."""

  @property
  def _backend(self) -> backend.Backend:
    return _RAM_BACKEND


def route_ram_through_epath(monkeypatch: pytest.MonkeyPatch) -> str:
  """Makes ``epath.Path("ram://...")`` work; returns a fresh ram:// root."""
  monkeypatch.setattr(gpath, "_URI_PREFIXES",
                      gpath._URI_PREFIXES + ("ram://",))
  monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"ram"})
  monkeypatch.setitem(gpath._URI_MAP_ROOT, "ram://", "/ram/")
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "ram://", _RamPath)
  return f"ram://test-{uuid.uuid4().hex[:12]}"


# A GCS emulator on 127.0.0.1 that every layer reaches: Orbax's arrays
# (TensorStore) and everything epath, TFDS and TensorBoard write (tf.io.gfile).
#
# TensorStore takes its GCS endpoint from TENSORSTORE_GCS_HTTP_URL, and
# google-cloud-storage (Orbax's bucket look-up) from STORAGE_EMULATOR_HOST. TF's GCS
# filesystem has no endpoint setting: it calls https://www.googleapis.com and
# https://storage.googleapis.com (hard-coded in TF 2.21), through libcurl, which
# honours https_proxy and TF's CURL_CA_BUNDLE. `_EmulatorProxy` is that proxy:
# it answers CONNECT, speaks TLS with a certificate made here for those two
# names, and passes the plain HTTP on to the emulator; the emulator's resumable
# upload URLs are http://www.googleapis.com/..., which come back through it as
# proxied HTTP. Both clients authenticate with GOOGLE_AUTH_TOKEN_FOR_TESTING.

GCS_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
GCS_BUCKET = "bucket"


def _self_signed_certificate(directory: str) -> tuple[str, str]:
  """A certificate and key for `GCS_HOSTS`, as files (the cert is its CA)."""
  # pylint: disable=g-import-not-at-top
  import datetime
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID
  key = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GCS_HOSTS[0])])
  now = datetime.datetime.now(datetime.timezone.utc)
  cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.SubjectAlternativeName(
              [x509.DNSName(h) for h in GCS_HOSTS]), critical=False)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                         critical=True)
          .sign(key, hashes.SHA256()))
  cert_path = os.path.join(directory, "gcs-cert.pem")
  key_path = os.path.join(directory, "gcs-key.pem")
  with open(cert_path, "wb") as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM))
  with open(key_path, "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
  return cert_path, key_path


def _pump(source: socket.socket, sink: socket.socket) -> None:
  """Copies bytes until `source` ends, then shuts both sockets down.

  Shut down, not closed: closing here freed the descriptor while the other
  direction's TLS write was still under way, and OpenSSL, which keeps the
  descriptor's number, sent its record into the next connection that got
  that number (the emulator saw TLS bytes before a request, under load).
  The caller closes both once both directions have ended.
  """
  try:
    while data := source.recv(1 << 16):
      sink.sendall(data)
  except OSError:
    pass
  finally:
    for s in (source, sink):
      with contextlib.suppress(OSError):
        socket.socket.shutdown(s, socket.SHUT_RDWR)  # Not SSLSocket's.


class _EmulatorProxy:
  """An HTTP(S) proxy on 127.0.0.1 that sends GCS's hosts to the emulator."""

  def __init__(self, emulator_port: int, cert_path: str, key_path: str):
    self._emulator = ("127.0.0.1", emulator_port)
    self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self._tls.load_cert_chain(cert_path, key_path)
    self._listener = socket.create_server(("127.0.0.1", 0))
    self.port = self._listener.getsockname()[1]
    threading.Thread(target=self._serve, daemon=True).start()

  def close(self) -> None:
    self._listener.close()

  def _serve(self) -> None:
    with contextlib.suppress(OSError):  # The listener was closed.
      while True:
        client, _ = self._listener.accept()
        threading.Thread(target=self._connect, args=(client,),
                         daemon=True).start()

  def _connect(self, client: socket.socket) -> None:
    head = b""
    while b"\r\n\r\n" not in head:
      chunk = client.recv(4096)
      if not chunk:
        client.close()
        return
      head += chunk
    upstream = socket.create_connection(self._emulator)
    if head.startswith(b"CONNECT "):
      client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
      client = self._tls.wrap_socket(client, server_side=True)
    else:  # A proxied http://host/path request: the emulator wants /path.
      line, rest = head.split(b"\r\n", 1)
      method, uri, version = line.split(b" ")
      path = b"/" + uri.split(b"://", 1)[1].split(b"/", 1)[1]
      upstream.sendall(b" ".join((method, path, version)) + b"\r\n" + rest)
    reverse = threading.Thread(target=_pump, args=(upstream, client),
                               daemon=True)
    reverse.start()
    _pump(client, upstream)
    reverse.join()
    client.close()
    upstream.close()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def gcs_emulator(directory: str) -> Iterator[dict[str, str]]:
  """Serves an in-memory GCS with bucket `GCS_BUCKET` on 127.0.0.1; yields
  the environment variables that send TensorStore and tf.io.gfile there.

  Skips the calling test when gcp-storage-emulator is not installed.
  """
  server_lib = pytest.importorskip(
      "gcp_storage_emulator.server",
      reason="the GCS tests need gcp-storage-emulator (the [test] extra)")
  # Two fixes to the emulator's reading of a request body. It reads an empty
  # upload as None and fails on it (TF writes empty directory markers). And
  # it reads Content-Length bytes where curl, through the proxy, also says
  # Transfer-Encoding: chunked, which wins (RFC 9112 6.3): it stored the
  # chunk framing, not the content.
  read_data = server_lib._read_data  # pylint: disable=protected-access
  read_raw_data = server_lib._read_raw_data  # pylint: disable=protected-access

  def _read_data(handler, query):
    data = read_data(handler, query)
    return b"" if data is None and "uploadType" in query else data

  def _read_raw_data(handler):
    if (handler.headers.get("Transfer-Encoding") or "").lower() == "chunked":
      del handler.headers["Content-Length"]
    return read_raw_data(handler)

  def _storage_layout(request, response, unused_storage):
    response.json({"kind": "storage#storageLayout",
                   "bucket": request.params["bucket_name"],
                   "hierarchicalNamespace": {"enabled": False}})

  # TF 2.21 asks for a bucket's storage layout before renaming a directory
  # (a flat bucket: copy and delete each object); the emulator lacks it.
  layout_route = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/storageLayout$",
                  {"GET": _storage_layout})
  handlers = server_lib.HANDLERS
  server_lib.HANDLERS = (layout_route, *handlers)
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
  port = _free_port()
  server = server_lib.create_server("127.0.0.1", port, in_memory=True,
                                    default_bucket=GCS_BUCKET)
  cert_path, key_path = _self_signed_certificate(directory)
  server_lib._read_data = _read_data  # pylint: disable=protected-access
  server_lib._read_raw_data = _read_raw_data  # pylint: disable=protected-access
  server.start()
  proxy = _EmulatorProxy(port, cert_path, key_path)
  try:
    yield {
        "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{port}",
        # google-cloud-storage, which Orbax asks whether a bucket has
        # hierarchical namespace before listing its steps.
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "NO_GCE_CHECK": "true",
        "https_proxy": f"http://127.0.0.1:{proxy.port}",
        "http_proxy": f"http://127.0.0.1:{proxy.port}",
        "no_proxy": "127.0.0.1,localhost",
        "CURL_CA_BUNDLE": cert_path,
    }
  finally:
    proxy.close()
    server.stop()
    server_lib._read_data = read_data  # pylint: disable=protected-access
    server_lib._read_raw_data = read_raw_data  # pylint: disable=protected-access
    server_lib.HANDLERS = handlers
