"""Paths on any file system TensorFlow and orbax know: local, `gs://`, ...

Work dirs, exports, evaluation outputs and records roots are `etils.epath`
paths, the path type orbax itself uses: local paths go through the OS,
`gs://` (and other registered schemes) through `tf.io.gfile`. Local paths
are made absolute so a run's files do not depend on the current directory.
"""

import os
import uuid

from etils import epath


def is_local(path: str | os.PathLike[str]) -> bool:
  """Whether `path` has no URI scheme (`gs://...` is not local)."""
  return "://" not in os.fspath(path)


def resolve(path: str | os.PathLike[str]) -> epath.Path:
  """`path` as an `epath.Path`; absolute when local."""
  if is_local(path):
    return epath.Path(os.path.abspath(os.fspath(path)))
  return epath.Path(path)


def write_atomic(path: epath.Path, data: str | bytes) -> None:
  """Writes `data` to `path` through a temporary name and a rename.

  On a local disk the rename is atomic, so readers never see a half-written
  file. Object stores have no atomic rename (the temporary object is copied,
  then deleted), but the final name still appears only once complete.
  """
  path = epath.Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  if isinstance(data, str):
    tmp.write_text(data)
  else:
    tmp.write_bytes(data)
  tmp.replace(path)
