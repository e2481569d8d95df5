"""`md-index`: write the record-offset index beside every class file.

    md-index RECORDS_DIR [RECORDS_DIR ...] [--force] [--threads 32]

Each RECORDS_DIR is a records folder holding `dataset_spec.json`, local or
on a bucket (`gs://...`). For every class file the spec lists, the command
writes `<class_id>.tfrecords.index` (`record_files.write_record_index`):
the record offsets, the file's size and the record count, so that the
pipeline finds a class's records with one small read instead of walking
the whole file (on a bucket, a 140 MB ILSVRC class file) in every process
after every start. md-convert writes these indexes itself; this command is
for folders converted before, by the official converter or copied from
elsewhere.

Every file's record count is checked against the spec. A file whose index
is already valid (made for a file of its current size) is skipped unless
`--force`. Files are handled in threads, since on a bucket each is a few
requests. One summary line per folder; any problem (missing folder, spec or
class file, truncated file, count that differs from the spec's) ends the
command with one `md-index: error: ...` line and exit status 1.
"""

import concurrent.futures
import sys
import time
from typing import Sequence

from meta_dataset_pipeline import cli
from meta_dataset_pipeline import dataset_spec as spec_lib
from meta_dataset_pipeline import record_files

PROG = "md-index"


def _parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(
      prog=PROG, description=__doc__.split("\n\n", 2)[2].strip())
  parser.add_argument("records_dirs", nargs="+", metavar="RECORDS_DIR",
                      help="records folders (holding dataset_spec.json)")
  parser.add_argument("--force", action="store_true",
                      help="rewrite indexes that are already valid")
  parser.add_argument("--threads", type=int, default=32,
                      help="class files handled at once")
  return parser


def index_class_file(path: str, num_records: int, class_id: int,
                     force: bool = False) -> tuple[int, bool]:
  """Writes the index of one class file unless a valid one is there.

  Args:
    path: the class file.
    num_records: the spec's count of records for the class.
    class_id: the class, for messages.
    force: rewrite a valid index too.

  Returns:
    (number of records, whether the index was written).

  Raises:
    FileNotFoundError: no class file.
    RecordError: the file is truncated or its count is not the spec's.
  """
  offsets = None if force else record_files.valid_record_index(path)
  if offsets is not None:
    starts, written = offsets[:-1], False
  else:
    starts, written = record_files.index_records(path), True
  if len(starts) != num_records:
    raise record_files.RecordError(
        f"{path}: the spec lists {num_records} images for class "
        f"{class_id} but the file holds {len(starts)} records")
  if written:
    record_files.write_record_index(path, starts)
  return len(starts), written


def index_folder(spec, force: bool = False, threads: int = 32) -> dict:
  """Indexes every class file of a loaded spec; returns counts.

  Raises:
    FileNotFoundError: class files are missing (named, up to 3).
    NotImplementedError: sharded class files.
    RecordError: the first damaged or miscounted file, in class order.
  """
  if spec.file_pattern not in spec_lib.SUPPORTED_FILE_PATTERNS:
    raise NotImplementedError(
        f"{spec.name}: file_pattern {spec.file_pattern!r} (sharded class "
        "files) is not supported; one file per class is expected")
  classes = list(range(spec.num_classes))

  def one(class_id):
    path = spec.class_file(class_id)
    try:
      return index_class_file(
          path, spec.get_total_images_per_class(class_id), class_id, force)
    except (FileNotFoundError, record_files.RecordError) as e:
      return e

  with concurrent.futures.ThreadPoolExecutor(
      max(1, min(threads, len(classes)))) as pool:
    results = list(pool.map(one, classes))
  missing = [spec.class_file(c) for c, r in zip(classes, results)
             if isinstance(r, FileNotFoundError)]
  if missing:
    raise FileNotFoundError(
        f"{len(missing)} class record files of '{spec.name}' are missing, "
        f"e.g. {', '.join(missing[:3])}")
  bad = [r for r in results if isinstance(r, Exception)]
  if bad:
    raise bad[0]
  return {"files": len(results),
          "written": sum(w for _, w in results),
          "records": sum(n for n, _ in results)}


def _main(args) -> int:
  if args.threads < 1:
    raise cli.UserError(f"--threads must be >= 1, got {args.threads}")
  specs = [spec_lib.load_dataset_spec(d) for d in args.records_dirs]
  for folder, spec in zip(args.records_dirs, specs):
    start = time.monotonic()
    counts = index_folder(spec, args.force, args.threads)
    print(f"{PROG} {folder}: {counts['files']} class files, "
          f"{counts['written']} indexed, "
          f"{counts['files'] - counts['written']} already indexed, "
          f"{counts['records']} records, {time.monotonic() - start:.1f} s",
          flush=True)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command; returns the exit status."""
  cli.quiet_tensorflow()
  args = _parser().parse_args(argv)
  return cli.guarded(PROG, lambda: _main(args), args.verbose)


def run():
  """Console-script entry point."""
  sys.exit(main())


if __name__ == "__main__":
  run()
