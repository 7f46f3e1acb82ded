"""Every command the README shows runs, so the front door cannot drift from the code.

The README's shell code blocks (each line, `&&` parts apart, `\\` continuations joined, trailing
`# comments` dropped), its inline `python -m ...` and launcher commands, and its Python blocks
are collected, and each must have an entry in COMMANDS saying how it is checked here:
  Run       run a variant of it: the same command, made cheap where the documented one is long
            (`:runlocal`, `--quick`, `--stop_after=2`, small sizes; `why` says what changed),
            several devices simulated through XLA_FLAGS; exit 0 and the stated outputs
  ByFixture the module fixture of that name runs it once (a trained workdir, a converted
            checkpoint, an index) for the commands that read its output
  Covered   an existing test runs it (or the same code path through the CLI): it must exist
  Mention   a bare command name in prose; the full form is another README command
  Skip      cannot run here (network, a TPU slice, a SLURM cluster, the suite itself)
A README command without an entry, or an entry whose command left the README, fails.
"""

import dataclasses
import json
import os
import re
import shlex
import sys

import numpy as np
import pytest

import procs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")


@dataclasses.dataclass(frozen=True)
class Run:
  args: str  # {tmp}: this test's directory; {work}, {oscar}, {index}: module fixtures
  why: str = ""  # how the variant differs from the README's command
  files: tuple = ()  # paths (with placeholders) that must exist afterwards
  says: str = ""  # text that must appear in stdout + stderr
  devices: int = 0  # simulated CPU devices (XLA_FLAGS)
  inputs: tuple = ()  # (name, text) files written into {tmp} first
  xfail: str = ""
  omits: tuple = ()  # flags of the README command the variant leaves out (`why` says where)


@dataclasses.dataclass(frozen=True)
class ByFixture:
  fixture: str
  why: str = ""


@dataclasses.dataclass(frozen=True)
class Covered:
  test: str  # tests/FILE.py::NAME
  why: str = ""


@dataclasses.dataclass(frozen=True)
class Mention:
  of: str


@dataclasses.dataclass(frozen=True)
class Skip:
  reason: str


RUNLOCAL = "python -m rerank.train --config=configs/demo.py:runlocal --workdir=DIR"
NETWORK = "installs packages from the network; CI installs them before running the tests"
SLICE = "needs a Cloud TPU slice (TPU_NAME, ZONE, gcloud)"
SLURM = "needs a SLURM cluster (sbatch)"

