"""Abstractive summarization data: the task table, reading splits, tokenization and seq2seq batches.

Two tasks, as the paper's Table 7 runs them: XSum (``EdinburghNLP/xsum``: ``document``, ``summary``) and
CNN/DailyMail 3.0.0 (``abisee/cnn_dailymail``: ``article``, ``highlights``). A split comes from the hub by
default (`load_split` with ``data_dir=None``), or from files in ``--data-dir``: one file per split named
``train``, ``validation`` (or ``val``, ``dev``) or ``test``, as JSON lines (``.jsonl``, or ``.json`` holding
JSON lines or one list of objects), ``.csv`` with a header row, ``.parquet``, or the hub's parquet shards
(``train-00000-of-00003.parquet``, or ``train/*.parquet``), directly in the folder or in its ``3.0.0/`` or
``default/`` subfolder. Columns are the task's, or those named by ``--text-column`` / ``--summary-column``;
an ``id`` column is kept when present, else an example's id is its row number.

Every example becomes ``{"id", "document", "summary"}``. Tokenization (`encode`) uses the model's tokenizer
with its special tokens (BART: ``<s> text </s>``), cut to ``--max-source-length`` (1024) source and
``--max-target-length`` (128) target tokens; a tokenizer that adds no EOS itself (the presets' byte tokenizer)
gets one appended, so the model learns to stop. `seq2seq_batch` pads rows on the right to a given length and
builds what the train step reads:

- ``input_ids``, ``attention_mask``: the source;
- ``labels``: the target tokens, ``IGNORE_INDEX`` (-100) on padding;
- ``decoder_input_ids``: the labels shifted one to the right as the model family does (`shift_right`: the
  decoder start token first; mBART wraps the last token, its language code, around instead), padding as pad;
- ``decoder_attention_mask``: 1 on the target's real tokens;
- ``label_smoothing``: ``--label-smoothing`` once per example, which the loss reads
  (`train.step.loss_sum`, kind "seq2seq-lm"), so the trainer needs no option of its own for it.

`encode_pairs` tokenizes a split once and keeps its tokens unpadded (`Pairs`), whose `Pairs.batch` gives
`seq2seq_batch`'s arrays for any rows.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from train.errors import DataError
from train.input_pipeline import Encoded, chunked, ragged_rows

IGNORE_INDEX = -100  # label of target padding, left out of the loss (as HF's seq2seq models)
SPLITS = ("train", "validation", "test")
_SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "val", "dev"), "test": ("test",)}
_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclasses.dataclass(frozen=True)
class SummarizationTask:
    """One summarization dataset: where the hub keeps it, its columns and its generation length."""

    name: str
    hub_path: str
    hub_config: str | None
    text_column: str
    summary_column: str
    max_new_tokens: int  # the BART recipe's, used when --max-new-tokens is 0


TASKS: dict[str, SummarizationTask] = {
    t.name: t
    for t in (
        SummarizationTask("xsum", "EdinburghNLP/xsum", None, "document", "summary", 62),
        SummarizationTask("cnn_dailymail", "abisee/cnn_dailymail", "3.0.0", "article", "highlights", 142),
    )
}
_ALIASES = {"xsum": "xsum", "cnndailymail": "cnn_dailymail", "cnndm": "cnn_dailymail"}


def get_task(name: str) -> SummarizationTask:
    """Task by name, any case, with or without ``_``/``-`` (``cnn_dailymail``, ``cnn-dailymail``, ``cnn_dm``)."""
    key = re.sub(r"[-_/]", "", name.lower())
    if key not in _ALIASES:
        raise DataError(f"unknown task {name!r}; valid summarization tasks: {', '.join(TASKS)}")
    return TASKS[_ALIASES[key]]


# ---------------------------------------------------------------- finding and reading splits


def find_split_file(data_dir: str | Path, task: SummarizationTask, split: str) -> list[Path]:
    """The file (or parquet shards) of ``split`` under ``data_dir``; a missing one names the files present."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-dir {root}: no such directory; give the folder of the {task.name} split files")
    folders = [root] + [root / sub for sub in (task.hub_config, "default") if sub and (root / sub).is_dir()]
    for folder in folders:
        found = []
        for stem in _SPLIT_STEMS[split]:
            found += [[folder / (stem + s)] for s in _SUFFIXES if (folder / (stem + s)).is_file()]
            shards = sorted(folder.glob(f"{stem}-*.parquet")) or sorted((folder / stem).glob("*.parquet"))
            if shards:
                found.append(shards)
        if len(found) > 1:
            names = ", ".join(str(files[0].relative_to(root)) for files in found)
            raise DataError(f"{folder} holds the {split} split more than once ({names}); keep one of them")
        if found:
            return found[0]
    present = sorted(str(p.relative_to(root)) for f in folders for p in f.iterdir() if p.suffix in _SUFFIXES)
    held = f"it holds {', '.join(present)}" if present else "it holds no .jsonl, .json, .csv or .parquet file"
    raise DataError(
        f"no {split} split of {task.name} in {root}: expected {split}.jsonl, .json, .csv or .parquet "
        f"(or {split}-*.parquet shards); {held}"
        + ("; pass --eval-split validation to evaluate on the validation split" if split == "test" else "")
    )


