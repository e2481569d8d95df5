"""The `md-episodes` command."""

import json

import numpy as np
import pytest

from meta_dataset_pipeline import episodes_cli
import meta_dataset_pipeline as mdp


def _run(capsys, *argv):
  try:
    status = episodes_cli.main([str(a) for a in argv])
  except SystemExit as e:  # A user error: one line, exit status 1.
    status = e.code
  return status, capsys.readouterr()


def test_spec_file_json_and_summary(shared_dir, tmp_path, capsys):
  spec_file = (shared_dir / "fixtures" / "official_specs" / "dataset_specs" /
               "ilsvrc_2012_dataset_spec.json")
  out = tmp_path / "episodes.json"
  status, printed = _run(capsys, spec_file, "--split", "test",
                         "--num_episodes", 50, "--seed", 3,
                         "--output", out)
  assert status == 0
  assert "ilsvrc_2012 TEST: 50 episodes over 130 classes" in printed.out
  result = json.loads(out.read_text())
  episodes, summary = result["episodes"], result["summary"]
  assert len(episodes) == 50
  for ep in episodes:
    assert len(ep["class_ids"]) == len(ep["num_support"]) == len(
        ep["num_query"])
    assert 0 <= min(ep["class_ids"]) and max(ep["class_ids"]) < 130
  ways = [len(ep["class_ids"]) for ep in episodes]
  assert summary["ways"]["histogram"] == {
      str(w): ways.count(w) for w in sorted(set(ways))}
  assert sum(summary["class_frequency"]["counts"].values()) == sum(ways)
  assert summary["support_set_size"]["max"] <= 500
  assert summary["config"]["max_num_query"] == 10
  # Same seed, same descriptions.
  _run(capsys, spec_file, "--split", "TEST", "--num_episodes", 50,
       "--seed", 3, "--output", tmp_path / "again.json")
  assert json.loads((tmp_path / "again.json").read_text()) == result


def test_overrides_records_dir_and_png(shared_dir, tmp_path, capsys):
  records = shared_dir / "fixtures" / "md_records" / "dtd"
  out, png = tmp_path / "e.json", tmp_path / "e.png"
  status, _ = _run(capsys, records, "--split", "VALID", "--num_ways", 5,
                   "--num_support", 2, "--num_query", 3, "--num_episodes",
                   10, "--output", out, "--png", png, "--image_size", 32)
  assert status == 0
  episodes = json.loads(out.read_text())["episodes"]
  assert all(ep["num_support"] == [2] * 5 and ep["num_query"] == [3] * 5
             for ep in episodes)
  assert png.read_bytes()[:4] == b"\x89PNG"
  # The PNG shows episode 0: the pipeline with the same seed draws it.
  spec = mdp.load_dataset_spec(records)
  cfg = mdp.EpisodeDescriptionConfig(num_ways=5, num_support=2, num_query=3)
  ep = next(mdp.make_one_source_episode_dataset(
      spec, "VALID", cfg, 8, seed=0).as_numpy_iterator())
  first = ep["support_class_ids"][::2] - spec.get_classes("VALID").start
  assert first.tolist() == episodes[0]["class_ids"]


def test_support_range_and_bool_options(shared_dir, capsys):
  spec_file = (shared_dir / "fixtures" / "official_specs" / "dataset_specs" /
               "omniglot_dataset_spec.json")
  status, printed = _run(capsys, spec_file, "--num_support", "1,3",
                         "--num_query", 2, "--ignore_bilevel_ontology",
                         "true", "--num_episodes", 20)
  assert status == 0 and "shots" in printed.out


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "no dataset spec"),
    (["{spec}", "--min_ways", "8"], "min_ways=8"),
    (["{spec}", "--num_ways", "5", "--num_support", "100", "--num_query",
      "30"], "num_support + num_query"),
])
def test_errors(shared_dir, tmp_path, capsys, argv, message):
  spec = shared_dir / "fixtures" / "official_specs" / "dataset_specs" / (
      "dtd_dataset_spec.json")
  argv = [a.format(missing=tmp_path / "nope", spec=spec) for a in argv]
  argv += ["--split", "TEST"]
  status, printed = _run(capsys, *argv)
  assert status == 1
  assert message in printed.err
  assert printed.err.count("\n") == 1  # One line.


def test_png_needs_records(shared_dir, tmp_path, capsys):
  spec = shared_dir / "fixtures" / "official_specs" / "dataset_specs" / (
      "dtd_dataset_spec.json")
  status, printed = _run(capsys, spec, "--num_episodes", 2, "--png",
                         tmp_path / "x.png")
  assert status == 1 and "cannot draw" in printed.err
  assert np.isfinite(status)