COMMANDS = {
    # Quickstart
    "pip install -e .": Skip(NETWORK),
    "python -m rerank.train --config=configs/demo.py --workdir=workdirs/demo": ByFixture(
        "trained", "the 6-minute demo as its documented smoke variant `:runlocal`"),
    'pip install -e ".[test]"': Skip(NETWORK),
    "python -m pytest -q tests": Skip("the test suite this test is part of"),
    # Running a config
    "python -m rerank.train --config=configs/demo.py --workdir=DIR": ByFixture(
        "trained", "`:runlocal`"),
    RUNLOCAL: ByFixture("trained"),
    "python -m rerank.train --config=configs/demo.py:mode=separate --workdir=DIR": Run(
        "python -m rerank.train --config=configs/demo.py:runlocal,mode=separate "
        "--workdir={tmp}/w --stop_after=2", "`runlocal`, 2 steps", files=("{tmp}/w/checkpoints/2",)),
    "python -m rerank.train --config=configs/demo.py --workdir=DIR --config.total_steps=3000 "
    "--config.eval.k=50": Run(
        "python -m rerank.train --config=configs/demo.py:runlocal --workdir={tmp}/w "
        "--config.total_steps=3000 --config.eval.k=50 --stop_after=2", "`runlocal`, 2 of the steps",
        files=("{tmp}/w/checkpoints/2",)),
    "python -m rerank.evaluate --config=configs/demo.py --workdir=DIR": Run(
        "python -m rerank.evaluate --config=configs/demo.py:runlocal --workdir={work} "
        "--out={tmp}/eval", "the `:runlocal` workdir, results apart", says="| joint | RR |",
        files=("{tmp}/eval/results.json",)),
    # Pretrained checkpoints
    "python -m rerank.convert --family=oscar --src=DIR --dst=pretrained/oscar-base": ByFixture(
        "oscar", "a tiny random checkpoint in OSCAR's layout, written by the test"),
    "python -m rerank.train --config=configs/demo.py --workdir=DIR "
    "--config.init_from=pretrained/oscar-base": Covered(
        "tests/test_encode.py::test_train_cli_with_init_from", "`:runlocal,mode=be`, a converted "
        "checkpoint"),
    "python -m rerank.encode --checkpoint=pretrained/oscar-base --texts=captions.txt "
    "--out=emb.npy": Run(
        "python -m rerank.encode --checkpoint={oscar} --texts={tmp}/captions.txt "
        "--out={tmp}/emb.npy", "the tiny converted checkpoint", files=("{tmp}/emb.npy",),
        inputs=(("captions.txt", "a red metal cube\ntwo spheres\n"),)),
    # Running at scale
    # The sharding presets are covered where their step is checked against one device; the
    # trainer's CLI on a model-parallel mesh with rules from flags runs as the next entry.
    "python -m rerank.train --config=configs/demo.py:sharding=fsdp --workdir=DIR": Covered(
        "tests/test_sharding.py::test_steps_on_8_devices_equal_1_device",
        "the fsdp rules (`sharding=fsdp`, tests/test_validate.py) on 8 simulated devices"),
    "python -m rerank.train --config=configs/demo.py:sharding=tp --config.mesh.model=2 "
    "--workdir=DIR": Covered(
        "tests/test_sharding.py::test_steps_on_8_devices_equal_1_device",
        "the tp rules (`sharding=tp`, tests/test_sharding_rules.py) on a {data: 4, model: 2} mesh"),
    "python -m rerank.train --config=configs/demo.py --config.rules.embed=data "
    "--config.rules.mlp=model --config.mesh.model=2 --workdir=DIR": Run(
        "python -m rerank.train --config=configs/demo.py:runlocal --config.rules.embed=data "
        "--config.rules.mlp=model --config.mesh.model=2 --workdir={tmp}/w --stop_after=2",
        "`runlocal`, 2 steps, 4 simulated devices", devices=4, says="model: 2",
        files=("{tmp}/w/checkpoints/2",)),
    "launch/local_multiprocess.sh 2 python -m rerank.train --config=configs/demo.py:runlocal "
    "--workdir=DIR": Run(
        "launch/local_multiprocess.sh 2 python -m rerank.train --config=configs/demo.py:runlocal "
        "--workdir={tmp}/w --stop_after=2", "2 steps", files=("{tmp}/w/checkpoints/2",)),
    "launch/tpu_pod.sh run python -m rerank.train --config=... --workdir=gs://BUCKET/runs/DIR":
        Skip(SLICE),
    "WORKDIR=/mnt/runs/DIR CONFIG=configs/demo.py sbatch --nodes=4 launch/slurm.sbatch":
        Skip(SLURM),
    "python -m rerank.bench_train --out=bench.json": Run(
        "python -m rerank.bench_train --quick --sizes=tiny --out={tmp}/bench.json",
        "the documented CPU smoke run `--quick`, tiny encoder only", files=("{tmp}/bench.json",)),
    # Datasets
    "python -m rerank.data.prepare --dataset=NAME --source_dir=DIR --data_dir=DATA "
    "[--dtype=float16|float32]": Covered(
        "tests/test_prepare.py::test_cli_prints_one_json_line_and_one_error_line",
        "flickr30k_butd --dtype=float32 on a tiny release; every source in test_prepare.py"),
    "python -m rerank.data.benchmark": Run(
        "python -m rerank.data.benchmark --images=20 --steps=2 --batch=8", "20 images, 2 steps",
        says="batches/s"),
    # Search and index
    "python -m rerank.index --checkpoint=workdirs/demo --split=test --out=indexes/demo_test":
        ByFixture("index", "the `:runlocal` workdir"),
    'python -m rerank.search --index=indexes/demo_test --query="a red metal cube left of a '
    'sphere" --k=20 --rerank': Run(
        'python -m rerank.search --index={index} --query="a red metal cube left of a sphere" '
        "--k=20 --rerank", "the `:runlocal` index", says="a red metal cube left of a sphere"),
    # A pixel demo
    "python -m rerank.train --config=configs/demo_pixels.py --workdir=workdirs/demo_pixels": Covered(
        "tests/test_pixel_demo.py::test_runlocal_trains_and_evaluates_from_pixels",
        "its `:runlocal` variant (ViLT), trained and evaluated in process"),
    "python -m rerank.train --config=configs/demo_pixels.py:family=blip "
    "--workdir=workdirs/demo_pixels_blip": Covered(
        "tests/test_pixel_demo.py::test_runlocal_trains_and_evaluates_from_pixels",
        "its `:runlocal,family=blip` variant, trained and evaluated in process"),
    # Search a folder of photos
    "python -m rerank.convert --family=blip --src=HF_DIR --dst=blip_conv": Covered(
        "tests/test_blip.py::test_itc_and_itm_match_transformers", "its `hf` fixture converts a "
        "tiny random BlipForImageTextRetrieval with this command"),
    "python -m rerank.index --checkpoint=blip_conv --images=PHOTOS/ --out=INDEX": Covered(
        "tests/test_folder_search.py::test_index_skips_and_reports_unreadable_files",
        "a tiny trained ViLT, converted-checkpoint layout, over a folder of drawn photos"),
    'python -m rerank.search --index=INDEX --query="a dog catching a frisbee on the beach" --k=20 '
    "--rerank": Covered("tests/test_folder_search.py::test_search_command_prints_the_file",
                        "that folder index, --k=3"),
    "python -m rerank.bench --out=workdirs/bench_pixels --pixels=blip,vilt --noregions": Covered(
        "tests/test_folder_search.py::test_pixel_bench_times_ce_k_with_and_without_the_cache",
        "pixel_costs.measure at --pixel_model=tiny, what --pixels runs"),
    # Benchmark
    "python -m rerank.bench --out=workdirs/bench --quick": Covered(
        "tests/test_bench.py::test_bench_cli_writes_table_json_and_plot",
        "--sizes=300,2000 (below --quick's 1k-100k)"),
    "python -m rerank.bench --out=workdirs/bench": Covered(
        "tests/test_bench.py::test_bench_cli_writes_table_json_and_plot", "small --sizes"),
    "python -m rerank.bench --out=workdirs/bench --model=base --ce_max=64 --queries=100": Covered(
        "tests/test_bench.py::test_bench_cli_writes_table_json_and_plot", "the tiny encoder, "
        "small --sizes; the base encoder only adds minutes of CPU compile (--model is an enum)"),
    "python -m rerank.bench --out=workdirs/bench --model=base --sizes=1000 --ce_max=256": Covered(
        "tests/test_bench.py::test_bench_cli_writes_table_json_and_plot", "the tiny encoder, "
        "small --sizes, with the paper's cost tables (Tables 3 and 4) that this line is for"),
    # Status, Pretrained checkpoints and Reproducing (inline)
    "python -m rerank.export --workdir=workdirs/pretrain --dst=pretrained/synthetic_mini "
    "--which=last": Run(
        "python -m rerank.export --workdir={work} --dst={tmp}/exported --which=last",
        "the `:runlocal` workdir", files=("{tmp}/exported/model.json",)),
    "python -m rerank.export --workdir=DIR --dst=DST [--which=best|last] [--part=ce|be]": Run(
        "python -m rerank.export --workdir={work} --dst={tmp}/exported --which=best",
        "`--part` of a separate run: tests/test_export.py::test_export_of_a_separate_run_picks_the_part",
        files=("{tmp}/exported/model.json",), omits=("part",)),
    "python -m rerank.sibling_report --workdir=workdirs/demo --which=last": Run(
        "python -m rerank.sibling_report --workdir={work} --which=last", "the `:runlocal` workdir",
        says="| all |"),
    "python -m rerank.convert_benchmark": Run(
        "python -m rerank.convert_benchmark --format=safetensors", "safetensors only (no torch)",
        says="MiB"),
    "python -m rerank.reproduce --list": Covered(
        "tests/test_reproduce.py::test_reproduce_cli_lists_and_writes_atomically"),
    "python -m rerank.reproduce --table=flickr30k --workdirs=joint=workdirs/flickr30k_joint,...":
        Covered("tests/test_reproduce.py::test_reproduce_cli_lists_and_writes_atomically",
                "--table=coco1k --workdirs=joint=<a results.json>"),
    # Bare names in prose
    "python -m rerank.X": Mention(RUNLOCAL),
    "python -m rerank.train": Mention(RUNLOCAL),
    "python -m rerank.evaluate": Mention("python -m rerank.evaluate --config=configs/demo.py "
                                         "--workdir=DIR"),
    "python -m rerank.data.prepare": Mention(
        "python -m rerank.data.prepare --dataset=NAME --source_dir=DIR --data_dir=DATA "
        "[--dtype=float16|float32]"),
    # Python blocks (first line)
    "from configs import demo": Covered(
        "tests/test_train.py::test_train_and_evaluate_in_process_writes_results",
        "train_and_evaluate(demo.get_config('runlocal'), workdir) in process"),
    "from rerank.inference import Retriever": ByFixture("retriever_snippet"),
}


