"""ctx-eval: CI formula, reproducible episodes, resume, missing domains."""

import json
import math
import os
import pathlib
import subprocess
import sys

from flax import nnx
import pytest

from ctx_jax import mesh as mesh_lib
from ctx_jax import models
from ctx_jax.checkpoints import export
from ctx_jax.eval import episodic
from ctx_jax.eval import evaluate
from ctx_jax.eval import main as eval_main
from ctx_jax.eval import report as eval_report
from ctx_jax.eval import resumable
from experiments import common
from experiments import demo
from tests import fakes

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_SMOKE = str(REPO / "experiments" / "demo.py") + ":smoke"
# 4 devices per ctx-eval process: every episode is split over them.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
           PYTHONPATH=str(REPO), JAX_NUM_CPU_DEVICES="4",
           XLA_FLAGS="--xla_force_host_platform_device_count=4")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Tiny demo records and a tiny exported CTX model (random weights)."""
  root = tmp_path_factory.mktemp("tiny")
  data = fakes.make_tiny_demo(root / "data")
  config = demo.get_config("smoke")
  model = models.build_model(config.model, rngs=nnx.Rngs(0))
  exported = export.export_model(root / "export", model, config.model)
  return data.parent, exported


def _config(records_root):
  config = demo.get_config("smoke")
  config.data.records_root = str(records_root)
  return config


def _eval(*args, timeout=300):
  return subprocess.run(
      [sys.executable, "-m", "ctx_jax.eval.main", *args], env=ENV, cwd=REPO,
      capture_output=True, text=True, timeout=timeout, check=False)


def test_ci_is_official_population_std():
  # Official (meta_dataset/trainer.py): np.std (ddof=0) * 1.96 / sqrt(n).
  s = episodic.summarize([0.0, 1.0])
  assert s.mean == 0.5
  assert s.ci95 == pytest.approx(1.96 * 0.5 / math.sqrt(2))  # not 0.98
  assert episodic.summarize([0.3] * 5).ci95 == 0.0


def test_episode_accuracies_reports_chunks_in_order():
  chunks = []
  accs = episodic.episode_accuracies(
      lambda e: {"accuracy": e["a"]}, ({"a": i / 10} for i in range(10)), 7,
      chunk_size=3, on_chunk=chunks.append)
  assert accs == [i / 10 for i in range(7)]
  assert chunks == [[0.0, 0.1, 0.2], [0.3, 0.4, 0.5], [0.6]]


def test_episodes_are_reproducible_under_a_seed_and_resumable(tiny):
  records_root, _ = tiny
  config = _config(records_root)
  mesh = mesh_lib.make_mesh(4)
  run = lambda seed, start=0: evaluate.source_accuracies(  # pylint: disable=g-long-lambda
      None, config, mesh, "TEST", "glyphs", 12, seed, start=start)
  first = run(seed=0)
  assert len(first) == 12
  assert run(seed=0) == first
  assert run(seed=0, start=8) == first[8:]
  assert run(seed=5) != first


def test_episode_cache_keys_and_atomic_writes(tmp_path):
  path = tmp_path / "e.episodes.json"
  key = {"seed": 0, "num_episodes": 4}
  cache = resumable.EpisodeCache(path, resume=True, write=True)
  cache.save("dtd", key, [0.5, 0.25])
  assert not list(tmp_path.glob(".*tmp*"))
  again = resumable.EpisodeCache(path, resume=True, write=True)
  assert again.done("dtd", key) == [0.5, 0.25]
  assert again.done("dtd", dict(key, seed=1)) == []  # changed key: afresh
  assert again.done("omniglot", key) == []
  assert resumable.EpisodeCache(path, resume=False, write=True).done(
      "dtd", key) == []
  path.write_text("{not json")
  with pytest.raises(ValueError, match="e.episodes.json"):
    resumable.EpisodeCache(path, resume=True, write=True)


def test_sources_all_and_table_reference():
  assert eval_main.expand_sources(["all"]) == list(eval_main.ALL_SOURCES)
  assert len(eval_main.ALL_SOURCES) == 10
  assert set(eval_main.PAPER_CTX) == set(eval_main.ALL_SOURCES)
  assert sum(eval_main.PAPER_CTX.values()) / 10 == pytest.approx(74.281)
  table = eval_report.format_table(
      {"dtd": {"mean": 0.7, "ci95": 0.01, "num_episodes": 600},
       "omniglot": {"mean": 0.8, "ci95": 0.01, "num_episodes": 600}},
      reference=eval_main.PAPER_CTX)
  assert "75.57%" in table and "82.21%" in table
  assert "average" in table and "75.00%" in table and "78.89%" in table


def test_ctx_eval_end_to_end_resume_and_missing_domain(tiny, tmp_path):
  records_root, export = tiny
  out = tmp_path / "a" / "eval.json"
  args = ["--config", DEMO_SMOKE, f"--config.data.records_root={records_root}",
          "--model_dir", str(export), "--sources", "glyphs,omniglot",
          "--num_episodes", "6", "--chunk_size", "4",
          "--reference", "ctx_simclr_eps_aug"]
  proc = _eval(*args, "--output", str(out))
  # omniglot has no records here: reported (path named), glyphs still done.
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert str(pathlib.Path(records_root) / "omniglot") in proc.stdout
  assert "glyphs: 4/6 episodes" in proc.stdout
  assert "glyphs: 6/6 episodes" in proc.stdout and "ETA" in proc.stdout
  result = json.loads(out.read_text())
  glyphs = result["results"]["glyphs"]
  assert glyphs["num_episodes"] == 6 and 0 <= glyphs["mean"] <= 1
  assert "not found" in result["results"]["omniglot"]["error"]
  assert result["reference"]["accuracy"] == {"omniglot": 82.21}
  assert result["reference"]["ci95"] == {"omniglot": 1.0}
  assert "Leaderboard" in result["reference"]["source"]
  assert "ref. = CTX+SimCLR Eps+Aug (paper); source: " in proc.stdout
  csv_text = out.with_suffix(".csv").read_text()
  assert csv_text.startswith("source,accuracy_pct,ci95_pct")
  assert "omniglot,,,,82.21,records of source 'omniglot' not found" in (
      csv_text)
  assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
  episodes = json.loads(out.with_suffix(".episodes.json").read_text())
  accs = episodes["sources"]["glyphs"]["accuracies"]
  assert len(accs) == 6
  assert episodic.summarize(accs).as_dict() == glyphs

  # A second evaluation elsewhere, interrupted after its first chunk: it
  # resumes at episode 4 and reproduces the first run's numbers exactly.
  out_b = tmp_path / "b" / "eval.json"
  out_b.parent.mkdir()
  episodes["sources"]["glyphs"]["accuracies"] = accs[:4]
  out_b.with_suffix(".episodes.json").write_text(json.dumps(episodes))
  proc = _eval(*args[:-8], "--sources", "glyphs", "--num_episodes", "6",
               "--output", str(out_b))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resuming, 4/6 episodes already done" in proc.stdout
  assert json.loads(out_b.read_text())["results"]["glyphs"] == glyphs
  resumed = json.loads(out_b.with_suffix(".episodes.json").read_text())
  assert resumed["sources"]["glyphs"]["accuracies"] == accs


def test_ctx_eval_on_fixture_records_official_episodes(shared_dir, tmp_path):
  """Variable-way, variable-shot test episodes of the official records."""
  out = tmp_path / "fixture.json"
  proc = _eval("--config", str(REPO / "experiments" / "ctx_ilsvrc.py"),
               "--config.data.records_root="
               f"{shared_dir / 'fixtures' / 'md_records'}",
               "--config.data.image_size=16", "--model", "pixels",
               "--sources", "omniglot,dtd,aircraft", "--num_episodes", "2",
               "--nochart", "--output", str(out))
  assert proc.returncode == 1, proc.stderr[-3000:]
  rows = json.loads(out.read_text())["results"]
  for source in ("omniglot", "dtd"):
    assert rows[source]["num_episodes"] == 2, rows
  assert "md_records/aircraft is not a directory" in rows["aircraft"]["error"]
  assert not out.with_suffix(".png").exists()


def test_test_split_too_small_is_reported(shared_dir):
  config = _config(shared_dir / "fixtures" / "md_records")
  config.data.eval_episode = common.episode_config(min_ways=8)
  with pytest.raises(ValueError, match="min_ways=8.*has only 7 classes"):
    evaluate.source_accuracies(None, config, mesh_lib.make_mesh(1), "TEST",
                               "dtd", 2, seed=0)


def test_reference_row_matches_the_config():
  import importlib  # pylint: disable=g-import-not-at-top

  from ctx_jax.eval import references  # pylint: disable=g-import-not-at-top
  get = lambda name, arg=None: importlib.import_module(
      f"experiments.{name}").get_config(arg)
  pick = lambda config, **kw: getattr(
      references.for_config(config, **kw), "name", None)
  assert pick(get("ctx_ilsvrc")) == "ctx"
  assert pick(get("protonet_ilsvrc")) == "protonet_large"
  assert pick(get("ctx_simclr")) == "ctx_simclr_eps"
  assert pick(get("ctx_simclr", "bohb")) == "ctx_simclr_eps_aug"
  assert pick(get("ctx_all")) is None  # No train-on-all row for CTX.
  assert pick(get("demo")) is None
  assert pick(get("demo"), imported=True) == "leaderboard"
  # Every row states its source; rows without numbers say why.
  for ref in references.REFERENCES.values():
    assert ref.source
    if ref.available:
      assert set(ref.accuracy) == set(ref.ci95) == set(eval_main.ALL_SOURCES)
    else:
      assert "not available" in ref.source
  assert references.REFERENCES["leaderboard"].accuracy == eval_main.PAPER_CTX
  assert references.choose("none", get("ctx_ilsvrc")) is None
  with pytest.raises(ValueError, match="unknown --reference"):
    references.choose("ctx_typo", get("ctx_ilsvrc"))


def test_ctx_eval_of_a_run_dir_uses_its_best_model(tmp_path, tiny):
  _, export = tiny
  run = tmp_path / "run"
  (run / "best").mkdir(parents=True)
  for f in export.iterdir():
    target = run / "best" / f.name
    if f.is_dir():
      import shutil  # pylint: disable=g-import-not-at-top
      shutil.copytree(f, target)
    else:
      target.write_bytes(f.read_bytes())
  (run / "best" / "valid.json").write_text('{"step": 7, "accuracy": 0.5}')
  model_dir, info = eval_main.resolve_model_dir(str(run))
  assert model_dir == str(run / "best")
  assert info == {"selected": "best", "step": 7, "imported": False}
  assert eval_main.resolve_model_dir(str(export))[1]["selected"] == "given"
  with pytest.raises(FileNotFoundError, match="neither an export"):
    eval_main.resolve_model_dir(str(tmp_path))
