r"""The LLM-Adapters protocol (Hu et al., 2023): task table, data files, prompts, tokenization, answer scoring.

RoCoFT's commonsense and math results follow LLM-Adapters (AGI-Edgerunners/LLM-Adapters), so every rule here
copies its code: ``finetune.py`` (``generate_prompt``, ``tokenize``, ``generate_and_tokenize_prompt``) for
training, ``commonsense_evaluate.py`` and ``evaluate.py`` (``generate_prompt``, ``extract_answer*``) for
evaluation. Numbers are comparable only if these match byte for byte, so the templates are spelled out. (Older
revisions of those files differ in whitespace, one even put "# noqa: E501" into the prompt; these are the current.)

Training prompt (``finetune.py``). ``I`` is an indent of 16 spaces, the indent of the original's f-string;
its "blank" lines hold those 16 spaces. No input (every LLM-Adapters record), two spaces after "request.":

    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n"
    "\n"
    I "### Instruction:\n"   I "{instruction}\n"   I "\n"
    I "### Response:\n"      I "{output}"

With an input: "Below is an instruction that describes a task, paired with an input that provides further
context. Write a response that appropriately completes the request. \n" (one space), "\n", then
I "### Instruction:\n" I "{instruction}\n" I "\n" I "### Input:\n" I "{input}\n" I "\n" I "### Response:\n"
I "{output}".

Evaluation prompt (the evaluate scripts, which differ from finetune.py): blank lines are empty, one space after
"request." without input and none with it; the prompt ends with I after "### Response:\n":

    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
    "\n"
    I "### Instruction:\n"   I "{instruction}\n"   "\n"
    I "### Response:\n"      I

With an input: "...context. Write a response that appropriately completes the request.\n", "\n",
I "### Instruction:\n" I "{instruction}\n" "\n" I "### Input:\n" I "{input}\n" "\n" I "### Response:\n" I.
Evaluation never sees the record's ``output`` (the reference answer): its prompt takes the instruction only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from train.errors import DataError
from train.input_pipeline import Encoded, chunked, ragged_rows

IGNORE_INDEX = -100  # label of tokens left out of the loss (PyTorch's cross-entropy default, as LLM-Adapters)
MATH_TOLERANCE = 0.001  # evaluate.py's ``miss``
RESPONSE_MARKER = "### Response:"
RECORD_KEYS = ("instruction", "input", "output", "answer")


@dataclasses.dataclass(frozen=True)
class LlmTask:
    """One evaluation set: where its files live and how its answers are read.

    ``answer_pattern``: the regex whose first match in the response is the prediction (commonsense words, AQuA
    letters); ``None`` for math, where the prediction is the last number.
    """

    name: str
    folder: str  # under LLM-Adapters' dataset/
    kind: str  # "commonsense" | "math" | "aqua"
    max_new_tokens: int
    answer_pattern: str | None


_CHOICES5 = "answer1|answer2|answer3|answer4|answer5"
TASKS: dict[str, LlmTask] = {
    t.name: t
    for t in (
        LlmTask("boolq", "boolq", "commonsense", 32, "true|false"),
        LlmTask("piqa", "piqa", "commonsense", 32, "solution1|solution2"),
        LlmTask("siqa", "social_i_qa", "commonsense", 32, _CHOICES5),
        LlmTask("hellaswag", "hellaswag", "commonsense", 32, "ending1|ending2|ending3|ending4"),
        LlmTask("winogrande", "winogrande", "commonsense", 32, "option1|option2"),
        LlmTask("arc-e", "ARC-Easy", "commonsense", 32, _CHOICES5),
        LlmTask("arc-c", "ARC-Challenge", "commonsense", 32, _CHOICES5),
        LlmTask("obqa", "openbookqa", "commonsense", 32, _CHOICES5),
        LlmTask("multiarith", "MultiArith", "math", 256, None),
        LlmTask("gsm8k", "gsm8k", "math", 256, None),
        LlmTask("addsub", "AddSub", "math", 256, None),
        LlmTask("singleeq", "SingleEq", "math", 256, None),
        LlmTask("svamp", "SVAMP", "math", 256, None),
        LlmTask("aqua", "AQuA", "aqua", 256, "A|B|C|D|E"),
    )
}
_ALIASES = {**{t.folder.lower(): t for t in TASKS.values()}, **TASKS}


def get_task(name: str) -> LlmTask:
    """Task by its eval name (``arc-c``) or its LLM-Adapters folder name (``ARC-Challenge``), any case."""
    key = name.lower()
    if key not in _ALIASES:
        raise DataError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return _ALIASES[key]


def find_file(data_dir: str | Path, task: str, split: str) -> Path:
    """``<data_dir>/<folder>/<split>.json``, where ``data_dir`` is an LLM-Adapters-style ``dataset/`` folder."""
    spec = get_task(task)
    root = Path(data_dir).expanduser()
    path = root / spec.folder / f"{split}.json"
    if path.is_file():
        return path
    nested = root / "dataset" / spec.folder / f"{split}.json"
    hint = f" ({nested} exists: pass {nested.parent.parent})" if nested.is_file() else ""
    raise DataError(
        f"no {split} file for {spec.name}: expected {path}{hint}; pass --data-dir pointing at LLM-Adapters' "
        f"dataset/ folder (one subfolder per task, e.g. {spec.folder}/{split}.json)"
    )


def load_records(path: str | Path) -> list[dict]:
    """Records of an LLM-Adapters JSON file: a list of ``{instruction, input, output, answer}`` objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; pass an LLM-Adapters JSON file (a list of instruction/input/"
            "output/answer records), e.g. dataset/boolq/train.json"
        )
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(
            f"{path} is not a JSON file ({err}); LLM-Adapters data is one JSON list, not JSON lines"
        ) from None
    if not isinstance(records, list) or not records:
        raise DataError(
            f"{path} holds no records; expected a non-empty JSON list of instruction/input/output/answer objects"
        )
    for i, record in enumerate(records):
        _check_record(record, i, path)
    return records


