"""train.score against the original authors' evaluation logs: every logged prediction and accuracy, reproduced."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from train import score
from train.llm_data import get_task, load_records

REPO = Path(__file__).resolve().parents[2]
LLM_ADAPTERS = REPO.parent / "shared" / "data" / "llm-adapters"
LOGS = LLM_ADAPTERS / "reference_outputs"
LOG_FILES = sorted(LOGS.glob("*.txt"))
# the logs name tasks by their last "_" field: LLM-Adapters folder names, except these
_LOG_TASK_NAMES = {"arcc": "arc-c", "arce": "arc-e"}


def task_of(log: Path) -> str:
    last = log.stem.rsplit("_", 1)[1]
    return get_task(_LOG_TASK_NAMES.get(last, last)).name  # an unknown name fails the test: add it above


def read(log: Path) -> str:
    with open(log, encoding="utf-8", newline="") as f:  # keep the scripts' "\r"
        return f.read()


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (real data lives beside the repo)")
    return path


@functools.cache
def score_cli(log: Path) -> dict:
    """The real CLI's JSON line; cached, as several tests read the same log."""
    proc = subprocess.run([sys.executable, "-m", "train.score", "--log", str(log), "--task", task_of(log)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def logged_final(log: Path) -> tuple[int, float]:
    """``(correct, accuracy)`` of the log's last running line, read independently of train.score."""
    last = re.findall(r"test:\d+/\d+ \| accuracy (\d+)  (\S+)", read(log))[-1]
    return int(last[0]), float(last[1])


@pytest.mark.parametrize("log", LOG_FILES or [pytest.param(LOGS, marks=pytest.mark.skip(reason=f"{LOGS} is absent"))],
                         ids=lambda p: p.stem)  # fmt: skip
def test_cli_reproduces_every_logged_prediction_and_the_accuracy(log):
    result = score_cli(log)
    correct, accuracy = logged_final(log)
    assert result["prediction_mismatches"] == 0
    assert result["accuracy"] == accuracy == result["logged_accuracy"]
    assert result["correct"] == correct
    test_set = load_records(need(LLM_ADAPTERS / "dataset" / get_task(task_of(log)).folder / "test.json"))
    assert result["n"] == len(test_set)


@pytest.mark.parametrize("name, percent", [("llama_7b_lora_commonsense_boolq", 68.87),
                                           ("llama_7b_lora_math_all_r32_AddSub", 83.29),
                                           ("llama_7b_lora_math_all_r32_AQuA", 18.90)])  # fmt: skip
def test_published_accuracies(name, percent):
    assert round(100 * score_cli(need(LOGS / f"{name}.txt"))["accuracy"], 2) == percent


@pytest.mark.parametrize("log", LOG_FILES or [pytest.param(LOGS, marks=pytest.mark.skip(reason=f"{LOGS} is absent"))],
                         ids=lambda p: p.stem)  # fmt: skip
def test_parsed_responses_are_exactly_what_was_printed(log):
    """Each example, rebuilt from its test record and our parse, is in the log in order: the response boundaries
    are right, multi-line responses are whole, and the labels are the test set's answers."""
    spec = get_task(task_of(log))
    text = read(log)
    examples, _ = score.parse_log(text, spec.kind)
    records = load_records(need(LLM_ADAPTERS / "dataset" / spec.folder / "test.json"))
    assert len(examples) == len(records)
    position = 0
    for example, rec in zip(examples, records, strict=True):
        head = rec["instruction"] if spec.kind == "commonsense" else " \n---------------"
        label = rec["answer"] if spec.kind != "math" else str(float(rec["answer"]))
        printed = f"{head}\n{example.response}\nprediction: {example.prediction}\nlabel: {label}\n"
        position = text.index(printed, position) + len(printed)
    if spec.kind != "commonsense":  # math responses span lines: the check above covered multi-line ones
        assert any("\n" in e.response for e in examples)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = score.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_missing_log_is_a_one_line_error(capsys, tmp_path):
    code, out, err = run_main(capsys, "--log", str(tmp_path / "nope.txt"), "--task", "boolq")
    assert code == 2 and out == ""
    expected = f"{tmp_path / 'nope.txt'} does not exist; pass --log pointing at an LLM-Adapters evaluation log"
    assert err == f"error: {expected}\n"


def test_unknown_task_is_a_one_line_error(capsys, tmp_path):
    code, out, err = run_main(capsys, "--log", str(tmp_path / "nope.txt"), "--task", "sst2")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: unknown task 'sst2'; valid tasks: boolq, piqa, siqa")


def test_log_of_another_task_kind_is_an_error(capsys):
    log = need(LOGS / "llama_7b_lora_math_all_r32_AddSub.txt")
    code, _, err = run_main(capsys, "--log", str(log), "--task", "boolq")
    assert code == 2 and "no response after its instruction's 'Answer format:' line; does --task match" in err


def test_unfinished_log_is_an_error(capsys, tmp_path):
    text = read(need(LOGS / "llama_7b_lora_math_all_r32_AddSub.txt"))
    cut = tmp_path / "cut.txt"
    cut.write_text(text[: text.index("test:3/395")] + "test:3/395 | accuracy 3  1.0\n", encoding="utf-8", newline="")
    code, _, err = run_main(capsys, "--log", str(cut), "--task", "addsub")
    assert code == 2 and "the log stops at test:3/395; score the log of a finished run" in err


def test_mismatches_are_listed_before_the_json_line(capsys, tmp_path):
    """A log whose printed prediction disagrees with its response: reported, and rescored from the response."""
    text = read(need(LOGS / "llama_7b_lora_commonsense_boolq.txt"))
    logged = "prediction: false\nlabel: false\n"
    first = text.index(logged)
    edited = tmp_path / "edited.txt"
    edited.write_text(text[:first] + logged.replace("false", "true", 1) + text[first + len(logged) :],
                      encoding="utf-8", newline="")  # fmt: skip
    code, out, _ = run_main(capsys, "--log", str(edited), "--task", "boolq")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "example 1: logged prediction 'true', ours 'false'"
    assert json.loads(lines[-1])["prediction_mismatches"] == 1 and len(lines) == 2
