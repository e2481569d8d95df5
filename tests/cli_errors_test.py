"""Every console script, given bad input, says so in ONE line and exits 1.

A table of bad-input cases runs through the installed commands (subprocess,
as a user runs them): each must print exactly one `<command>: error: ...`
line, last on stderr, naming the culprit (file, key or flag), exit with
status 1, show no traceback (unless `--verbose`), and leave nothing behind:
no work dir or output created, nothing already written changed. `--help` of
every command describes the job and lists its flags with defaults, exit 0.
All cases fail at start-up; they run two at a time.
"""

import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys

from flax import nnx
import pytest

from ctx_jax import models
from ctx_jax.checkpoints import export
from experiments import demo
from tests import fakes

BIN = pathlib.Path(sys.executable).parent
REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = f"{REPO / 'experiments' / 'demo.py'}:smoke"
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
           JAX_NUM_CPU_DEVICES="1")
ENV.pop("XLA_FLAGS", None)

# id -> (command, args, substrings of the error line, paths that must not
# exist afterwards). `{name}` is replaced by the paths of the fixture.
CASES = {
    "train_unknown_config_key": (
        "ctx-train", ["--config", SMOKE, "--workdir", "{tmp}/w1",
                      "--config.optimizer.learning_rat=0.1"],
        ["'learning_rat'", "--config.optimizer.learning_rat",
         "learning_rate"], ["{tmp}/w1"]),
    "train_missing_records": (
        "ctx-train", ["--config", SMOKE, "--workdir", "{tmp}/w2",
                      "--config.data.records_root={tmp}/nowhere"],
        ["{tmp}/nowhere/glyphs"], ["{tmp}/w2"]),
    "train_unwritable_workdir": (
        "ctx-train", ["--config", SMOKE, "--workdir", "{blocker}/w",
                      "--config.data.records_root={data}"],
        ["not writable", "{blocker}/w"], []),
    "train_missing_config_file": (
        "ctx-train", ["--config", "{tmp}/nope.py", "--workdir", "{tmp}/w3"],
        ["{tmp}/nope.py"], ["{tmp}/w3"]),
    "train_bad_config_argument": (
        "ctx-train", ["--config", f"{REPO / 'experiments' / 'demo.py'}:hed=1",
                      "--workdir", "{tmp}/w4"], ["'hed'"], ["{tmp}/w4"]),
    "train_unknown_flag": (
        "ctx-train", ["--config", SMOKE, "--workdir", "{tmp}/w5",
                      "--num_stepz=3"], ["num_stepz"], ["{tmp}/w5"]),
    "train_missing_workdir_flag": (
        "ctx-train", ["--config", SMOKE], ["--workdir"], []),
    "train_hierarchy_with_several_sources": (
        "ctx-train", ["--config", f"{REPO / 'experiments' / 'ctx_all.py'}",
                      "--workdir", "{tmp}/w6",
                      "--config.data.train_episode."
                      "ignore_hierarchy_probability=0.5"],
        ["ignore_hierarchy_probability", "8 sources", "multisource"],
        ["{tmp}/w6"]),
    "train_corrupt_dataset_spec": (
        "ctx-train", ["--config", SMOKE, "--workdir", "{tmp}/w7",
                      "--config.data.records_root={badspec}"],
        ["{badspec}/glyphs/dataset_spec.json", "not valid JSON"],
        ["{tmp}/w7"]),
    "train_truncated_test_class_file": (
        # Found at start-up, not after training: nothing is created.
        "ctx-train", ["--config", SMOKE, "--workdir", "{tmp}/w10",
                      "--config.data.records_root={badtest}"],
        ["{badtest}/glyphs/15.tfrecords"], ["{tmp}/w10"]),
    "train_init_from_not_an_export": (
        "ctx-train", ["--config", SMOKE, "--workdir", "{tmp}/w9",
                      "--config.data.records_root={data}",
                      "--config.init_from={empty}"],
        ["config.init_from={empty}", "not an exported model"], ["{tmp}/w9"]),
    "eval_missing_model_dir": (
        "ctx-eval", ["--config", SMOKE, "--model_dir", "{tmp}/nomodel"],
        ["{tmp}/nomodel"], []),
    "eval_not_an_export": (
        "ctx-eval", ["--config", SMOKE, "--model_dir", "{empty}"],
        ["{empty}", "neither an export"], []),
    "eval_corrupt_export": (
        "ctx-eval", ["--config", SMOKE, "--config.data.records_root={data}",
                     "--model_dir", "{bad_export}", "--output",
                     "{tmp}/e/out.json"],
        ["cannot load the exported model", "{bad_export}"], ["{tmp}/e"]),
    "eval_unknown_reference": (
        "ctx-eval", ["--config", SMOKE, "--model", "pixels",
                     "--reference=ctx_typo"], ["--reference", "ctx_typo"],
        []),
    "eval_bad_output_suffix": (
        "ctx-eval", ["--config", SMOKE, "--model", "pixels", "--output",
                     "{tmp}/out.txt"], ["--output", ".json"], []),
    "demo_unknown_method": (
        "ctx-demo", ["--workdir", "{tmp}/d1", "--methods", "ctx,bogus"],
        ["bogus", "--methods"], ["{tmp}/d1"]),
    "demo_unwritable_data_dir": (
        "ctx-demo", ["--workdir", "{tmp}/d2", "--data_dir",
                     "{blocker}/glyphs"], ["{blocker}/glyphs"],
        ["{tmp}/d2"]),
    "make_demo_data_too_few_classes": (
        "ctx-make-demo-data", ["--output_dir", "{tmp}/m1", "--num_classes",
                               "2"], ["2 classes"], ["{tmp}/m1"]),
    "make_demo_data_existing_folder": (
        "ctx-make-demo-data", ["--output_dir", "{keep}"],
        ["{keep}", "not empty"], []),
    "make_demo_data_bad_flag_value": (
        "ctx-make-demo-data", ["--output_dir", "{tmp}/m2", "--num_classes",
                               "many"], ["--num_classes", "many"],
        ["{tmp}/m2"]),
    "attention_missing_model_dir": (
        "ctx-attention", ["--model_dir", "{tmp}/nomodel", "--records",
                          "{data}/glyphs", "--output", "{tmp}/att"],
        ["{tmp}/nomodel"], ["{tmp}/att"]),
    "episodes_missing_spec": (
        "md-episodes", ["{tmp}/nospec"], ["{tmp}/nospec"], []),
    "episodes_corrupt_spec": (
        "md-episodes", ["{badspec}/glyphs", "--output", "{tmp}/x.json"],
        ["{badspec}/glyphs/dataset_spec.json", "not valid JSON"],
        ["{tmp}/x.json"]),
    "episode_grid_truncated_records": (
        "md-episode-grid", ["{badrec}/glyphs", "--output", "{tmp}/g.png",
                            "--image_size", "16"],
        ["{badrec}/glyphs/", ".tfrecords", "truncated"], ["{tmp}/g.png"]),
    "import_missing_checkpoint": (
        "ctx-import-official", ["{tmp}/nockpt/model.ckpt", "{tmp}/i1"],
        ["{tmp}/nockpt/model.ckpt"], ["{tmp}/i1"]),
    "import_corrupt_checkpoint": (
        "ctx-import-official", ["{garbage}/model.ckpt", "{tmp}/i2"],
        ["cannot read a TF checkpoint", "{garbage}/model.ckpt"],
        ["{tmp}/i2"]),
    "import_existing_output": (
        "ctx-import-official", ["{garbage}/model.ckpt", "{keep}"],
        ["{keep}", "already exists"], []),
    "run_episode_missing_model": (
        "ctx-run-episode", ["--model_dir", "{tmp}/nomodel", "--episode",
                            "{tmp}/ep.npz", "--output", "{tmp}/o1.npz"],
        ["{tmp}/nomodel"], ["{tmp}/o1.npz"]),
    "run_episode_missing_episode": (
        "ctx-run-episode", ["--model_dir", "{export}", "--episode",
                            "{tmp}/noep.npz", "--output", "{tmp}/o2.npz"],
        ["{tmp}/noep.npz"], ["{tmp}/o2.npz"]),
}
# Help of the absl commands (their flag registries cannot share a process).
HELP = {"ctx-train": ["--workdir", "--config", "--[no]verbose", "valid"],
        "ctx-eval": ["--model_dir", "--reference", "--[no]verbose", "best"]}