# ---- what the README shows --------------------------------------------------------------


def _blocks(text):
  return re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)


def readme_commands(text: str) -> list[str]:
  """Shell commands of the code blocks and inline spans, first lines of the Python blocks."""
  found = []
  for lang, body in _blocks(text):
    if lang == "python":
      found.append(body.strip().splitlines()[0])
      continue
    for line in body.replace("\\\n", " ").splitlines():
      line = re.sub(r"\s+#.*$", "", line).strip()
      found += [" ".join(part.split()) for part in line.split("&&") if part.strip()]
  prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
  for span in re.findall(r"`([^`]+)`", prose):
    span = " ".join(span.split())
    if "python -m " in span or re.match(r"^([A-Z_]+=\S+ )+\S", span):
      found.append(span)
  return list(dict.fromkeys(found))


def test_every_readme_command_has_an_entry():
  with open(README) as f:
    shown = readme_commands(f.read())
  missing = [c for c in shown if c not in COMMANDS]
  stale = [c for c in COMMANDS if c not in shown]
  assert not missing, f"README commands without an entry in COMMANDS: {missing}"
  assert not stale, f"COMMANDS entries no longer in the README: {stale}"


def test_references_resolve():
  for cmd, entry in COMMANDS.items():
    if isinstance(entry, Mention):
      assert entry.of in COMMANDS and not isinstance(COMMANDS[entry.of], Mention), cmd
    if isinstance(entry, Covered):
      path, name = entry.test.split("::")
      with open(os.path.join(REPO, path)) as f:
        assert re.search(rf"^def {name}\(", f.read(), re.M), f"{cmd}: {entry.test} not found"
    if isinstance(entry, ByFixture):
      assert entry.fixture in FIXTURES, cmd