def _check_record(record, index: int, path: Path) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{path}: record {index} is a {type(record).__name__}, not an object with {RECORD_KEYS}")
    for key in RECORD_KEYS:
        if key not in record:
            raise DataError(
                f"{path}: record {index} lacks {key!r} (has {sorted(record)}); every record needs "
                f"{', '.join(RECORD_KEYS)}"
            )
        wanted = (str, int, float) if key == "answer" else (str,)
        if not isinstance(record[key], wanted) or isinstance(record[key], bool):
            raise DataError(f"{path}: record {index} has a {type(record[key]).__name__} {key!r}; expected a string")


_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
_I = " " * 16  # the originals' f-string indent; written out so no editor can strip trailing spaces


def format_train_prompt(record: dict) -> str:
    """finetune.py's ``generate_prompt``: prompt and reference ``output``, the text the model is trained on."""
    instruction, output = record["instruction"], record["output"]
    if record["input"]:
        return (
            f"{_WITH_INPUT} \n\n{_I}### Instruction:\n{_I}{instruction}\n{_I}\n"
            f"{_I}### Input:\n{_I}{record['input']}\n{_I}\n{_I}### Response:\n{_I}{output}"
        )
    return f"{_NO_INPUT}  \n\n{_I}### Instruction:\n{_I}{instruction}\n{_I}\n{_I}### Response:\n{_I}{output}"


def format_eval_prompt(instruction: str, input_text: str = "") -> str:
    """The evaluate scripts' ``generate_prompt``: what generation continues; it has no place for the answer."""
    if input_text:
        return (
            f"{_WITH_INPUT}\n\n{_I}### Instruction:\n{_I}{instruction}\n\n"
            f"{_I}### Input:\n{_I}{input_text}\n\n{_I}### Response:\n{_I}"
        )
    return f"{_NO_INPUT} \n\n{_I}### Instruction:\n{_I}{instruction}\n\n{_I}### Response:\n{_I}"


def tokenize_example(
    tokenizer, record: dict, cutoff: int = 256, add_eos: bool = True, train_on_inputs: bool = True
) -> dict[str, np.ndarray]:
    """``input_ids``, ``attention_mask`` and ``labels`` (int32) of one training record, as LLM-Adapters builds them.

    The prompt is truncated to ``cutoff`` tokens and gets EOS only when shorter than ``cutoff`` (so never once
    truncated) and not already ending in EOS. Labels are the input ids; with ``train_on_inputs=False`` the first
    n labels are IGNORE_INDEX, n being the length of the prompt tokenized alone (``output`` emptied, no EOS).
    Like the original, that counts tokens rather than aligning them, so a tokenizer that merges across the
    prompt/output boundary shifts the mask by a token there.
    """
    ids = _tokenize(tokenizer, format_train_prompt(record), cutoff, add_eos)
    labels = np.asarray(ids, np.int32)
    if not train_on_inputs:
        prompt_len = len(_tokenize(tokenizer, format_train_prompt({**record, "output": ""}), cutoff, add_eos=False))
        labels[:prompt_len] = IGNORE_INDEX
    return {"input_ids": np.asarray(ids, np.int32), "attention_mask": np.ones(len(ids), np.int32), "labels": labels}