def read_rows(files: Sequence[Path], columns: Sequence[str]) -> list[dict]:
    """Rows of a split's file(s), with ``columns`` (and ``id`` where present); a missing column is an error."""
    rows: list[dict] = []
    for path in files:
        if path.suffix == ".parquet":
            rows += _read_parquet(path, columns)
            continue
        if path.suffix == ".csv":
            new = _read_csv(path)
        else:
            new = _read_json(path)
        if new:
            _check_columns(path, list(new[0]), columns)
        rows += new
    return rows


def _check_columns(path: Path, present: list[str], wanted: Sequence[str]) -> None:
    missing = [c for c in wanted if c not in present]
    if missing:
        raise DataError(
            f"{path} has no column {missing[0]!r} (its columns: {', '.join(map(str, present))}); name the "
            "text and summary columns with --text-column and --summary-column"
        )


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: not valid JSON ({err.msg} at line {err.lineno}); fix or regenerate the file"
            ) from None
        if not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: expected a list of objects, one per example")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not a JSON object ({err.msg}); write one JSON object per line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: not a JSON object; write one JSON object per line")
        rows.append(row)
    return rows


def _read_csv(path: Path) -> list[dict]:
    csv.field_size_limit(2**31 - 1)  # articles run to tens of kilobytes; the default limit is 128 KiB
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def _read_parquet(path: Path, columns: Sequence[str]) -> list[dict]:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    _check_columns(path, names, columns)
    table = pq.read_table(path, columns=[*columns, *(["id"] if "id" in names else [])])
    return table.to_pylist()


def load_split(
    task: SummarizationTask,
    split: str,
    data_dir: str | Path | None,
    text_column: str | None = None,
    summary_column: str | None = None,
) -> list[dict]:
    """``split``'s examples as ``{"id", "document", "summary"}`` dicts, from the hub or ``data_dir``.

    An empty split, a missing column or a row whose text is not a string is a `DataError`.
    """
    text_column, summary_column = text_column or task.text_column, summary_column or task.summary_column
    columns = (text_column, summary_column)
    if data_dir is None:
        rows, where = _load_hub(task, split, columns), f"{task.hub_path} ({split})"
    else:
        files = find_split_file(data_dir, task, split)
        rows, where = read_rows(files, columns), str(files[0])
    if not rows:
        raise DataError(f"the {split} split ({where}) holds no examples; give a file with at least one row")
    examples = []
    for i, row in enumerate(rows):
        document, summary = row.get(text_column), row.get(summary_column)
        for column, value in ((text_column, document), (summary_column, summary)):
            if not isinstance(value, str):
                raise DataError(
                    f"{where}: row {i} has {type(value).__name__} in column {column!r}, not text; "
                    "fix the row or name other columns with --text-column / --summary-column"
                )
        examples.append({"id": str(row.get("id", i)), "document": document, "summary": summary})
    return examples


def _load_hub(task: SummarizationTask, split: str, columns: Sequence[str]) -> list[dict]:
    """One split from the hub with ``datasets``; a dataset left as a loading script is read from the hub's
    own parquet conversion (``refs/convert/parquet``), since datasets >= 4 runs no scripts."""
    import datasets

    def load(**kwargs):
        return datasets.load_dataset(task.hub_path, task.hub_config, split=split, **kwargs)

    try:
        try:
            ds = load()
        except RuntimeError as err:
            if "script" not in str(err).lower():
                raise
            ds = load(revision="refs/convert/parquet")
    except Exception as err:  # network, a missing split, a changed hub layout: all fixed by giving files
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise DataError(
            f"cannot load {task.hub_path} ({split}) from the hub ({first}); pass --data-dir with "
            f"{split}.jsonl, .csv or .parquet files"
        ) from err
    _check_columns(Path(task.hub_path), list(ds.column_names), columns)
    return ds.to_list()


# ---------------------------------------------------------------- tokenization and batches


def adds_eos(tokenizer) -> bool:
    """Whether the tokenizer ends a text with EOS itself (BART, Pegasus; mBART before its language code)."""
    return tokenizer.eos_token_id in tokenizer("a")["input_ids"]


