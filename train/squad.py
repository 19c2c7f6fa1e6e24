"""SQuAD v1.1 and v2.0 for extractive question answering: reading, token windows, and answers from span logits.

**Reading.** Every source yields the same `Example` records (id, question, context, gold answer texts and
character starts; no answer marks a v2.0 unanswerable question):

- the hub (``data_dir=None``): ``rajpurkar/squad`` or ``rajpurkar/squad_v2`` through ``datasets``;
- a folder (``--data-dir``, or its ``squad``/``squad_v2``/``plain_text`` subfolder) holding the official
  files (``train-v1.1.json``/``dev-v1.1.json``, ``train-v2.0.json``/``dev-v2.0.json``), or the hub's parquet
  files (``train-*.parquet``, ``validation-*.parquet``).

A JSON file may be in the official nested layout (``{"data": [{"title", "paragraphs": [{"context", "qas":
[{"id", "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}``) or in the flat layout
of Hugging Face datasets (``{"data": [{"id", "question", "context", "answers": {"text": [...],
"answer_start": [...]}}]}``, or a bare list of such records); `read_json` tells them apart by their keys.

**Token windows** (`tokenize`), the standard recipe (transformers' ``run_qa.py``): the question (leading
whitespace stripped) comes first and the context second; only the context is truncated, to ``max_length``
tokens per window, and a long context gives several windows that overlap by ``doc_stride`` tokens (the
tokenizer's ``stride``). Offset mappings give each context token its character span. The training target of
a window is the first and last token of the first gold answer; it is the CLS token when that answer is not
wholly inside the window, and for an unanswerable question.

**Answers** (`postprocess`): for every window of a question, the ``n_best`` highest start and end logits
among its tokens form candidate spans, kept when both ends are context tokens, the end is not before the
start and the span has at most ``max_answer_length`` tokens; the best-scoring candidate (start + end logit)
over all windows is the answer, its text cut from the context by the offsets. For v2.0 the null score is
the smallest CLS start + end logit over the windows, and the answer is "" when the null score exceeds the
best span's score by more than ``null_threshold``. This is ``run_qa.py``'s post-processing, except that
padding positions never take one of the n best places (their logits would otherwise depend on the batch's
length bucket).

This module imports no JAX (the task registry imports it while parsing options); numpy is imported lazily.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from train.errors import DataError

SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class SquadTask:
    """One SQuAD version: its names, hub dataset and official file names."""

    name: str
    version: int  # 1 (v1.1) or 2 (v2.0)
    hub_id: str
    hub_folder: str  # the subfolder of the hub's parquet files
    files: tuple[str, str]  # official train and dev file names

    @property
    def label(self) -> str:
        return "SQuAD v1.1" if self.version == 1 else "SQuAD v2.0"

    @property
    def metric_names(self) -> tuple[str, ...]:
        base = ("exact_match", "f1")
        if self.version == 1:
            return base
        return (*base, "has_ans_exact_match", "has_ans_f1", "no_ans_exact_match", "no_ans_f1")


TASKS: dict[str, SquadTask] = {
    "squad": SquadTask("squad", 1, "rajpurkar/squad", "plain_text", ("train-v1.1.json", "dev-v1.1.json")),
    "squad_v2": SquadTask("squad_v2", 2, "rajpurkar/squad_v2", "squad_v2", ("train-v2.0.json", "dev-v2.0.json")),
}
_SPELLINGS = {
    **dict.fromkeys(("squad", "squadv1", "squadv11", "squad11", "squad1"), "squad"),
    **dict.fromkeys(("squadv2", "squadv20", "squad20", "squad2"), "squad_v2"),
}


def get_task(name: str) -> SquadTask:
    """The task of ``name``: squad (v1.1) or squad_v2 (v2.0), in any spelling such as ``SQuAD-v2.0``."""
    key = name.lower().replace("-", "").replace("_", "").replace(".", "")
    if key not in _SPELLINGS:
        raise DataError(f"unknown task {name!r}; SQuAD tasks: {', '.join(TASKS)}")
    return TASKS[_SPELLINGS[key]]


@dataclasses.dataclass(frozen=True)
class Example:
    """One question: gold answer texts and their character starts in ``context`` (empty: unanswerable)."""

    id: str
    question: str
    context: str
    answers: tuple[str, ...] = ()
    starts: tuple[int, ...] = ()


# ---------------------------------------------------------------- reading


def find_files(task: SquadTask, data_dir: str | Path) -> dict[str, list[Path]]:
    """``{split: files}`` of ``task`` under ``data_dir``: the official JSON files, else parquet shards.

    A folder holding the other version's official files, or one split without the other, is an error
    that says what to pass.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-dir {root} is not a directory; pass the folder of the {task.label} files")
    folders = list(dict.fromkeys((root, root / task.name, root / task.hub_folder)))
    other = TASKS["squad_v2" if task.version == 1 else "squad"]
    for folder in folders:
        train, dev = (folder / name for name in task.files)
        if train.is_file() and dev.is_file():
            return {"train": [train], "validation": [dev]}
        if train.is_file() or dev.is_file():
            have, missing = (train, dev) if train.is_file() else (dev, train)
            raise DataError(f"expected {missing.name} beside {have}; copy both {task.label} files into {folder}")
        shards = {split: sorted(folder.glob(f"{split}-*.parquet")) for split in SPLITS}
        if shards["train"] and shards["validation"]:
            return shards
        if shards["train"] or shards["validation"]:
            missing = "validation" if shards["train"] else "train"
            raise DataError(
                f"expected {folder / (missing + '-*.parquet')} beside the other split's shards; copy both "
                f"splits of {task.hub_id} into {folder}"
            )
        if any((folder / name).is_file() for name in other.files):
            raise DataError(
                f"{folder} holds {other.label} files ({', '.join(other.files)}), not {task.label}; "
                f"use --task {other.name}, or pass a folder with {' and '.join(task.files)}"
            )
    raise DataError(
        f"no {task.label} data under {root}: expected {task.files[0]} and {task.files[1]} (the official files) "
        f"or train-*.parquet and validation-*.parquet (Hugging Face {task.hub_id}); pass --data-dir pointing "
        "at them, or omit it to download from the hub"
    )


