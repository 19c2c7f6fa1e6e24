"""GLUE task registry and loaders.

Every task is described once, by a frozen `TaskSpec`, and every source yields
the same shape: ``{split: {column: list}}`` with the Hugging Face column names
and label conventions of the hub ``glue`` dataset. Three sources exist because
users have the data in three forms: the hub (``data_dir=None``), the classic
TSV folder of ``download_glue_data.py``, and the hub's parquet files copied to
disk (offline machines). The format on disk is detected, not configured.

``load_task`` is the one entry point for the trainer: it also serves the
offline ``demo`` task, which is generated rather than read.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from train.demo_task import make_demo_task
from train.errors import DataError



@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What the trainer needs to know about a task.

    ``metric_names`` lists every metric the task reports over all its eval
    splits. A split other than the first reports its metrics with the suffix
    from ``metric_suffix`` (only MNLI has one: ``validation_mismatched`` gives
    ``accuracy_mm``), so one results dict can hold both MNLI splits.
    ``num_labels == 1`` means regression (STS-B).
    """

    name: str
    text_keys: tuple[str, ...]
    num_labels: int
    metric_names: tuple[str, ...]
    eval_splits: tuple[str, ...]
    main_metric: str

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


_V = ("validation",)
TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec("cola", ("sentence",), 2, ("matthews_correlation",), _V, "matthews_correlation"),
        TaskSpec("sst2", ("sentence",), 2, ("accuracy",), _V, "accuracy"),
        TaskSpec("mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1"), _V, "accuracy"),
        TaskSpec("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearman"), _V, "pearson"),
        TaskSpec("qqp", ("question1", "question2"), 2, ("accuracy", "f1"), _V, "accuracy"),
        TaskSpec(
            "mnli",
            ("premise", "hypothesis"),
            3,
            ("accuracy", "accuracy_mm"),
            ("validation_matched", "validation_mismatched"),
            "accuracy",
        ),
        TaskSpec("qnli", ("question", "sentence"), 2, ("accuracy",), _V, "accuracy"),
        TaskSpec("rte", ("sentence1", "sentence2"), 2, ("accuracy",), _V, "accuracy"),
        TaskSpec("demo", ("sentence",), 2, ("accuracy",), _V, "accuracy"),
    )
}
GLUE_TASKS = tuple(name for name in TASKS if name != "demo")


def metric_suffix(split: str) -> str:
    """Suffix for metric names of ``split``: ``_mm`` for MNLI mismatched, else empty."""
    return "_mm" if split == "validation_mismatched" else ""


def get_task(name: str) -> TaskSpec:
    """Spec of a task; accepts GLUE spellings such as ``SST-2`` or ``sts_b``."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise DataError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[key]


@dataclasses.dataclass(frozen=True)
class _TsvLayout:
    """Where a task's fields sit in its download_glue_data.py TSV files."""

    folder: str
    text_columns: tuple[str, ...]  # file columns, in the order of TaskSpec.text_keys
    label_column: str
    label_classes: tuple[str, ...] = ()  # text labels, in HF label-id order
    header: tuple[str, ...] = ()  # set only for files without a header row


_TSV = {
    "cola": _TsvLayout("CoLA", ("sentence",), "label", header=("source", "label", "original_label", "sentence")),
    "sst2": _TsvLayout("SST-2", ("sentence",), "label"),
    "mrpc": _TsvLayout("MRPC", ("#1 String", "#2 String"), "Quality"),
    "stsb": _TsvLayout("STS-B", ("sentence1", "sentence2"), "score"),
    "qqp": _TsvLayout("QQP", ("question1", "question2"), "is_duplicate"),
    "mnli": _TsvLayout("MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction")),
    "qnli": _TsvLayout("QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment")),
    "rte": _TsvLayout("RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment")),
}
_TSV_FILES = {
    "train": "train.tsv",
    "validation": "dev.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
}


def load_task(name: str, data_dir: str | Path | None = None) -> dict[str, dict[str, list]]:
    """Splits of any registered task: the generated demo task or a GLUE task."""
    spec = get_task(name)
    if spec.name != "demo":
        return load_glue(spec.name, data_dir)
    if data_dir is not None:
        raise DataError("the demo task is generated in memory; do not pass --data-dir with it")
    return make_demo_task()


