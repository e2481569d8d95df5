"""A Cloud Storage emulator on loopback that TensorFlow's `gs://` reaches.

TensorFlow's GCS file system (and with it tf.data, etils `epath` and orbax,
which go through `tf.io.gfile` for `gs://` when TensorFlow is installed) has
its endpoints hard-coded to `https://www.googleapis.com/storage/v1/` and
`https://storage.googleapis.com/`; no setting points it elsewhere. It talks
through libcurl, though, which honours `HTTPS_PROXY` and `CURL_CA_BUNDLE`. So:

  * `gcp-storage-emulator` (PyPI, pure Python, the GCS JSON API) serves an
    in-memory store on 127.0.0.1;
  * a small CONNECT proxy on 127.0.0.1 accepts the tunnels curl opens to
    the Google hosts, ends TLS with a throwaway CA made here (`cryptography`),
    and relays the plain HTTP to the emulator, whatever host was asked for;
  * the environment `gcs_emulator()` yields sends curl to that proxy with
    that CA, and gives TF a fixed bearer token
    (`GOOGLE_AUTH_TOKEN_FOR_TESTING`) so it never looks for credentials or
    the metadata server.

Nothing listens beyond loopback and nothing leaves the machine: every host
curl asks for lands on the emulator. Everything is stopped on exit.

When TF reads the environment (checked with TF 2.21): the GCS_* settings
(retries, caches) when TensorFlow is imported (its GCS file system is made
then), the token at the first request, and curl reads the proxy and CA at
each request. So run code that touches `gs://` in a subprocess started with
`gcs.env` (as tests/gcs_emulator_test.py does), or apply the settings before
TensorFlow is imported. Applied later in a process that already imported
TF (`gcs.patch_environ(monkeypatch)`), `gs://` works too but with TF's
default retries: a failing request then retries for minutes.

TF's GCS client also caches: `exists`/`stat` answers for
GCS_STAT_CACHE_MAX_AGE (5 s by default), so a folder just emptied may still
"exist" for a few seconds, as with real GCS. The emulator ignores
`ifGenerationMatch` preconditions (tensorstore uses them for orbax's OCDBT
manifests), so concurrent writers are not checked.

To emulate a real bucket (benchmarks), `gcs_emulator(latency_s=0.03,
bandwidth=100e6)` makes the proxy wait `latency_s` before forwarding each
HTTP request and send each reply no faster than `bandwidth` bytes/s per
connection. `gcs.stats` counts the requests the proxy forwarded and the
bytes of their replies (`requests_for` filters them by object name).

Usage:

    with gcs_emulator() as gcs:
      gcs.upload_tree(local_records, "records")   # Seed the bucket.
      subprocess.run([..., gcs.url("records"), gcs.url("workdir")],
                     env=gcs.env, check=True)
      assert gcs.object_names("workdir/")          # What TF wrote.
"""

import contextlib
import dataclasses
import datetime
import functools
import http.client
import http.server
import json
import logging
import os
import pathlib
import re
import socketserver
import ssl
import tempfile
import threading
import time
import urllib.parse
import warnings

import pytest

# Hosts TF's GCS client uses; the certificate names both.
GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
BUCKET = "ctx-test-bucket"
_LOOPBACK = "127.0.0.1"
_IDLE_TIMEOUT_S = 60


# Proxy variables that would send curl elsewhere or exempt the Google hosts,
# and credentials that TF or google-cloud-storage would try before ours.
_UNSET = ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
          "all_proxy", "GOOGLE_APPLICATION_CREDENTIALS")


