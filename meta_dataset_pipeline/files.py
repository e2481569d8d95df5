"""File access for records and specs: local paths and any `tf.io.gfile` URL.

Records may live on any file system TensorFlow registers (`gs://` buckets,
`ram://`, ...). Paths with a scheme go through `tf.io.gfile`; plain local
paths use `os` and Python's buffered files, because `GFile` costs about
18 us per seek-and-read of a record against 4 us for `open` (measured on
the fixtures; see `benchmarks/RESULTS.md`), and the record reads sit in the
pipeline's single planning thread.

TensorFlow is imported only when a URL is used, so the converter tools that
load specs stay free of it.
"""

import dataclasses
import os
import posixpath
import re

# `gs://bucket/x`, `ram://x`, `file:///x` ...: handled by `tf.io.gfile`.
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path) -> bool:
  """Whether `path` names a file system by scheme (read with tf.io.gfile)."""
  return bool(_URL.match(os.fspath(path)))


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def join(folder, *names) -> str:
  """`os.path.join`, keeping '/' after a URL (never a backslash)."""
  folder = os.fspath(folder)
  if is_url(folder):
    return posixpath.join(folder, *names)
  return os.path.join(folder, *names)


def dirname(path) -> str:
  path = os.fspath(path)
  return posixpath.dirname(path) if is_url(path) else os.path.dirname(path)


def isdir(path) -> bool:
  path = os.fspath(path)
  return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def isfile(path) -> bool:
  path = os.fspath(path)
  if is_url(path):
    gfile = _gfile()
    return gfile.exists(path) and not gfile.isdir(path)
  return os.path.isfile(path)


@dataclasses.dataclass(frozen=True)
class Stat:
  size: int
  mtime_ns: int


def stat(path) -> Stat:
  """Size and modification time of a file.

  Raises:
    FileNotFoundError: no such file.
  """
  path = os.fspath(path)
  if not is_url(path):
    st = os.stat(path)
    return Stat(st.st_size, st.st_mtime_ns)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    st = tf.io.gfile.stat(path)
  except tf.errors.NotFoundError:
    raise FileNotFoundError(f"no such file: {path}") from None
  return Stat(int(st.length), int(st.mtime_nsec))


def open_binary(path):
  """A seekable binary reader of `path` (`read(n)`, `seek(offset)`).

  Raises:
    FileNotFoundError: no such file.
  """
  path = os.fspath(path)
  if not is_url(path):
    return open(path, "rb")  # pylint: disable=consider-using-with
  if not _gfile().exists(path):
    raise FileNotFoundError(f"no such file: {path}")
  return _gfile().GFile(path, "rb")


def open_ranges(path):
  """A reader of `path` whose every `read(n)` after a `seek` is one read.

  For `read_records`' merged ranges. Locally a plain buffered file. On a
  URL file system each `read(n)` goes through a fresh TF input stream whose
  buffer is exactly `n` bytes: a `GFile` reads through a 512 KiB buffer, so
  a 3 MB range would cost 6 requests, a 100 KB record 512 KiB. How many
  requests a read costs then depends on `GCS_READ_CACHE_BLOCK_SIZE_MB`
  (see `__init__.py`): TF's seek probes the byte before the offset, which a
  block buffer of at least the read's size answers together with the read
  (one request of a block), and which is a request of its own without one.

  Opening costs nothing on a URL file system (no request; a missing file
  fails at the first read), so a reader may open one per call.

  Raises:
    FileNotFoundError: no such file (locally at once, on a URL at the first
      read).
  """
  path = os.fspath(path)
  if not is_url(path):
    return open(path, "rb")  # pylint: disable=consider-using-with
  try:
    from tensorflow.python.lib.io import _pywrap_file_io  # pylint: disable=g-import-not-at-top
  except ImportError:  # Another TF layout: whole 512 KiB buffers, correct.
    return open_binary(path)
  return _RangeReader(path, _pywrap_file_io.BufferedInputStream)


class _RangeReader:
  """`seek` + `read(n)` on a URL file, each read an input stream of n."""

  def __init__(self, path: str, stream_fn):
    self._path = path
    self._stream_fn = stream_fn
    self._position = 0

  def seek(self, offset: int, whence: int = 0) -> int:
    if whence != 0:
      raise ValueError("only absolute seeks (whence=0)")
    self._position = int(offset)
    return self._position

  def tell(self) -> int:
    return self._position

  def read(self, n: int) -> bytes:
    if n <= 0:
      return b""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      stream = self._stream_fn(self._path, n)
      stream.seek(self._position)
      data = stream.read(n)
    except tf.errors.OutOfRangeError:
      data = b""  # Past the end of the file.
    except tf.errors.NotFoundError:
      raise FileNotFoundError(f"no such file: {self._path}") from None
    self._position += len(data)
    return data

  def close(self):
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_bytes(path) -> bytes:
  """The whole content of a file (on a bucket: one request, plus a stat).

  Raises:
    FileNotFoundError: no such file.
  """
  path = os.fspath(path)
  if not is_url(path):
    with open(path, "rb") as f:
      return f.read()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  except tf.errors.NotFoundError:
    raise FileNotFoundError(f"no such file: {path}") from None


def write_bytes(path, data: bytes):
  """Writes a whole file, replacing it at once.

  Locally through a temporary name in the same folder and a rename; on an
  object store a plain write, which replaces the object atomically.
  """
  path = os.fspath(path)
  if not is_url(path):
    from meta_dataset_pipeline import records_writer  # pylint: disable=g-import-not-at-top
    with records_writer.atomic_output_path(path) as tmp:
      with open(tmp, "wb") as f:
        f.write(data)
    return
  with _gfile().GFile(path, "wb") as f:
    f.write(data)


def read_text(path) -> str:
  path = os.fspath(path)
  if not is_url(path):
    with open(path, "r", encoding="utf-8") as f:
      return f.read()
  with _gfile().GFile(path, "r") as f:
    return f.read()
