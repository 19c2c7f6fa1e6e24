"""Sharded and multi-process training give the single-device result; failures end runs, not hang them.

Each case runs in subprocesses: the device count of a JAX process is fixed at start.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import chex
import numpy as np
import pytest
from conftest import cpu_env

from train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]

SHARDED_VS_SINGLE = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp, numpy as np
    from rocoft_jax import sharding
    from train import methods, models, step as step_lib
    from train.distributed import to_global, batch_to_global

    preset, loss_kind, attention = sys.argv[1:4]
    head = "causal-lm" if loss_kind == "causal-lm" else "sequence-classification"
    overrides = {} if head == "causal-lm" else {"num_labels": 2, "hidden_dropout_prob": 0.0,
                                                "attention_probs_dropout_prob": 0.0}
    config = models.preset_config(preset, **overrides)
    model, params = models.random_model(config, head, "fp32", seed=0)
    method = methods.build_method("rocoft", params, rank=3, mode="row")
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(3, config.vocab_size, (8, 16)).astype(np.int32),
             "attention_mask": np.ones((8, 16), np.int32)}
    batch["attention_mask"][::2, 12:] = 0
    if loss_kind == "classification":
        batch["labels"] = rng.integers(0, 2, (8,)).astype(np.int32)

    def run(mesh):
        trainable, frozen = method.split(params)
        tx, _ = step_lib.make_optimizer(1e-2, 10, 0, 0.01, "constant")
        state, sh = step_lib.init_sharded_state(trainable, tx, 0, mesh, method.mask.family, frozen)
        frozen = to_global(frozen, sh.frozen)
        train_fn, _ = step_lib.compile_steps(model, method, tx, loss_kind, sh, attention=attention)
        text = train_fn.lower(state, frozen, batch_to_global(batch, sh.batch, 8)).as_text()
        heads_layout = sum('sdy.sharding_constraint' in line and '[{"data", "fsdp"}, {}, {"tensor"}, {}]>' in line
                           for line in text.splitlines())
        per_shard = text.count("sdy.manual_computation")  # kernels run per shard (rocoft_jax.fast.gelu)
        losses = []
        for _ in range(3):
            state, m = train_fn(state, frozen, batch_to_global(batch, sh.batch, 8))
            losses.append(float(m["loss"]))
        return losses, jax.tree.map(np.asarray, state.trainable), train_fn._cache_size(), heads_layout, per_shard

    single, t1, _, _, _ = run(sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    mesh = sharding.make_mesh(sharding.parse_mesh("data=2,fsdp=2,tensor=2", 8))
    sharded, t8, compiles, heads_layout, per_shard = run(mesh)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(t1), jax.tree.leaves(t8)))
    print(json.dumps({"single": single, "sharded": sharded, "max_param_diff": diff, "compiles": compiles,
                      "heads_layout": heads_layout, "per_shard": per_shard, "layers": config.num_hidden_layers}))
""")