VERBOSE_CASE = ("ctx-train", ["--config", SMOKE, "--workdir", "{tmp}/w8",
                              "--config.train.num_stepz=1", "--verbose"])


def _fill(text, paths):
  return text.format(**paths)


def _make_inputs(tmp: pathlib.Path) -> dict[str, str]:
  """Tiny data, corrupt copies, a tiny export and files not to lose."""
  data = fakes.make_tiny_demo(tmp / "data")
  badrec = tmp / "badrec"
  shutil.copytree(data, badrec / "glyphs")
  for f in (badrec / "glyphs").glob("*.tfrecords"):  # Cut off half-way.
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  badtest = tmp / "badtest"  # Only the last class (a test class) cut.
  shutil.copytree(data, badtest / "glyphs")
  last = badtest / "glyphs" / "15.tfrecords"
  last.write_bytes(last.read_bytes()[:last.stat().st_size // 2])
  badspec = tmp / "badspec"
  (badspec / "glyphs").mkdir(parents=True)
  (badspec / "glyphs" / "dataset_spec.json").write_text('{"name": ')
  config = demo.get_config("smoke")
  exported = export.export_model(
      tmp / "export", models.build_model(config.model, rngs=nnx.Rngs(0)),
      config.model)
  bad_export = tmp / "bad_export"
  shutil.copytree(exported, bad_export)
  for f in (bad_export / export.STATE_DIR).rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[:7])  # Truncated state.
  garbage = tmp / "garbage"
  garbage.mkdir()
  (garbage / "model.ckpt.index").write_bytes(b"not a checkpoint index")
  (garbage / "model.ckpt.data-00000-of-00001").write_bytes(b"\0" * 64)
  (tmp / "empty").mkdir()
  (tmp / "keep").mkdir()
  (tmp / "keep" / "precious.txt").write_text("precious")
  (tmp / "blocker").write_text("not a directory")
  return {"tmp": str(tmp), "data": str(data.parent), "badrec": str(badrec),
          "badtest": str(badtest),
          "badspec": str(badspec), "export": str(exported),
          "bad_export": str(bad_export), "garbage": str(garbage),
          "empty": str(tmp / "empty"), "keep": str(tmp / "keep"),
          "blocker": str(tmp / "blocker")}


def _run(command, args, cwd):
  return subprocess.run([str(BIN / command), *args], cwd=cwd, env=ENV,
                        capture_output=True, text=True, timeout=300,
                        check=False)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
  """Runs every case (and the help and verbose runs) once, two at a time."""
  tmp = tmp_path_factory.mktemp("cli")
  paths = _make_inputs(tmp)
  jobs = {name: (cmd, [_fill(a, paths) for a in args])
          for name, (cmd, args, _, _) in CASES.items()}
  jobs |= {f"help {cmd}": (cmd, ["--help"]) for cmd in HELP}
  jobs["verbose"] = (VERBOSE_CASE[0], [_fill(a, paths)
                                       for a in VERBOSE_CASE[1]])
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {name: pool.submit(_run, cmd, args, tmp)
               for name, (cmd, args) in jobs.items()}
    return paths, {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clear_line(ran, case):
  paths, results = ran
  command, _, expected, absent = CASES[case]
  proc = results[case]
  assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr + proc.stdout
  errors = [l for l in proc.stderr.splitlines() if "error:" in l]
  assert len(errors) == 1, proc.stderr
  line = errors[0]
  assert proc.stderr.rstrip("\n").splitlines()[-1] == line
  assert line.startswith(f"{command}: error: "), line
  for text in expected:
    assert _fill(text, paths) in line, (text, line)
  for path in absent:
    assert not os.path.exists(_fill(path, paths)), path
  # Nothing already written is lost.
  keep = pathlib.Path(paths["keep"])
  assert os.listdir(keep) == ["precious.txt"]
  assert (keep / "precious.txt").read_text() == "precious"
  assert pathlib.Path(paths["blocker"]).read_text() == "not a directory"


def test_verbose_adds_the_traceback(ran):
  _, results = ran
  proc = results["verbose"]
  assert proc.returncode == 1
  assert "Traceback" in proc.stderr
  last = proc.stderr.rstrip("\n").splitlines()[-1]
  assert last.startswith("ctx-train: error: unknown config key 'num_stepz'")


@pytest.mark.parametrize("command", sorted(HELP))
def test_absl_help_is_short_and_exits_0(ran, command):
  _, results = ran
  proc = results[f"help {command}"]
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert out.startswith(f"{command}: ")  # What the job is, first.
  for text in HELP[command]:
    assert text in out, text
  assert "(default:" in out
  # Its own flags only (absl's --helpshort), not JAX's or absl's.
  assert "--jax_" not in out and "--logtostderr" not in out
  assert len(out.splitlines()) < 120  # --helpfull: several hundred.


@pytest.mark.parametrize("module, entry, flags", [
    ("ctx_jax.demo.run", "parse_args", ["--workdir", "--steps", "--methods"]),
    ("ctx_jax.demo.dataset", "main",
     ["--output_dir", "--num_classes", "--seed"]),
    ("meta_dataset_pipeline.episodes_cli", "main",
     ["--num_episodes", "--min_ways", "--ignore_hierarchy_probability"]),
    ("meta_dataset_pipeline.episode_grid", "main",
     ["--output", "--image_size", "--md_augmentation"]),
    ("ctx_jax.checkpoints.official_cli", "run", ["--max_stride", "--dtype"]),
    ("ctx_jax.checkpoints.official_cli", "run_episode_main",
     ["--model_dir", "--episode", "--gradients"]),
    ("ctx_jax.eval.attention_main", "main",
     ["--model_dir", "--records", "--queries", "--positions", "--grid"]),
])
def test_argparse_help_lists_every_flag_with_its_default(module, entry, flags,
                                                         capsys):
  import importlib  # pylint: disable=g-import-not-at-top
  fn = getattr(importlib.import_module(module), entry)
  with pytest.raises(SystemExit) as e:
    fn(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "--verbose" in out
  for flag in flags:
    assert flag in out, flag
  # Every option has a description, and every option with a value shows
  # its default.
  blocks, current = [], None
  for line in out.splitlines():
    if line.startswith("  -"):
      current = [line.strip()]
      blocks.append(current)
    elif current is not None and line.startswith("    "):
      current.append(line.strip())
    else:
      current = None
  assert len(blocks) >= len(flags) + 2
  for block in blocks:
    signature, _, described = block[0].partition("  ")
    described = " ".join([described.strip()] + block[1:]).strip()
    assert described, block
    takes_value = signature.split(",")[-1].strip().count(" ") > 0
    if takes_value:
      assert "default" in described, block