def load_splits(task: SquadTask, data_dir: str | Path | None) -> dict[str, list[Example]]:
    """``{"train": [...], "validation": [...]}`` of ``task`` from the hub (``data_dir=None``) or a folder."""
    if data_dir is None:
        splits = _load_hub(task)
    else:
        splits = {split: _read_files(files) for split, files in find_files(task, data_dir).items()}
    for split, examples in splits.items():
        check_examples(examples, task, f"the {split} split")
    return splits


def check_examples(examples: Sequence[Example], task: SquadTask, where: str) -> None:
    """Questions exist, ids are unique and, for v1.1, every question has an answer."""
    if not examples:
        raise DataError(f"{where} of {task.label} holds no questions; check --data-dir")
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise DataError(f"{where}: question id {ex.id!r} occurs twice; SQuAD ids must be unique")
        seen.add(ex.id)
        if task.version == 1 and not ex.answers:
            raise DataError(
                f"{where}: question {ex.id} has no answer, which SQuAD v1.1 cannot score; use --task squad_v2 "
                "for data with unanswerable questions"
            )


def _read_files(files: Sequence[Path]) -> list[Example]:
    if files[0].suffix == ".parquet":
        return [ex for f in files for ex in read_parquet(f)]
    return [ex for f in files for ex in read_json(f)]


_OFFICIAL_HINT = '{"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers"}]}]}]}'
_FLAT_HINT = '{"data": [{"id", "question", "context", "answers": {"text", "answer_start"}}]}'