class ProxyStats:
  """Requests the proxy forwarded: (method, path, Range header, reply bytes).

  Paths are unquoted and without the query (`/bucket/a/b` for a download,
  `/storage/v1/b/bucket/o/a/b` for metadata).
  """

  def __init__(self):
    self._lock = threading.Lock()
    self.log = []

  def add(self, method, path, byte_range, num_bytes):
    with self._lock:
      self.log.append((method, path, byte_range, num_bytes))

  def reset(self):
    with self._lock:
      self.log = []

  @property
  def requests(self) -> int:
    return len(self.log)

  @property
  def bytes_sent(self) -> int:
    return sum(entry[3] for entry in self.log)

  def requests_for(self, object_name):
    """Log entries whose path ends with `object_name` (a download or stat)."""
    return [e for e in self.log if e[1].endswith("/" + object_name)]


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
  """A running emulator and its bucket (created, empty at start).

  `settings` are the environment variables that point TF, tensorstore and
  google-cloud-storage at it; `env` is this process's environment with them
  (and without `_UNSET`), for subprocesses.
  """
  settings: dict
  bucket: str
  emulator_url: str  # Plain HTTP on loopback, straight to the emulator.
  stats: ProxyStats = dataclasses.field(default_factory=ProxyStats)

  @property
  def env(self):
    env = {k: v for k, v in os.environ.items() if k not in _UNSET}
    env.update(self.settings)
    return env

  def patch_environ(self, monkeypatch):
    """Applies `settings` to this process for one test (see module doc)."""
    for k in _UNSET:
      monkeypatch.delenv(k, raising=False)
    for k, v in self.settings.items():
      monkeypatch.setenv(k, v)

  def url(self, *parts):
    """`gs://bucket/part/...`."""
    return "/".join((f"gs://{self.bucket}",) + parts)

  def client(self):
    """A google-cloud-storage client of the emulator, for this process.

    It talks to the emulator directly (not through TF), so tests can seed
    the bucket and check what TF wrote independently of TF's reading.
    """
    with warnings.catch_warnings():
      # google-api-core asks for grpcio-status, which only HTTP-free
      # (gRPC) clients need; tests turn warnings into errors.
      warnings.simplefilter("ignore", ImportWarning)
      # pylint: disable=g-import-not-at-top
      from google.auth import credentials
      from google.cloud import storage
      import requests
      # pylint: enable=g-import-not-at-top
    session = requests.Session()
    session.trust_env = False  # Loopback: no HTTP(S)_PROXY of this machine.
    return storage.Client(project="ctx-test",
                          credentials=credentials.AnonymousCredentials(),
                          client_options={"api_endpoint": self.emulator_url},
                          _http=session)

  def upload_tree(self, local_dir, prefix):
    """Copies the files under `local_dir` to `gs://bucket/prefix/`."""
    bucket = self.client().bucket(self.bucket)
    root = pathlib.Path(local_dir)
    for path in sorted(root.rglob("*")):
      if path.is_file():
        name = f"{prefix}/{path.relative_to(root).as_posix()}"
        bucket.blob(name).upload_from_filename(str(path))
    return self.url(prefix)

  def object_names(self, prefix=""):
    return sorted(b.name for b in self.client().list_blobs(
        self.bucket, prefix=prefix))

  def read_object(self, name):
    return self.client().bucket(self.bucket).blob(name).download_as_bytes()


def _make_certificates(folder):
  """A throwaway CA and a server certificate for the Google hosts.

  Returns (ca_path, cert_path, key_path). EC keys keep this quick.
  """
  # pylint: disable=g-import-not-at-top
  x509 = pytest.importorskip(
      "cryptography.x509", reason="cryptography is not installed (the "
      "package's [test] extra): it makes the emulator's TLS certificate")
  from cryptography.hazmat.primitives import hashes
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  # pylint: enable=g-import-not-at-top
  name = lambda cn: x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME,
                                                  cn)])
  now = datetime.datetime.now(datetime.timezone.utc)

  def certificate(subject, key, issuer, issuer_key, extensions):
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2)))
    for ext, critical in extensions:
      builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())

  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca = certificate(name("ctx-jax test CA"), ca_key, name("ctx-jax test CA"),
                   ca_key, [(x509.BasicConstraints(ca=True, path_length=0),
                             True)])
  key = ec.generate_private_key(ec.SECP256R1())
  cert = certificate(
      name(GOOGLE_HOSTS[0]), key, ca.subject, ca_key,
      [(x509.SubjectAlternativeName([x509.DNSName(h) for h in GOOGLE_HOSTS]),
        False),
       (x509.BasicConstraints(ca=False, path_length=None), True),
       (x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]),
        False)])
  f = pathlib.Path(folder)
  pem = serialization.Encoding.PEM
  (f / "ca.pem").write_bytes(ca.public_bytes(pem))
  (f / "server.pem").write_bytes(cert.public_bytes(pem))
  (f / "server.key").write_bytes(key.private_bytes(
      pem, serialization.PrivateFormat.PKCS8,
      serialization.NoEncryption()))
  return f / "ca.pem", f / "server.pem", f / "server.key"