def test_variants_keep_the_documented_flags():
  """A Run variant passes every flag and config argument of its README command (values may
  shrink), so the flags the README shows are the ones exercised."""
  for cmd, entry in COMMANDS.items():
    if not isinstance(entry, Run):
      continue
    for flag in re.findall(r"(?<!\S)--([\w.]+)", cmd):
      assert flag in entry.omits or re.search(rf"(?<!\S)--{re.escape(flag)}\b", entry.args), (
          cmd, flag)
    for config in re.findall(r"--config=\S+?:(\S+)", cmd):
      for arg in config.split(","):
        assert arg in entry.args, (cmd, arg)


# ---- running them -----------------------------------------------------------------------


def _env(devices=0, log_dir=None):
  # os.environ carries conftest.py's compilation cache: the runs compile alike programs.
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  if log_dir:  # launch/local_multiprocess.sh: the other processes' logs
    env["RERANK_LOG_DIR"] = log_dir
  if devices:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
  return env


def _run(command: str, devices=0, log_dir=None, timeout=480):
  argv = [sys.executable if a == "python" else a for a in shlex.split(command)]
  res = procs.run_group(argv, timeout, cwd=REPO, env=_env(devices, log_dir))
  assert res.returncode == 0, f"{command}\n{res.stdout[-1500:]}\n{res.stderr[-3000:]}"
  return res


@pytest.fixture(scope="module")
def trained(runlocal_run):
  """The README's runlocal command (conftest.py runs it once a session): (workdir, its output).

  The commands that read it write elsewhere (--out, --dst, {tmp})."""
  work, res = runlocal_run
  assert res.args[1:] == shlex.split(RUNLOCAL.replace("DIR", work))[1:]  # python = sys.executable
  with open(os.path.join(work, "results.json")) as f:
    methods = [row["method"] for row in json.load(f)["rows"]]
  assert methods == ["BE", "CE", "RR"]
  return work, res