def _tokenize(tokenizer, prompt: str, cutoff: int, add_eos: bool) -> list[int]:
    """finetune.py's ``tokenize``: special tokens as the tokenizer adds them (LLaMA: BOS), then maybe EOS."""
    ids = list(tokenizer(prompt, truncation=True, max_length=cutoff, padding=False, return_tensors=None)["input_ids"])
    return _end(tokenizer, ids, cutoff) if add_eos else ids


def _end(tokenizer, ids: list[int], cutoff: int) -> list[int]:
    """``ids`` with EOS appended (in place) when shorter than ``cutoff`` and not already ending in EOS."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token or tokenize with add_eos=False")
    if ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff:
        ids.append(tokenizer.eos_token_id)
    return ids


def _tokenize_all(tokenizer, prompts: list[str], cutoff: int, add_eos: bool) -> list[list[int]]:
    """`_tokenize` of each prompt, through one call of the tokenizer."""
    rows = tokenizer(prompts, truncation=True, max_length=cutoff, padding=False, return_tensors=None)["input_ids"]
    return [_end(tokenizer, list(ids), cutoff) if add_eos else list(ids) for ids in rows]


@dataclasses.dataclass(frozen=True)
class Examples:
    """Training records tokenized once (`tokenize_records`): their input ids unpadded, and where each one's loss
    starts (the tokens before it are the prompt, left out with ``train_on_inputs=False``)."""

    encoded: Encoded  # "input_ids", padded with the tokenizer's pad id (EOS where it has none)
    loss_start: np.ndarray  # int32 (rows,)

    @property
    def lengths(self) -> np.ndarray:
        return self.encoded.lengths

    def batch(self, rows: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """``input_ids``, ``attention_mask`` and ``loss_mask`` (int32) of ``rows``, right-padded to ``length``:
        `tokenize_example`'s arrays, with ``loss_mask`` 1 where its labels are not IGNORE_INDEX."""
        batch = self.encoded.batch(rows, length)
        in_loss = np.arange(length)[None, :] >= self.loss_start[rows][:, None]
        batch["loss_mask"] = batch["attention_mask"] * in_loss.astype(np.int32)
        return batch


def tokenize_records(
    tokenizer,
    records: list[dict],
    cutoff: int = 256,
    add_eos: bool = True,
    train_on_inputs: bool = True,
    chunk_size: int = 1024,
    progress: bool = False,
) -> Examples:
    """`tokenize_example` of every record, a chunk of records per tokenizer call (a bar with ``progress``)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    starts: list[np.ndarray] = []

    def chunks():
        for part in chunked(records, chunk_size, "tokenizing", progress):
            if train_on_inputs:
                starts.append(np.zeros(len(part), np.int32))
            else:
                prompts = [format_train_prompt({**r, "output": ""}) for r in part]
                lengths = map(len, _tokenize_all(tokenizer, prompts, cutoff, add_eos=False))
                starts.append(np.fromiter(lengths, np.int32, len(part)))
            yield _tokenize_all(tokenizer, [format_train_prompt(r) for r in part], cutoff, add_eos)

    encoded = ragged_rows(chunks(), "input_ids", pad_id, cutoff)
    return Examples(encoded, np.concatenate(starts) if starts else np.zeros(0, np.int32))


def extract_response(text: str) -> str:
    """The answer text: ``text.split("### Response:")[1].strip()`` as the evaluate scripts take it.

    Pass the decoded prompt plus generation, as they do: a second "### Response:" the model writes then ends
    the answer. Text without the marker (a generation alone, or a logged one) is taken whole.
    """
    parts = text.split(RESPONSE_MARKER)
    return (parts[1] if len(parts) > 1 else text).strip()


def extract_answer(task: str, text: str) -> str | float:
    """The prediction in a model's text: the task's first answer word or letter ("" if none), or for math the
    last number with commas removed (``inf`` if none, which no answer is within tolerance of)."""
    spec = get_task(task)
    response = extract_response(text)
    if spec.answer_pattern is not None:
        matches = re.findall(spec.answer_pattern, response)
        return matches[0] if matches else ""
    numbers = re.findall(r"-?\d+\.?\d*", response.replace(",", ""))
    return float(numbers[-1]) if numbers else math.inf


def is_correct(task: str, prediction: str | float, answer: str | float) -> bool:
    """Commonsense and AQuA: exact string equality. Math: within MATH_TOLERANCE of ``float(answer)``."""
    spec = get_task(task)
    if spec.kind != "math":
        return prediction == answer
    try:
        label = float(answer)
    except ValueError:
        raise DataError(
            f"answer {answer!r} of a {spec.name} record is not a number; is the file a math test set?"
        ) from None
    return abs(label - prediction) <= MATH_TOLERANCE
