"""Start-up checks of a config that the official trainer also refuses.

Run before the work dir is created or anything is compiled, so a bad config
costs nothing and leaves nothing behind. The specs of a config's sources are
loaded here too (`load_config_specs`), for the checks and the pipeline.
"""

import os
from typing import Sequence

from etils import epath
import ml_collections

from ctx_jax import paths

# The only official source with a class hierarchy that episodes can ignore
# (the ImageNet DAG; Omniglot's alphabets are the bilevel ontology, which
# `ignore_hierarchy_probability` does not touch).
HIERARCHY_SOURCE = "ilsvrc_2012"


def check_hierarchy(episode: ml_collections.ConfigDict, sources,
                    what: str) -> None:
  """`ignore_hierarchy_probability` only for episodes of ILSVRC alone.

  The official trainer (`trainer.py`, `_create_episodic_pipeline`) raises
  "ignore_hierarchy_probability not supported with multisource pipelines"
  when several sources are given; with one source the setting only matters
  for ILSVRC (the sampler's DAG branch), so for any other source it would be
  silently ignored: we refuse that too.

  Args:
    episode: an episode description config.
    sources: the sources its episodes come from (one pipeline).
    what: the config path of `episode`, for the message.

  Raises:
    ValueError: naming the key and the sources.
  """
  p = float(episode.ignore_hierarchy_probability or 0.0)
  if not p:
    return
  sources = tuple(sources)
  if len(sources) > 1:
    raise ValueError(
        f"{what}.ignore_hierarchy_probability={p:g} with {len(sources)} "
        f"sources ({', '.join(sources)}): the official trainer does not "
        "support it with multisource pipelines; set it to 0")
  if sources != (HIERARCHY_SOURCE,):
    raise ValueError(
        f"{what}.ignore_hierarchy_probability={p:g} for source "
        f"{sources[0]!r}: only {HIERARCHY_SOURCE} has a hierarchy to ignore; "
        "set it to 0")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Every start-up check of a training config; raises ValueError."""
  data = config.data
  check_hierarchy(data.train_episode, data.train_sources,
                  "config.data.train_episode")
  # Evaluation builds one pipeline per source.
  for source in tuple(data.valid_sources) + tuple(data.test_sources):
    check_hierarchy(data.eval_episode, (source,), "config.data.eval_episode")


def source_dir(records_root: str, source: str) -> epath.Path:
  """`<records_root>/<source>`, with a clear error when it is missing."""
  if not records_root:
    raise FileNotFoundError(
        "config.data.records_root is empty: set it to the folder holding one "
        "folder of Meta-Dataset records per source")
  path = paths.resolve(records_root) / source
  if not path.is_dir():
    raise FileNotFoundError(
        f"records of source '{source}' not found: {path} is "
        "not a directory (check config.data.records_root and the sources)")
  return path


DATA_FORMATS = ("records", "tfds")


def data_format(data: ml_collections.ConfigDict) -> str:
  """`config.data.format`, checked ("records" when a saved config has
  none)."""
  fmt = data.get("format", "records")
  if fmt not in DATA_FORMATS:
    raise ValueError(f"config.data.format must be one of {DATA_FORMATS}, "
                     f"got {fmt!r}")
  return fmt


def data_source_dir(data: ml_collections.ConfigDict, source: str):
  """Where `source`'s data is, as `config.data.format` says, with a clear
  error when it is missing (records: `source_dir`; TFDS:
  `<records_root>/meta_dataset/<source>`)."""
  if data_format(data) == "records":
    return source_dir(data.records_root, source)
  if not data.records_root:
    raise FileNotFoundError(
        "config.data.records_root is empty: with config.data.format='tfds' "
        "set it to the TFDS data dir that `tfds build` wrote")
  from meta_dataset_pipeline import tfds_source  # pylint: disable=g-import-not-at-top
  path = tfds_source.source_dir(data.records_root, source)
  if not path.is_dir():
    raise FileNotFoundError(
        f"TFDS-prepared source '{source}' not found: {path} is not a "
        "directory (check config.data.records_root and the sources)")
  return path


def check_data(config: ml_collections.ConfigDict) -> None:
  """Every split a run uses, of every source, is there and plausible.

  Each source's records folder and spec, then the class files of each split
  the run will read (train, valid and test sources): present, large enough
  for the spec's counts and ending in a complete record. One stat and one
  small read per class file, whatever the number of records, so a missing
  or truncated test-class file stops the run before step 1, not after
  training. Records are checked in full (CRCs) when they are read.

  Raises:
    FileNotFoundError: naming the missing folder, spec or class file.
    ValueError: naming a malformed `dataset_spec.json` or a truncated class
      file (`RecordError`).
  """
  from meta_dataset_pipeline import dataset_spec  # pylint: disable=g-import-not-at-top
  from meta_dataset_pipeline import record_files  # pylint: disable=g-import-not-at-top
  data = config.data
  splits_of = {}
  for split, sources in (("TRAIN", data.train_sources),
                         ("VALID", data.valid_sources),
                         ("TEST", data.test_sources)):
    for source in sources:
      splits_of.setdefault(source, []).append(split)
  specs = load_config_specs(data, tuple(splits_of))
  for spec, splits in zip(specs, splits_of.values()):
    # TFDS: every split's class slices, from the metadata alone.
    record_files.check_sources(
        [spec], tuple(dataset_spec.Split) if data_format(data) == "tfds"
        else splits)


def check_workdir(workdir: str) -> None:
  """`workdir` can be created or written, checked without creating it.

  Raises:
    PermissionError: naming the work dir and the reason.
  """
  if not paths.is_local(workdir):
    return  # Object stores: `prepare_workdir` probes with a real write.
  path = paths.resolve(workdir)
  ancestor = path
  while not ancestor.exists():
    ancestor = ancestor.parent
  if not ancestor.is_dir():
    raise PermissionError(f"work dir {path} is not writable: {ancestor} is "
                          "not a directory")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise PermissionError(f"work dir {path} is not writable: no write "
                          f"permission in {ancestor}")


def check_init_from(config: ml_collections.ConfigDict) -> None:
  """`config.init_from`, if set, is a complete exported model."""
  if config.get("init_from") and not (
      paths.resolve(config.init_from) / "model_config.json").is_file():
    raise FileNotFoundError(
        f"config.init_from={config.init_from} is not an exported model (no "
        "model_config.json): give a ctx-import-official output or a run's "
        "export/ or best/")


def check_start_up(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The checks `ctx-train` makes before it creates or compiles anything."""
  check_workdir(workdir)
  check_config(config)
  check_data(config)
  check_init_from(config)


def load_specs(records_root: str, sources: Sequence[str]):
  """The record specs of `sources` under `records_root`."""
  from meta_dataset_pipeline import dataset_spec  # pylint: disable=g-import-not-at-top
  return [dataset_spec.load_dataset_spec(source_dir(records_root, s))
          for s in sources]


def load_config_specs(data: ml_collections.ConfigDict,
                      sources: Sequence[str]):
  """The specs of `sources`, read as `config.data.format` says."""
  from meta_dataset_pipeline import tfds_source  # pylint: disable=g-import-not-at-top
  if data_format(data) == "records":
    return load_specs(data.records_root, sources)
  for source in sources:
    data_source_dir(data, source)
  version = data.get("tfds_md_version", "v1")
  if version not in tfds_source.MD_VERSIONS:
    raise ValueError(f"config.data.tfds_md_version must be one of "
                     f"{tfds_source.MD_VERSIONS}, got {version!r}")
  return tfds_source.load_tfds_specs(data.records_root, sources, version)