_BOUNDARY = "ctx-jax-empty-object"
# Metadata part (the name comes from the query) and an empty content part.
_EMPTY_MULTIPART = (
    f"--{_BOUNDARY}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n"
    f"--{_BOUNDARY}\r\nContent-Type: application/octet-stream\r\n\r\n"
    f"\r\n--{_BOUNDARY}--\r\n").encode()


# Object downloads: the JSON API's (`...?alt=media`, or its /download/
# alias) and the bucket-host form TF uses (`/bucket/object`); names have
# their slashes escaped in both.
_API_DOWNLOAD = re.compile(
    r"/(?:download/)?storage/v1/b/(?P<bucket>[-.\w]+)/o/(?P<object>[^/]+)")
_HOST_DOWNLOAD = re.compile(r"/(?P<bucket>[-.\w]+)/(?P<object>[^/]+)")
_STORAGE_LAYOUT = re.compile(r"/storage/v1/b/(?P<bucket>[-.\w]+)/storageLayout")


class _TunnelHandler(http.server.BaseHTTPRequestHandler):
  """Serves the decrypted HTTP inside one tunnel by asking the emulator.

  Requests and responses pass through unchanged but for four patches
  around gaps in gcp-storage-emulator (2026.7):
    * it fails on an empty `uploadType=media` upload, which TF sends to make
      a directory marker (`makedirs`), so that one is sent as the equivalent
      `uploadType=multipart` upload;
    * it writes resumable-upload `Location`s as `http://` + the Host asked
      for, which curl would then try to reach directly, so the scheme
      becomes `https://` to bring the next request back through here;
    * its object downloads lack the `x-goog-generation` header real GCS
      sends; tensorstore (orbax's array store) reads the generation there
      and later fails a conditional write ("Malformed StorageGeneration"),
      so it is looked up in the object's metadata and added;
    * it has no `GET /storage/v1/b/BUCKET/storageLayout`, which TF asks
      before renaming a folder (to rename it at once on a hierarchical
      namespace bucket) and fails on a 404, so the proxy answers it: a flat
      bucket, whose folders TF renames object by object.
  """
  protocol_version = "HTTP/1.1"  # Keep-alive: one tunnel, many requests.
  # Headers and body go out in separate writes; with Nagle's algorithm the
  # second waits for the peer's delayed ACK (~40 ms a request).
  disable_nagle_algorithm = True

  def _ask_emulator(self, method, path, body=None, headers=None):
    upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
    try:
      upstream.request(method, path, body=body, headers=headers or {})
      reply = upstream.getresponse()
      return reply, reply.read()
    finally:
      upstream.close()

  def _generation_headers(self):
    """`x-goog-(meta)generation` of the object a GET downloads, if any."""
    path = self.path.split("?")[0]
    match = _HOST_DOWNLOAD.fullmatch(path)
    if "alt=media" in self.path:
      match = _API_DOWNLOAD.fullmatch(path)
    if not match:
      return {}
    reply, data = self._ask_emulator(
        "GET", f"/storage/v1/b/{match['bucket']}/o/{match['object']}",
        headers={"Host": self.headers.get("Host", "")})
    if reply.status != 200:
      return {}
    meta = json.loads(data)
    return {"x-goog-generation": meta["generation"],
            "x-goog-metageneration": meta["metageneration"]}

  def _forward(self):
    if self.server.latency_s:
      time.sleep(self.server.latency_s)
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      body = self._read_chunked()
    else:
      body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
    headers = {k: v for k, v in self.headers.items()
               if k.lower() not in ("transfer-encoding", "content-length",
                                    "connection", "expect")}
    if (self.command == "POST" and not body
        and "uploadType=media" in self.path):
      self.path = self.path.replace("uploadType=media", "uploadType=multipart")
      headers["Content-Type"] = f"multipart/related; boundary={_BOUNDARY}"
      body = _EMPTY_MULTIPART
    layout = _STORAGE_LAYOUT.fullmatch(self.path.split("?")[0])
    if layout and self.command == "GET":
      reply, data = self._ask_emulator(
          "GET", f"/storage/v1/b/{layout['bucket']}", headers=headers)
      if reply.status == 200:
        bucket = json.loads(data)
        data = json.dumps({
            "kind": "storage#storageLayout", "bucket": bucket["name"],
            "location": bucket.get("location", "US"),
            "locationType": bucket.get("locationType", "multi-region"),
            "hierarchicalNamespace": {"enabled": False}}).encode()
    else:
      reply, data = self._ask_emulator(self.command, self.path, body, headers)
    self.send_response_only(reply.status, reply.reason)
    for k, v in reply.getheaders():
      if k.lower() in ("content-length", "connection", "transfer-encoding",
                       "server", "date"):
        continue
      if k.lower() == "location" and v.startswith("http://"):
        v = "https://" + v[len("http://"):]
      self.send_header(k, v)
    if self.command in ("GET", "HEAD") and reply.status in (200, 206):
      for k, v in self._generation_headers().items():
        self.send_header(k, v)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.server.stats.add(
        self.command, urllib.parse.unquote(self.path.split("?")[0]),
        self.headers.get("Range"), 0 if self.command == "HEAD" else len(data))
    if self.command != "HEAD":
      self._send_body(data)

  def _send_body(self, data):
    """Writes `data`, no faster than the server's `bandwidth` (bytes/s)."""
    bandwidth = self.server.bandwidth
    if not bandwidth:
      self.wfile.write(data)
      return
    start, chunk = time.monotonic(), 64 << 10
    for i in range(0, len(data), chunk):
      self.wfile.write(data[i:i + chunk])
      ahead = (i + chunk) / bandwidth - (time.monotonic() - start)
      if ahead > 0:
        time.sleep(ahead)

  def _read_chunked(self):
    parts = []
    while True:
      size = int(self.rfile.readline().split(b";")[0], 16)
      if not size:
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
          pass  # Trailers.
        return b"".join(parts)
      parts.append(self.rfile.read(size))
      self.rfile.readline()

  do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    pass  # Quiet: the tests report failures themselves.