def python(*args: str, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**cpu_env(), **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# The fused cases take the GPU default path (cuDNN falls back to XLA on CPU, after the same layout
# constraints): cuDNN's partitioner refuses q, k and v laid out differently, as fsdp gave them, and the
# GELU kernel, which has no partitioning rule, runs per shard. The encoder on that path runs by default;
# the plain path and the causal LM under -m slow.
@pytest.mark.parametrize(
    "preset, loss, attention",
    [
        pytest.param("tiny", "classification", "plain", marks=pytest.mark.slow),
        ("tiny", "classification", "cudnn-lengths"),
        pytest.param("tiny-llama", "causal-lm", "cudnn-lengths", marks=pytest.mark.slow),
    ],
)
def test_sharded_mesh_matches_single_device(preset, loss, attention):
    proc = python("-c", SHARDED_VS_SINGLE, preset, loss, attention)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["sharded"], out["single"], atol=1e-5)
    assert out["max_param_diff"] < (1e-5 if attention == "plain" else 3e-5)  # fused: other summation order
    assert out["compiles"] == 1  # no step recompiles after the first
    if attention != "plain":  # q, k, v of every layer: batch over data and fsdp, heads over tensor
        assert out["heads_layout"] >= 3 * out["layers"]
    # GELU forward and backward of every layer run per shard; Llama has none.
    assert out["per_shard"] == (2 * out["layers"] if (preset, attention) == ("tiny", "cudnn-lengths") else 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RUN = [
    "-m",
    "train.run",
    "--max-steps",
    "6",
    "--save-every",
    "3",
    "--log-every",
    "1",
    "--limit-eval",
    "96",
    "--bucket",
    "false",
    "--batch-size",
    "16",
]


def launch_pair(out: Path, extra: list[str] = (), timeout_s: int = 20) -> list[subprocess.Popen]:
    port = free_port()
    env = cpu_env(2)
    return [
        subprocess.Popen(
            [
                sys.executable,
                *RUN,
                "--output-dir",
                str(out),
                "--coordinator-address",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--heartbeat-timeout",
                str(timeout_s),
                *extra,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp") / "run"
    procs = launch_pair(out)
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return out, outputs


def test_two_processes_equal_one_process(tmp_path, two_process_run):
    out2, outputs = two_process_run
    out1 = tmp_path / "one"
    proc = python(*RUN, "--output-dir", str(out1), env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r1 = json.loads((out1 / "results.json").read_text())
    r2 = json.loads((out2 / "results.json").read_text())
    assert r1["metrics"] == pytest.approx(r2["metrics"], abs=1e-6)
    losses = lambda out: [
        r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    np.testing.assert_allclose(losses(out2), losses(out1), atol=1e-5)
    chex.assert_trees_all_close(ckpt.load(out2 / "checkpoints")[1], ckpt.load(out1 / "checkpoints")[1], atol=1e-5)
    assert "eval @ step 6" in outputs[0][0] and "eval @ step" not in outputs[1][0]  # only process 0 prints


@pytest.mark.slow  # CI time on 2 cores; two processes train by default
def test_two_process_checkpoint_resumes_in_one_process(tmp_path, two_process_run):
    import shutil

    out2, _ = two_process_run
    out = tmp_path / "resumed"
    shutil.copytree(out2, out)
    shutil.rmtree(out / "checkpoints" / "6")  # keep the step-3 checkpoint written by both processes
    proc = python(*RUN, "--output-dir", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 3" in proc.stdout
    meta, trainable = ckpt.load(out / "checkpoints")
    assert meta["process_count"] == 1
    chex.assert_trees_all_close(trainable, ckpt.load(out2 / "checkpoints")[1], atol=1e-5)


@pytest.mark.slow  # 20 s of heartbeat timeout; the two-process tests above run by default
def test_dead_process_ends_the_run_with_an_error(tmp_path):
    out = tmp_path / "dies"
    procs = launch_pair(out, ["--max-steps", "100000", "--save-every", "0"], timeout_s=5)
    start = time.time()
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert time.time() - start < 300 and procs[0].poll() is None, procs[0].communicate()
        time.sleep(0.5)
    procs[1].kill()
    _, err = procs[0].communicate(timeout=120)  # bounded: heartbeats time out after 5 s
    assert procs[0].returncode != 0
    assert any(word in err.lower() for word in ("heartbeat", "unavailable", "connection", "gloo", "terminated"))


def test_unmatched_path_is_an_error():
    from jax.sharding import AbstractMesh

    from rocoft_jax import sharding

    params = {"encoder": {"layer": {"0": {"mystery": {"kernel": np.zeros((4, 4))}}}}}
    with pytest.raises(ValueError, match="no partition rule matches 'encoder/layer/0/mystery/kernel'"):
        sharding.partition_specs(params, "bert", AbstractMesh((1, 2, 2), sharding.AXES))


@pytest.mark.slow
def test_print_sharding_lists_every_param_with_its_spec(tmp_path):
    proc = python(
        "-m",
        "train.run",
        "--mesh",
        "data=2,fsdp=2,tensor=2",
        "--print-sharding",
        "true",
        "--max-steps",
        "1",
        "--batch-size",
        "8",
        "--limit-eval",
        "8",
        "--output-dir",
        str(tmp_path / "run"),
        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if " P(" in line}
    query = "roberta/encoder/layer/0/attention/self/query/kernel"
    assert query in lines and "tensor" in lines[query] and "fsdp" in lines[query]
    assert any(path.startswith("rocoft/") for path in lines)  # the trained slices too (replicated)