def encode(tokenizer, texts: Sequence[str], max_length: int, target: bool = False) -> list[list[int]]:
    """Token ids of each text with the tokenizer's special tokens, at most ``max_length``, EOS included.

    ``target`` tokenizes as a summary (``text_target``: mBART's target-language tokens). A tokenizer that adds
    no EOS gets it appended (in place of the last token when the text fills ``max_length``).
    """
    key = "text_target" if target else "text"
    ids = tokenizer(**{key: list(texts)}, truncation=True, max_length=max_length)["input_ids"]
    if adds_eos(tokenizer):
        return ids
    eos = tokenizer.eos_token_id
    return [x[: max_length - 1] + [eos] for x in ids]


def shift_right(labels: np.ndarray, pad_id: int, decoder_start_id: int | None, wrap_last: bool = False) -> np.ndarray:
    """Decoder inputs for teacher forcing: ``labels`` moved one position right, padding (-100) as ``pad_id``.

    Position 0 is ``decoder_start_id`` (BART's ``shift_tokens_right``), or with ``wrap_last`` each row's last
    real label (mBART's, whose targets end in their language code).
    """
    labels = np.where(labels == IGNORE_INDEX, pad_id, labels)
    shifted = np.full_like(labels, pad_id)
    shifted[:, 1:] = labels[:, :-1]
    if wrap_last:
        last = (labels != pad_id).sum(axis=1) - 1
        shifted[:, 0] = labels[np.arange(len(labels)), np.maximum(last, 0)]
    else:
        shifted[:, 0] = decoder_start_id
    return shifted


@dataclasses.dataclass(frozen=True)
class Seq2SeqLayout:
    """The model's token ids a batch needs: padding, the decoder's first input, and how it shifts."""

    pad_id: int
    decoder_start_id: int | None
    wrap_last: bool  # mBART
    label_smoothing: float = 0.0


def seq2seq_batch(
    sources: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    source_length: int,
    target_length: int,
    layout: Seq2SeqLayout,
) -> dict[str, np.ndarray]:
    """Right-padded arrays of the step (the module docstring lists them) for rows of token ids."""
    n = len(sources)
    batch = {
        "input_ids": np.full((n, source_length), layout.pad_id, np.int32),
        "attention_mask": np.zeros((n, source_length), np.int32),
        "labels": np.full((n, target_length), IGNORE_INDEX, np.int32),
    }
    for row, (source, target) in enumerate(zip(sources, targets)):
        batch["input_ids"][row, : len(source)] = source
        batch["attention_mask"][row, : len(source)] = 1
        batch["labels"][row, : len(target)] = target
    return with_decoder_inputs(batch, layout)


def with_decoder_inputs(batch: dict[str, np.ndarray], layout: Seq2SeqLayout) -> dict[str, np.ndarray]:
    """``batch`` (padded ``input_ids``, ``attention_mask`` and ``labels``) with the decoder's arrays and
    ``label_smoothing`` added, in place."""
    batch["decoder_input_ids"] = shift_right(
        batch["labels"], layout.pad_id, layout.decoder_start_id, layout.wrap_last
    ).astype(np.int32)
    batch["decoder_attention_mask"] = (batch["labels"] != IGNORE_INDEX).astype(np.int32)
    batch["label_smoothing"] = np.full((len(batch["labels"]),), layout.label_smoothing, np.float32)
    return batch


@dataclasses.dataclass(frozen=True)
class Pairs:
    """A split's documents and summaries tokenized once (`encode_pairs`), unpadded."""

    sources: Encoded  # "input_ids", padded with the model's pad id
    targets: Encoded  # "labels", padded with IGNORE_INDEX

    def batch(self, rows: np.ndarray, source_length: int, target_length: int, layout: Seq2SeqLayout):
        """`seq2seq_batch` of ``rows``: the same arrays, from the stored tokens."""
        source = self.sources.batch(rows, source_length)
        labels = self.targets.batch(rows, target_length)["labels"]
        return with_decoder_inputs({**source, "labels": labels}, layout)


def encode_pairs(
    tokenizer,
    records: Sequence[dict],
    max_source_length: int,
    max_target_length: int,
    pad_id: int,
    chunk_size: int = 1024,
    progress: bool = False,
) -> Pairs:
    """`encode` of every record's document and summary (as a target), a chunk of records per tokenizer call
    (a bar with ``progress``)."""

    def chunks(key: str, max_length: int, target: bool):
        for part in chunked(records, chunk_size, f"tokenizing {key}", progress):
            yield encode(tokenizer, [r[key] for r in part], max_length, target=target)

    sources = ragged_rows(chunks("document", max_source_length, False), "input_ids", pad_id, max_source_length)
    targets = ragged_rows(chunks("summary", max_target_length, True), "labels", IGNORE_INDEX, max_target_length)
    return Pairs(sources, targets)