def read_json(path: str | Path) -> list[Example]:
    """The questions of a SQuAD JSON file in the official nested layout or the flat Hugging Face layout."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not a JSON file ({err}); expected SQuAD JSON such as {_OFFICIAL_HINT}") from None
    records = data.get("data") if isinstance(data, dict) else data
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise DataError(
            f"{path} is not SQuAD JSON: expected the official layout {_OFFICIAL_HINT} or the Hugging Face "
            f"layout {_FLAT_HINT}"
        )
    if all("paragraphs" in r for r in records):
        return _read_official(records, path)
    if all({"id", "question", "context", "answers"} <= set(r) for r in records):
        return [_flat_example(r, f"{path}: record {i}") for i, r in enumerate(records)]
    keys = sorted(records[0])
    raise DataError(
        f"{path} is not SQuAD JSON (its first record has keys {keys}): expected the official layout "
        f"{_OFFICIAL_HINT} or the Hugging Face layout {_FLAT_HINT}"
    )


def _read_official(articles: list[dict], path: Path) -> list[Example]:
    examples = []
    for a, article in enumerate(articles):
        paragraphs = article["paragraphs"]
        if not isinstance(paragraphs, list):
            raise DataError(f"{path}: article {a}: 'paragraphs' is not a list; is it a SQuAD file?")
        for p, paragraph in enumerate(paragraphs):
            where = f"{path}: article {a}, paragraph {p}"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
                raise DataError(f"{where} has no 'context' text; every paragraph needs 'context' and 'qas'")
            if not isinstance(paragraph.get("qas"), list):
                raise DataError(f"{where} has no 'qas' list; every paragraph needs 'context' and 'qas'")
            for qa in paragraph["qas"]:
                if not isinstance(qa, dict):
                    raise DataError(f"{where}: a question is a {type(qa).__name__}, not an object")
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                if not isinstance(answers, list) or not all(isinstance(x, dict) for x in answers):
                    raise DataError(f"{where}: 'answers' must be a list of {{'text', 'answer_start'}} objects")
                fields = {
                    "id": qa.get("id"),
                    "question": qa.get("question"),
                    "context": paragraph["context"],
                    "texts": [x.get("text") for x in answers],
                    "starts": [x.get("answer_start") for x in answers],
                }
                examples.append(_example(fields, where))
    return examples


def _flat_example(record: Mapping[str, Any], where: str) -> Example:
    answers = record["answers"]
    if isinstance(answers, list):  # the official answer objects inside a flat record
        answers = {"text": [a.get("text") for a in answers], "answer_start": [a.get("answer_start") for a in answers]}
    if not isinstance(answers, dict):
        raise DataError(f"{where}: 'answers' must be {{'text': [...], 'answer_start': [...]}}")
    fields = {
        "id": record["id"],
        "question": record["question"],
        "context": record["context"],
        "texts": list(answers.get("text") or []),
        "starts": list(answers.get("answer_start") or []),
    }
    return _example(fields, where)


def _example(fields: dict[str, Any], where: str) -> Example:
    """An `Example` from raw fields, each checked."""
    qid = fields["id"]
    for key in ("id", "question", "context"):
        if not isinstance(fields[key], str):
            raise DataError(f"{where}: question {qid!r} has no {key!r} text; is it a SQuAD file?")
    texts, starts = fields["texts"], fields["starts"]
    if len(texts) != len(starts):
        raise DataError(f"{where}: question {qid} has {len(texts)} answer texts but {len(starts)} answer starts")
    for text, start in zip(texts, starts, strict=True):
        if not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise DataError(
                f"{where}: question {qid} has an answer {text!r} at {start!r}; answers need a text and a "
                "character start (a non-negative integer)"
            )
    return Example(qid, fields["question"], fields["context"], tuple(texts), tuple(starts))


def read_parquet(path: Path) -> list[Example]:
    """The questions of one parquet shard of the hub's ``squad`` or ``squad_v2`` dataset."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in ("id", "question", "context", "answers") if c not in table.column_names]
    if missing:
        raise DataError(f"{path} lacks column {missing[0]!r} (has {table.column_names}); is it a SQuAD shard?")
    return [_flat_example(r, f"{path}: row {i}") for i, r in enumerate(table.to_pylist())]