class _ConnectHandler(socketserver.StreamRequestHandler):
  """Answers `CONNECT host:443`, ends TLS, serves the tunnel."""
  disable_nagle_algorithm = True
  # Closes tunnels left idle in curl's connection pool (the client opens a
  # new one when it needs it), so their threads end.
  timeout = _IDLE_TIMEOUT_S

  def handle(self):
    line = self.rfile.readline(8192).decode("latin-1")
    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
      pass  # Proxy headers: nothing in them matters here.
    if not line.startswith("CONNECT "):
      self.wfile.write(b"HTTP/1.1 405 Method Not Allowed\r\n"
                       b"Content-Length: 0\r\n\r\n")
      return
    self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    self.wfile.flush()
    # rfile is buffered, but curl sends nothing until it has the 200 reply.
    try:
      tls = self.server.tls.wrap_socket(self.connection, server_side=True)
    except (ssl.SSLError, OSError):
      return  # The client gave up or refused the certificate.
    with tls:
      _TunnelHandler(tls, self.client_address, self.server)


class _ThreadingServer(socketserver.ThreadingTCPServer):
  daemon_threads = True
  allow_reuse_address = True


@contextlib.contextmanager
def _serving(srv):
  thread = threading.Thread(target=srv.serve_forever, daemon=True)
  thread.start()
  try:
    yield srv.server_address[1]
  finally:
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@contextlib.contextmanager
def gcs_emulator(bucket=BUCKET, latency_s=0.0, bandwidth=None):
  """Runs the emulator and proxy; yields a `GcsEmulator`.

  Skips the calling test when `gcp-storage-emulator`, `google-cloud-storage`
  or `cryptography` is absent.

  Args:
    bucket: the bucket created (empty).
    latency_s: seconds the proxy waits before forwarding each HTTP request
      (a real bucket's time to first byte is tens of ms).
    bandwidth: bytes/s at most per connection for replies (None: as fast as
      loopback).
  """
  emulator_server = pytest.importorskip(
      "gcp_storage_emulator.server",
      reason="gcp-storage-emulator is not installed (pip install "
      "gcp-storage-emulator, or the package's [test] extra)")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ImportWarning)  # See GcsEmulator.client.
    pytest.importorskip(
        "google.cloud.storage",
        reason="google-cloud-storage is not installed (the package's [test] "
        "extra): orbax needs it for gs://, and tests use it to seed buckets")
  from gcp_storage_emulator import storage as emulator_storage  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import buckets  # pylint: disable=g-import-not-at-top

  with contextlib.ExitStack() as stack:
    # It logs each 404 (a normal answer: "does this exist?") as an error.
    quiet = logging.getLogger("gcp_storage_emulator")
    stack.callback(quiet.setLevel, quiet.level)
    quiet.setLevel(logging.CRITICAL)
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="gcs-"))
    ca, cert, key = _make_certificates(folder)

    store = emulator_storage.Storage(use_memory_fs=True)
    buckets.create_bucket(bucket, store)
    # One request at a time: the emulator's store is not thread-safe, and
    # its handler answers HTTP/1.0 (one request per connection).
    class Handler(emulator_server.RequestHandler):
      disable_nagle_algorithm = True  # As in _TunnelHandler.
      timeout = _IDLE_TIMEOUT_S  # A silent client would block all others.

    api = http.server.HTTPServer((_LOOPBACK, 0),
                                 functools.partial(Handler, store))
    api_port = stack.enter_context(_serving(api))

    proxy = _ThreadingServer((_LOOPBACK, 0), _ConnectHandler)
    proxy.upstream = (_LOOPBACK, api_port)
    proxy.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    proxy.tls.load_cert_chain(cert, key)
    proxy.latency_s = latency_s
    proxy.bandwidth = bandwidth
    proxy.stats = ProxyStats()
    proxy_port = stack.enter_context(_serving(proxy))

    proxy_url = f"http://{_LOOPBACK}:{proxy_port}"
    cloudsdk = pathlib.Path(folder) / "gcloud"  # Empty: no user credentials.
    cloudsdk.mkdir()
    settings = {
        "HTTPS_PROXY": proxy_url,
        "https_proxy": proxy_url,
        "CURL_CA_BUNDLE": str(ca),
        "TENSORSTORE_CA_BUNDLE": str(ca),
        # google-cloud-storage (orbax asks it about the bucket) goes straight
        # to the emulator, with anonymous credentials.
        "STORAGE_EMULATOR_HOST": f"http://{_LOOPBACK}:{api_port}",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator-token",
        "CLOUDSDK_CONFIG": str(cloudsdk),
        # Any metadata-server query (zone, credentials) gets a quick error
        # answer from loopback instead of a DNS lookup or a timeout.
        "GCE_METADATA_HOST": f"{_LOOPBACK}:{api_port}",
        # Fail fast: the default retries back off for minutes.
        "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
        "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "10000",
        "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "100000",
    }
    yield GcsEmulator(settings=settings, bucket=bucket,
                      emulator_url=f"http://{_LOOPBACK}:{api_port}",
                      stats=proxy.stats)
