"""TFDS-prepared Meta-Dataset: same episodes as the records, train and eval.

The TFDS data is written by tensorflow-datasets itself (`tfds_fixture`, the
official builder's layout) from the same records the records path reads.
"""

import json

import numpy as np
import pytest

import meta_dataset_pipeline as mdp
from ctx_jax import config_checks
from ctx_jax import mesh as mesh_lib
from ctx_jax.eval import resumable
from ctx_jax.training import train
from ctx_jax.training import workdir as workdir_lib
from experiments import demo
from meta_dataset_pipeline import reader
from meta_dataset_pipeline import tfds_source
from tests import fakes
from tests import tfds_fixture


@pytest.fixture(scope="module")
def dtd(shared_dir, tmp_path_factory):
  """(records spec, TFDS data dir) of the official converter's DTD."""
  records = shared_dir / "fixtures" / "md_records" / "dtd"
  data_dir = tmp_path_factory.mktemp("tfds")
  tfds_fixture.prepare(records, data_dir)
  return mdp.load_dataset_spec(str(records)), data_dir


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
  """(records root, TFDS data dir) of the tiny demo source `glyphs`."""
  root = tmp_path_factory.mktemp("glyphs")
  records = fakes.make_tiny_demo(root / "records")
  tfds_fixture.prepare(records, root / "tfds")
  return records.parent, root / "tfds"


def _episodes(spec, n, **kwargs):
  # Small fixed episodes keep decoding cheap; the variable-size sampler is
  # compared on the planned episodes above.
  config = mdp.EpisodeDescriptionConfig(
      num_ways=5, num_support=3, num_query=2,
      simclr_episode_fraction=kwargs.pop("simclr_episode_fraction", 0.0))
  ds = mdp.make_one_source_episode_dataset(spec, "TRAIN", config,
                                           image_size=32, seed=7, **kwargs)
  it = ds.as_numpy_iterator()
  out = [next(it) for _ in range(n)]
  del it  # Before exit: see pipeline.py's note on from_generator.
  return out


def test_spec_and_class_slices_come_from_the_tfds_metadata(dtd):
  records_spec, data_dir = dtd
  spec = tfds_source.load_tfds_spec(str(data_dir), "dtd")
  assert isinstance(spec, mdp.DatasetSpecification)
  for split in mdp.Split:
    assert spec.get_classes(split) == records_spec.get_classes(split)
  assert spec.images_per_class == records_spec.images_per_class
  # Valid class 0 of DTD is absolute class 33: after the 33 train classes.
  first_valid = sum(records_spec.images_per_class[c] for c in range(33))
  assert spec.records.slices[33][0] == first_valid
  assert f"all_classes[{first_valid}:" in spec.class_file(33)