def _load_hub(task: SquadTask) -> dict[str, list[Example]]:
    """Download with ``datasets``; imported here so offline use never needs it."""
    import datasets

    ds = datasets.load_dataset(task.hub_id)
    return {s: [_flat_example(r, f"{task.hub_id} {s} row {i}") for i, r in enumerate(ds[s])] for s in SPLITS}


def references(examples: Sequence[Example]) -> dict[str, list[str]]:
    """Question id -> gold answer texts, for `train.squad_metric.squad_scores`."""
    return {ex.id: list(ex.answers) for ex in examples}


# ---------------------------------------------------------------- token windows


@dataclasses.dataclass
class Features:
    """The token windows of a list of examples, as numpy arrays over N windows of ``max_length`` tokens.

    ``inputs`` holds the model inputs (``input_ids``, ``attention_mask`` and, where the tokenizer makes them,
    ``token_type_ids``), each (N, L) int32, right-padded. ``example_index`` (N,) is each window's example;
    ``start_positions`` and ``end_positions`` (N,) its training target (``cls_index`` when the answer is not
    in the window); ``offsets`` (N, L, 2) the character span of each context token, (-1, -1) elsewhere (None
    unless asked for: training needs only the targets).
    """

    inputs: dict[str, Any]
    example_index: Any
    start_positions: Any
    end_positions: Any
    cls_index: Any
    offsets: Any

    def __len__(self) -> int:
        return len(self.example_index)

    def batch(self, rows, labels: bool = True) -> dict[str, Any]:
        """Model inputs of windows ``rows`` (and their targets with ``labels``)."""
        out = {k: v[rows] for k, v in self.inputs.items()}
        if labels:
            out["start_positions"], out["end_positions"] = self.start_positions[rows], self.end_positions[rows]
        return out


def check_windows(tokenizer, examples: Sequence[Example], max_length: int, doc_stride: int) -> None:
    """Every question leaves more than ``doc_stride`` context tokens per window (the tokenizer's own
    requirement for overlapping windows); else a `DataError` naming the longest question and the fix."""
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    lengths = [
        len(ids) for ids in tokenizer([ex.question.lstrip() for ex in examples], add_special_tokens=False)["input_ids"]
    ]
    worst = max(range(len(examples)), key=lambda i: lengths[i])
    if room - lengths[worst] <= doc_stride:
        raise DataError(
            f"question {examples[worst].id} has {lengths[worst]} tokens, which leaves {room - lengths[worst]} "
            f"context tokens per window at --max-length {max_length}, not more than --doc-stride {doc_stride}; "
            "raise --max-length or lower --doc-stride"
        )


def tokenize(
    tokenizer,
    examples: Sequence[Example],
    max_length: int,
    doc_stride: int,
    keep_offsets: bool = True,
    chunk_size: int = 1000,
) -> Features:
    """The `Features` of ``examples``: question first, context truncated into windows overlapping by
    ``doc_stride`` tokens (module doc). ``tokenizer`` must be a fast tokenizer (offset mappings)."""
    import numpy as np

    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{type(tokenizer).__name__} is not a fast tokenizer; SQuAD needs offset mappings")
    check_windows(tokenizer, examples, max_length, doc_stride)
    names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in tokenizer.model_input_names]
    parts: dict[str, list] = {k: [] for k in (*names, "example_index", "start", "end", "cls", "offsets")}
    for first in range(0, len(examples), chunk_size):
        chunk = examples[first : first + chunk_size]
        enc = tokenizer(
            [ex.question.lstrip() for ex in chunk],
            [ex.context for ex in chunk],
            truncation="only_second",
            max_length=max_length,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding="max_length",
            padding_side="right",
        )
        for name in names:
            parts[name].append(np.asarray(enc[name], np.int32))
        in_context = np.array([[s == 1 for s in enc.sequence_ids(i)] for i in range(len(enc["input_ids"]))])
        chunk_spans = np.where(in_context[..., None], np.asarray(enc["offset_mapping"], np.int32), -1)
        is_cls = parts["input_ids"][-1] == tokenizer.cls_token_id
        for i, spans in enumerate(chunk_spans):
            example = chunk[enc["overflow_to_sample_mapping"][i]]
            cls = int(np.argmax(is_cls[i])) if is_cls[i].any() else 0
            start, end = answer_tokens(spans, example, cls)
            parts["example_index"].append(first + enc["overflow_to_sample_mapping"][i])
            parts["start"].append(start)
            parts["end"].append(end)
            parts["cls"].append(cls)
            if keep_offsets:
                parts["offsets"].append(spans)
    return Features(
        inputs={name: np.concatenate(parts[name]) for name in names},
        example_index=np.asarray(parts["example_index"], np.int32),
        start_positions=np.asarray(parts["start"], np.int32),
        end_positions=np.asarray(parts["end"], np.int32),
        cls_index=np.asarray(parts["cls"], np.int32),
        offsets=np.stack(parts["offsets"]) if keep_offsets else None,
    )


