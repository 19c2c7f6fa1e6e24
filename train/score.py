r"""Rescore an LLM-Adapters evaluation log with our answer extraction; the logs are an oracle for it.

    python -m train.score --log llama_7b_lora_commonsense_boolq.txt --task boolq

The original evaluate scripts print each test example's response with the prediction they extracted and the
label, then a running accuracy. Extracting the prediction again from every logged response with
``train.llm_data`` must give every logged prediction and the final logged accuracy; anything else is a bug in
our scoring. Each mismatch is printed, and the last line is one JSON object: ``accuracy`` (a fraction), ``n``,
``prediction_mismatches``, ``correct``, ``logged_accuracy`` and ``logged_correct``.

The two log layouts, line by line (``\r`` is a carriage return the scripts print):
- commonsense_evaluate.py, per batch: for each example its instruction, the response, ``prediction: P``,
  ``label: L``; then ``---------------``, ``\rtest:i/N | accuracy C  F`` with N batches and F = C / examples so
  far, ``---------------``. An early revision also prints the batch's responses as one Python list first.
  Every instruction ends in "Answer format: " and the task's choices joined by "/", alone on the last line
  (BoolQ, PIQA, SIQA, HellaSwag, ARC, OBQA) or after the options on it (WinoGrande: ``Option1: Sarah
  Option2: Maria Answer format: option1/option2``); the response starts on the next line.
- evaluate.py (math and AQuA), per example: `` `` (one space), ``---------------``, the response,
  ``prediction: P``, ``label: L``, ``---------------``, ``\rtest:i/N | accuracy C  F``.
Responses may span many lines; an example ends at a ``prediction:`` line directly followed by a ``label:`` line.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from train import options as opt
from train import strict_json, third_party
from train.errors import DataError, UserError
from train.llm_data import LlmTask, extract_answer, get_task, is_correct

_SEPARATOR = "---------------"
_RUNNING = re.compile(r"\r?test:(\d+)/(\d+) \| accuracy (\d+)  (\S+)")


@dataclasses.dataclass(frozen=True)
class LoggedExample:
    """One example as the evaluate script printed it."""

    response: str
    prediction: str  # as printed: str() of the original's prediction
    label: str


def parse_log(text: str, task: str) -> tuple[list[LoggedExample], tuple[int, int, int, float]]:
    """Examples of a log of ``task`` and its last running line ``(i, N, correct, accuracy)``."""
    spec = get_task(task)
    lines = text.split("\n")  # not splitlines(): the scripts' "\r" must not end a line
    examples, start = [], 0
    for i in range(len(lines) - 1):
        if lines[i].startswith("prediction: ") and lines[i + 1].startswith("label: "):
            response = _response(lines[start:i], spec, len(examples))
            examples.append(LoggedExample(response, lines[i][len("prediction: ") :], lines[i + 1][len("label: ") :]))
            start = i + 2
    running = [m for line in lines if (m := _RUNNING.fullmatch(line))]
    if not examples or not running:
        raise DataError(
            "found no 'prediction:'/'label:' records or no 'test:i/N | accuracy' line; pass a log "
            "printed by LLM-Adapters' evaluate.py or commonsense_evaluate.py"
        )
    last = running[-1]
    step, total = int(last[1]), int(last[2])
    if step != total:
        raise DataError(f"the log stops at test:{step}/{total}; score the log of a finished run")
    return examples, (step, total, int(last[3]), float(last[4]))


def instruction_end(spec: LlmTask) -> re.Pattern:
    """What ends the last line of a commonsense instruction of ``spec``: "Answer format: " and the task's choices
    joined by "/". Anchored on the choices, so neither the options before it on the same line nor a printed
    list of responses (whose line ends in a quote and a bracket) is taken for it."""
    choice = f"(?:{spec.answer_pattern})"
    return re.compile(rf"(?:^|\s)Answer format: {choice}(?:/{choice})*\s*$")


def _response(body: list[str], spec: LlmTask, index: int) -> str:
    """The response among the lines printed before an example's ``prediction:`` line."""
    if spec.kind == "commonsense":
        end = instruction_end(spec)
        before = [j for j, line in enumerate(body) if end.search(line)]
        choices = spec.answer_pattern.replace("|", ", ")
        where = f"after an instruction ending in 'Answer format:' and {spec.name}'s choices ({choices})"
    else:
        before = [j + 1 for j in range(len(body) - 1) if body[j] == " " and body[j + 1] == _SEPARATOR]
        where = "after a ' ' line and a separator"
    if not before:
        raise DataError(f"example {index + 1}: no response {where}; does --task match the log?")
    return "\n".join(body[before[0] + 1 :])  # the first: a response may repeat the marker lines, never precede them


def score_log(path: str | Path, task: str) -> tuple[dict, list[tuple[int, str, str]]]:
    """Summary of a rescored log and its ``(example number, logged prediction, ours)`` disagreements."""
    spec = get_task(task)
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass --log pointing at an LLM-Adapters evaluation log")
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep the scripts' "\r"
            text = f.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); pass an LLM-Adapters evaluation log") from None
    examples, (_, _, logged_correct, logged_accuracy) = parse_log(text, spec.name)
    mismatches, correct = [], 0
    for n, example in enumerate(examples, start=1):
        prediction = extract_answer(spec.name, example.response)
        if str(prediction) != example.prediction:
            mismatches.append((n, example.prediction, str(prediction)))
        correct += is_correct(spec.name, prediction, example.label)
    summary = {
        "accuracy": correct / len(examples),
        "n": len(examples),
        "prediction_mismatches": len(mismatches),
        "correct": correct,
        "logged_accuracy": logged_accuracy,
        "logged_correct": logged_correct,
    }
    return summary, mismatches


def main(argv=None) -> int:
    third_party.quiet()
    parser = opt.new_parser("python -m train.score", __doc__)
    parser.add_argument("--log", required=True, type=Path, help="an LLM-Adapters evaluation log (.txt)")
    parser.add_argument("--task", required=True, help="the task the log evaluates, e.g. boolq, arc-c, addsub, aqua")
    try:
        args = parser.parse_args(argv)
        summary, mismatches = score_log(args.log, args.task)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for n, logged, ours in mismatches:
        print(f"example {n}: logged prediction {logged!r}, ours {ours!r}")
    print(strict_json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
