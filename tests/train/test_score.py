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
from train.llm_data import TASKS, get_task, load_records

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
    examples, _ = score.parse_log(text, spec.name)
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


def first_records(task: str, n: int = 2) -> list[dict]:
    """The first ``n`` records of the task's test set (HellaSwag's folder holds only its first five)."""
    folder = LLM_ADAPTERS / "dataset" / get_task(task).folder
    path = next((p for p in (folder / "test.json", folder / "test_first5.json") if p.is_file()), None)
    if path is None:
        pytest.skip(f"{folder} has no test set (real data lives beside the repo)")
    return load_records(path)[:n]


def built_example(task: str, record: dict, right: bool) -> tuple[str, str, str]:
    """``(response, printed prediction, printed label)`` of a record: the right answer, or a wrong one whose
    response ends by repeating the instruction's last line (the first such line ends the instruction)."""
    spec = get_task(task)
    answer = record["answer"]
    if spec.kind == "math":
        value = float(answer) + (0 if right else 1)
        response = f"1. Start with the numbers of the question.\n\nTherefore, the answer is {value:g}.</s>"
        return response, str(value), str(float(answer))
    if spec.kind == "aqua":
        letter = answer if right else "ABCDE"[("ABCDE".index(answer) + 1) % 5]
        return f"The answer is ({letter}).\n\nSo the answer is {letter}.", letter, answer
    choices = record["instruction"].rsplit("Answer format: ", 1)[1].split("/")
    choice = answer if right else next(c for c in choices if c != answer)
    last_line = record["instruction"].rsplit("\n", 1)[-1]
    response = f"the correct answer is {choice}" if right else f"{choice}\n{last_line}"
    return response, choice, answer


def authors_log(task: str, examples: list[tuple[dict, tuple[str, str, str]]], listed: bool) -> str:
    """The log LLM-Adapters' evaluate scripts print for ``examples`` (one batch for commonsense_evaluate.py;
    ``listed``: the revision that first prints the batch's responses as a Python list)."""
    lines = ["Loading checkpoint shards: 100%|##########| 2/2"]
    n = len(examples)
    if get_task(task).kind == "commonsense":
        correct = sum(prediction == label for _, (_, prediction, label) in examples)
        if listed:
            lines.append(repr([response for _, (response, _, _) in examples]))
        for record, (response, prediction, label) in examples:
            lines += [record["instruction"], response, f"prediction: {prediction}", f"label: {label}"]
        lines += ["---------------", f"\rtest:1/1 | accuracy {correct}  {correct / n}", "---------------"]
    else:
        correct = 0
        for i, (_, (response, prediction, label)) in enumerate(examples, start=1):
            correct += float(prediction) == float(label) if get_task(task).kind == "math" else prediction == label
            lines += [" ", "---------------", response, f"prediction: {prediction}", f"label: {label}"]
            lines += ["---------------", f"\rtest:{i}/{n} | accuracy {correct}  {correct / i}"]
    return "\n".join([*lines, "", "test finished", ""])


@pytest.mark.parametrize("listed", [False, True], ids=["plain", "listed"])
@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_layout_is_read(capsys, tmp_path, task, listed):
    """Logs built from each task's own test instructions, laid out as the authors' scripts print them (WinoGrande
    puts its options and answer format on one line): every response, prediction and label comes back whole, and
    the CLI rescores them to the logged accuracy."""
    if listed and get_task(task).kind != "commonsense":
        pytest.skip("only commonsense_evaluate.py prints a list of responses")
    records = first_records(task)
    examples = [(rec, built_example(task, rec, right=i == 0)) for i, rec in enumerate(records)]
    text = authors_log(task, examples, listed)
    parsed, running = score.parse_log(text, task)
    assert [(e.response, e.prediction, e.label) for e in parsed] == [built for _, built in examples]
    log = tmp_path / "log.txt"
    log.write_text(text, encoding="utf-8", newline="")
    code, out, err = run_main(capsys, "--log", str(log), "--task", task)
    assert code == 0 and err == "", err
    result = json.loads(out)
    assert result == {"accuracy": 0.5, "n": 2, "prediction_mismatches": 0, "correct": 1,
                      "logged_accuracy": 0.5, "logged_correct": 1}  # fmt: skip


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
    assert code == 2 and err.count("\n") == 1
    assert "example 1: no response after an instruction ending in 'Answer format:' and boolq's choices" in err
    assert "does --task match the log?" in err


def test_log_of_another_commonsense_task_is_an_error(capsys):
    """The instruction's answer format names the task: a PIQA log read as BoolQ finds no BoolQ instruction."""
    log = need(LOGS / "llama_7b_lora_commonsense_piqa.txt")
    code, _, err = run_main(capsys, "--log", str(log), "--task", "boolq")
    assert code == 2 and "example 1: no response after an instruction ending in 'Answer format:'" in err


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