def load_glue(task: str, data_dir: str | Path | None = None) -> dict[str, dict[str, list]]:
    """Train and eval splits of a GLUE task as ``{split: {column: list}}``.

    ``data_dir=None`` downloads from the hub. Otherwise ``data_dir`` is the
    GLUE root or the task folder, holding either ``train.tsv``/``dev*.tsv``
    (download_glue_data.py) or ``train-*.parquet``/``validation*-*.parquet``.
    """
    spec = get_task(task)
    if spec.name not in _TSV:
        raise DataError(f"{spec.name!r} is not a GLUE task; use load_task for it")
    if data_dir is None:
        return _load_hub(spec)
    root = Path(data_dir).expanduser()
    layout = _TSV[spec.name]
    for folder in (root, root / layout.folder, root / spec.name):
        if (folder / "train.tsv").is_file():
            return {s: _read_tsv(folder / _TSV_FILES[s], spec, layout) for s in _splits(spec)}
        if sorted(folder.glob("train-*.parquet")):
            return {s: _read_parquet(folder, s, spec) for s in _splits(spec)}
    raise DataError(
        f"no {layout.folder} data under {root}: expected {root / layout.folder / 'train.tsv'} "
        f"(the GLUE layout of download_glue_data.py) or {root / spec.name / 'train-*.parquet'} "
        "(Hugging Face parquet); pass --data-dir pointing at the GLUE root or the task folder, "
        "or omit it to download from the hub"
    )


def _splits(spec: TaskSpec) -> tuple[str, ...]:
    return ("train",) + spec.eval_splits


def _load_hub(spec: TaskSpec) -> dict[str, dict[str, list]]:
    """Download with ``datasets``; imported here so offline use never needs it.

    The hub moved ``glue`` to ``nyu-mll/glue``; the bare name now 404s.
    """
    import datasets

    ds = datasets.load_dataset("nyu-mll/glue", spec.name)
    return {s: {k: list(ds[s][k]) for k in spec.text_keys + ("label",)} for s in _splits(spec)}


def _read_tsv(path: Path, spec: TaskSpec, layout: _TsvLayout) -> dict[str, list]:
    """Parse one TSV file the way the HF ``glue`` builder does.

    Quoting is off (sentences contain bare quotes), ``utf-8-sig`` drops the BOM
    that MRPC's header carries, and rows too short to hold every needed field
    are skipped, as the HF builder skips them.
    """
    if not path.is_file():
        raise DataError(
            f"expected {path} beside {path.parent / 'train.tsv'}; re-run download_glue_data.py "
            "or pass --data-dir pointing at a complete GLUE folder"
        )
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = list(layout.header) or next(rows, [])
        wanted = layout.text_columns + (layout.label_column,)
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataError(f"{path} lacks column {missing[0]!r} (has {header}); is it a {layout.folder} file?")
        cols = [header.index(c) for c in wanted]
        out: dict[str, list] = {k: [] for k in spec.text_keys + ("label",)}
        for row in rows:
            if len(row) <= max(cols):
                continue
            for key, c in zip(spec.text_keys, cols[:-1], strict=True):
                out[key].append(row[c])
            out["label"].append(_parse_label(row[cols[-1]], spec, layout, path, rows.line_num))
    return out


def _parse_label(raw: str, spec: TaskSpec, layout: _TsvLayout, path: Path, line: int):
    """HF label id (or STS-B float score) of a TSV label cell."""
    try:
        if spec.is_regression:
            return float(raw)
        return layout.label_classes.index(raw) if raw in layout.label_classes else int(raw)
    except ValueError:
        raise DataError(f"{path}:{line}: cannot read label {raw!r} of task {spec.name}") from None


def _read_parquet(folder: Path, split: str, spec: TaskSpec) -> dict[str, list]:
    """Concatenate the parquet shards of one split."""
    import pyarrow.parquet as pq

    files = sorted(folder.glob(f"{split}-*.parquet"))
    if not files:
        raise DataError(
            f"expected {folder / (split + '-*.parquet')} beside the train shards; copy every split's "
            "parquet files or pass --data-dir pointing at a complete folder"
        )
    out: dict[str, list] = {k: [] for k in spec.text_keys + ("label",)}
    for file in files:
        table = pq.read_table(file)
        for key in out:
            if key not in table.column_names:
                raise DataError(f"{file} lacks column {key!r} (has {table.column_names}); is it a {spec.name} file?")
            out[key].extend(table.column(key).to_pylist())
    if spec.is_regression:
        out["label"] = [float(v) for v in out["label"]]
    return out