def test_same_records_and_episodes_as_the_records_path(dtd):
  records_spec, data_dir = dtd
  spec = tfds_source.load_tfds_spec(str(data_dir), "dtd")
  # Planning: the same classes and record indices, episode after episode.
  plans = []
  for s in (records_spec, spec):
    sampler = mdp.EpisodeDescriptionSampler(
        s, "VALID", mdp.EpisodeDescriptionConfig(), seed=[1, 2])
    episodes = reader.EpisodeReader([reader.Source(s, sampler.split,
                                                   sampler)], seed=[3, 0])
    plans.append([episodes.next_episode() for _ in range(5)])
  assert sum(p.num_flushed for p in plans[0]) > 0  # Flushes are covered.
  for a, b in zip(*plans):
    np.testing.assert_array_equal(a.class_ids, b.class_ids)
    np.testing.assert_array_equal(a.record_index, b.record_index)
    assert a.num_flushed == b.num_flushed
    assert a.images == b.images  # The same encoded bytes.
  # Whole episodes, with SimCLR episodes and BOHB augmentation: equal,
  # including what seeds each row's augmentation (left to the device here,
  # so the test does not pay for tracing the host augmentation graphs).
  options = dict(simclr_episode_fraction=0.5,
                 md_augmentation=mdp.BOHB_AUGMENTATION,
                 augment_on_device=True)
  from_records = _episodes(records_spec, 4, **options)
  # A SimCLR episode has one way per support image (15 > 5).
  assert any(ep["num_ways"] > 5 for ep in from_records)
  for a, b in zip(from_records, _episodes(spec, 4, **options)):
    assert a.keys() == b.keys() and "support_aug_seeds" in a
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_unusable_tfds_data_is_named(glyphs, tmp_path):
  records_root, data_dir = glyphs
  with pytest.raises(FileNotFoundError, match="'dtd' not found"):
    tfds_source.load_tfds_spec(str(data_dir), "dtd")
  with pytest.raises(tfds_source.TfdsSourceError, match="'v2'"):
    tfds_source.load_tfds_spec(str(data_dir), "glyphs", "v2")
  # Examples that are not the class the metadata says: named when read.
  spec = tfds_source.load_tfds_spec(str(data_dir), "glyphs")
  slices = spec.records.slices
  slices[0], slices[1] = slices[1], slices[0]  # Equal sizes: passes checks.
  stream = spec.open_class_streams("TRAIN", [np.random.default_rng(0)] * 16,
                                   100)[0]
  with pytest.raises(reader.RecordError,
                     match=r"glyphs/1.0.0 \(all_classes\[16:32\]\): "
                     r"record 3 of class 0 has label 1"):
    stream.read_image(3)
  # The default `tfds build` format has no random access: how to convert.
  tfds_fixture.prepare(records_root / "glyphs", tmp_path, "tfrecord")
  with pytest.raises(tfds_source.TfdsSourceError, match="convert_format"):
    tfds_source.load_tfds_spec(str(tmp_path), "glyphs")


def _tfds_config(data_dir):
  config = demo.get_config("smoke")
  config.model.query_dim = config.model.val_dim = 16
  config.num_devices = 1
  config.train.num_steps = 2
  config.eval.num_episodes = 2
  config.data.format = "tfds"
  config.data.records_root = str(data_dir)
  return config


def test_smoke_config_trains_and_evaluates_from_tfds(glyphs, tmp_path):
  _, data_dir = glyphs
  config = _tfds_config(data_dir)
  config_checks.check_start_up(config, str(tmp_path / "run"))
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["step"] == 2
  acc = results["test"]["glyphs"]
  assert acc["num_episodes"] == 2 and 0.0 <= acc["mean"] <= 1.0
  saved = json.loads((tmp_path / "run" / workdir_lib.RESULTS_FILE).read_text())
  assert saved["test"]["glyphs"] == acc

  # ctx-eval's per-source loop (with its pixel 1-NN baseline, which needs
  # no compiling): a prepared source is evaluated, a missing one becomes an
  # error row naming the TFDS folder.
  cache = resumable.EpisodeCache(tmp_path / "e.json", resume=False,
                                 write=False)
  rows = resumable.evaluate_sources(
      None, None, config, mesh_lib.make_mesh(1), "TEST",
      ["glyphs", "omniglot"], 2, 0, cache, chunk_size=2, is_chief=True)
  assert rows["glyphs"]["num_episodes"] == 2
  assert "meta_dataset/omniglot" in rows["omniglot"]["error"]


def test_bad_format_is_refused_before_training(glyphs, tmp_path):
  _, data_dir = glyphs
  config = _tfds_config(data_dir)
  config.data.format = "tfrecords"
  with pytest.raises(ValueError, match="config.data.format"):
    config_checks.check_start_up(config, str(tmp_path / "run"))
  config.data.format = "tfds"
  config.data.test_sources = ("omniglot",)
  with pytest.raises(FileNotFoundError, match="omniglot"):
    config_checks.check_start_up(config, str(tmp_path / "run"))


def test_ctx_eval_cache_key_tells_tfds_versions_apart(glyphs):
  _, data_dir = glyphs
  config = _tfds_config(data_dir)
  key = lambda: resumable.source_key(config, "TEST", "glyphs", 4, 0)  # pylint: disable=unnecessary-lambda-assignment
  v1 = key()
  assert v1["format"] == "tfds" and v1["dataset_spec_sha256"]
  config.data.tfds_md_version = "v2"
  assert key() != v1