def answer_tokens(spans, example: Example, cls: int) -> tuple[int, int]:
    """``(start, end)`` tokens of ``example``'s first answer in a window whose context tokens have character
    ``spans`` (-1 elsewhere): the last token starting at or before the answer's first character and the
    first ending at or after its last; ``(cls, cls)`` when it has no answer or the window does not hold it."""
    import numpy as np

    if not example.answers:
        return cls, cls
    first_char = example.starts[0]
    end_char = first_char + len(example.answers[0])
    context = np.flatnonzero(spans[:, 0] >= 0)
    if not len(context) or spans[context[0], 0] > first_char or spans[context[-1], 1] < end_char:
        return cls, cls
    start = context[np.flatnonzero(spans[context, 0] <= first_char)[-1]]
    end = context[np.flatnonzero(spans[context, 1] >= end_char)[0]]
    return int(start), int(end)


# ---------------------------------------------------------------- answers from logits


def postprocess(
    examples: Sequence[Example],
    features: Features,
    start_logits,
    end_logits,
    version: int,
    n_best: int = 20,
    max_answer_length: int = 30,
    null_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, float]]:
    """``(answers, null_margins)``: question id -> predicted text, and (v2.0) id -> null score minus the best
    span's score (the official scripts' "na_prob" input: above ``null_threshold`` the answer is "").

    ``start_logits`` and ``end_logits`` are (N, T) over the N windows of ``features`` with T <= L (positions
    past T are padding). The search is the module doc's.
    """
    import numpy as np

    start_logits, end_logits = np.asarray(start_logits, np.float64), np.asarray(end_logits, np.float64)
    length = start_logits.shape[1]
    windows: list[list[int]] = [[] for _ in examples]
    for f, e in enumerate(features.example_index):
        windows[e].append(f)
    real = features.inputs["attention_mask"][:, :length] > 0
    answers, margins = {}, {}
    for e, example in enumerate(examples):
        best, best_span, null = -np.inf, None, np.inf
        for f in windows[e]:
            spans = features.offsets[f, :length]
            s = np.where(real[f], start_logits[f], -np.inf)
            t = np.where(real[f], end_logits[f], -np.inf)
            cls = features.cls_index[f]
            null = min(null, start_logits[f, cls] + end_logits[f, cls])
            starts = np.argsort(-s, kind="stable")[:n_best]
            ends = np.argsort(-t, kind="stable")[:n_best]
            width = ends[None, :] - starts[:, None] + 1
            ok = (spans[starts, 0] >= 0)[:, None] & (spans[ends, 0] >= 0)[None, :] & (width >= 1)
            ok &= width <= max_answer_length
            if not ok.any():
                continue
            scores = np.where(ok, s[starts][:, None] + t[ends][None, :], -np.inf)
            i, j = np.unravel_index(np.argmax(scores), scores.shape)
            if scores[i, j] > best:
                best, best_span = scores[i, j], (spans[starts[i], 0], spans[ends[j], 1])
        text = example.context[best_span[0] : best_span[1]] if best_span is not None else ""
        if version == 2:
            margins[example.id] = float(null - best) if best_span is not None else float("inf")
            if best_span is None or null - best > null_threshold:
                text = ""
        answers[example.id] = text
    return answers, margins