def _write_tiny_oscar(src: str):
  """A random 2-layer checkpoint in OSCAR's layout (BERT keys + img_embedding), safetensors."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "metal", "cube", "two",
           "spheres"]
  h, mlp, layers, rng = 16, 32, 2, np.random.default_rng(0)
  shapes = {"embeddings.word_embeddings.weight": (len(vocab), h),
            "embeddings.position_embeddings.weight": (64, h),
            "embeddings.token_type_embeddings.weight": (2, h),
            "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
            "pooler.dense.weight": (h, h), "pooler.dense.bias": (h,),
            "img_embedding.weight": (h, 2054), "img_embedding.bias": (h,)}
  for i in range(layers):
    for name, shape in (("attention.self.query", (h, h)), ("attention.self.key", (h, h)),
                        ("attention.self.value", (h, h)), ("attention.output.dense", (h, h)),
                        ("intermediate.dense", (mlp, h)), ("output.dense", (h, mlp)),
                        ("attention.output.LayerNorm", (h,)), ("output.LayerNorm", (h,))):
      shapes[f"encoder.layer.{i}.{name}.weight"] = shape
      shapes[f"encoder.layer.{i}.{name}.bias"] = shape[:1]
  state = {f"bert.{k}": rng.normal(0, 0.1, s).astype(np.float32) for k, s in shapes.items()}
  os.makedirs(src)
  st_numpy.save_file(state, os.path.join(src, "model.safetensors"))
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump(dict(vocab_size=len(vocab), hidden_size=h, num_hidden_layers=layers,
                   num_attention_heads=2, intermediate_size=mlp, max_position_embeddings=64,
                   img_feature_dim=2054, img_feature_type="faster_r-cnn"), f)
  with open(os.path.join(src, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")


@pytest.fixture(scope="module")
def oscar(tmp_path_factory):
  """The README's convert command on a tiny OSCAR-layout checkpoint: (dst, output)."""
  root = tmp_path_factory.mktemp("oscar")
  _write_tiny_oscar(str(root / "src"))
  dst = str(root / "oscar-base")
  res = _run(f"python -m rerank.convert --family=oscar --src={root / 'src'} --dst={dst}")
  assert os.path.exists(os.path.join(dst, "model.json")), os.listdir(root)
  return dst, res


@pytest.fixture(scope="module")
def index(trained):
  """The README's index command over the trained workdir's test split: (index dir, output)."""
  out = os.path.join(os.path.dirname(trained[0]), "indexes", "demo_test")
  res = _run(f"python -m rerank.index --checkpoint={trained[0]} --split=test --out={out}")
  assert os.path.exists(os.path.join(out, "index.json")), res.stderr[-2000:]
  return out, res


@pytest.fixture(scope="module")
def retriever_snippet(index):
  """The README's Retriever block, run with the index path replaced."""
  with open(README) as f:
    block = next(b for lang, b in _blocks(f.read()) if "Retriever.load" in b)
  scope = {}
  exec(block.replace('"indexes/demo_test"', repr(index[0])), scope)  # pylint: disable=exec-used
  assert len(scope["hits"]) == 1 and len(scope["hits"][0]) == 20
  assert scope["emb"].shape[0] == 1 and np.allclose(np.linalg.norm(scope["emb"], axis=1), 1,
                                                    atol=1e-4)
  assert np.shape(scope["logits"]) == (1,) or np.size(scope["logits"]) == 1
  return scope, None


FIXTURES = ("trained", "oscar", "index", "retriever_snippet")


@pytest.mark.parametrize("command", [c for c, e in COMMANDS.items() if isinstance(e, ByFixture)])
def test_command_run_by_a_fixture(command, request):
  entry = COMMANDS[command]
  value, res = request.getfixturevalue(entry.fixture)
  assert value and (res is None or res.returncode == 0)


def _runs():
  for cmd, entry in COMMANDS.items():
    if isinstance(entry, Run):
      marks = [pytest.mark.xfail(strict=True, reason=entry.xfail)] if entry.xfail else []
      yield pytest.param(cmd, marks=marks, id=("launch_" if cmd.startswith("launch/") else "")
                         + re.sub(r"\W+", "_", cmd.split(" -m ")[-1])[:60])


@pytest.mark.parametrize("command", _runs())
def test_command_variant_runs(command, tmp_path, request):
  entry = COMMANDS[command]
  values = {"tmp": str(tmp_path)}
  for name in ("work", "oscar", "index"):
    if "{" + name + "}" in entry.args:
      values[name] = request.getfixturevalue("trained" if name == "work" else name)[0]
  for name, text in entry.inputs:
    (tmp_path / name).write_text(text)
  res = _run(entry.args.format(**values), devices=entry.devices, log_dir=str(tmp_path))
  if entry.says:
    assert entry.says in res.stdout + res.stderr, (res.stdout[-2000:], res.stderr[-2000:])
  for path in entry.files:
    assert os.path.exists(path.format(**values)), (path, os.listdir(tmp_path))
