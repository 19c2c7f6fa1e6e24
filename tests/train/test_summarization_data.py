"""Summarization data, ROUGE, search options, configs and bad input, on the real CNN/DailyMail and XSum samples.

References are independent of the code under test: ``rouge_score`` called directly, transformers' own
``shift_tokens_right`` (Flax BART and mBART) and PyTorch ``NoRepeatNGramLogitsProcessor``, and the files read
back with json, csv and pyarrow.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import assert_one_line_error

from train import run
from train.byte_tokenizer import BOS_ID, EOS_ID, PAD_ID, make_byte_tokenizer
from train.errors import DataError
from train.input_pipeline import fit_bucket
from train.rouge import ROUGE_TYPES, rouge_scores, sentence_lines
from train.summarization_data import (
    IGNORE_INDEX,
    Seq2SeqLayout,
    encode,
    get_task,
    load_split,
    seq2seq_batch,
    shift_right,
)

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CNN, XSUM = SHARED_DATA / "cnn_dailymail", SHARED_DATA / "xsum"


@pytest.fixture(scope="module")
def cnn() -> Path:
    if not (CNN / "train.jsonl").is_file() or not (CNN / "validation.jsonl").is_file():
        pytest.skip(f"{CNN} is absent (real data lives beside the repo)")
    return CNN


@pytest.fixture(scope="module")
def xsum_rows() -> list[dict]:
    path = XSUM / "sample.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent (real data lives beside the repo)")
    return [json.loads(line) for line in path.read_text().splitlines()]


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- ROUGE


def lead_3(article: str) -> list[str]:
    """The article's first three sentences (split after '. '), the classic extractive baseline."""
    return [s.strip() + "." for s in article.split(". ")[:3]]


def test_rouge_matches_rouge_score_called_directly_on_real_highlights(cnn):
    from rouge_score import rouge_scorer

    records = json_lines(cnn / "validation.jsonl")
    references = [r["highlights"] for r in records]  # one highlight per line, as the dataset has them
    leads = [lead_3(r["article"]) for r in records]
    # The wrapper gets each lead as one line; rouge_score gets it one sentence per line, written out here.
    ours = rouge_scores(references, [" ".join(sentences) for sentences in leads])
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    direct = [scorer.score(ref, "\n".join(sentences)) for ref, sentences in zip(references, leads)]
    for name in ROUGE_TYPES:
        assert ours[name] == pytest.approx(np.mean([d[name].fmeasure for d in direct]), abs=1e-12), name
    assert 0.1 < ours["rouge1"] < 0.6 and ours["rougeLsum"] > ours["rougeL"]  # Lsum reads the sentences
    assert all(v == 1.0 for v in rouge_scores(references, references).values())


def test_sentence_lines_keeps_lines_and_splits_plain_text():
    assert sentence_lines("One here.\n  Two there!\n\n") == "One here.\nTwo there!"
    assert sentence_lines("Is it? Yes. It is!  Done") == "Is it?\nYes.\nIt is!\nDone"
    with pytest.raises(ValueError, match="as many generations as references"):
        rouge_scores(["a"], ["a", "b"])


# ---------------------------------------------------------------- reading splits


def test_jsonl_csv_parquet_and_hub_layouts_read_the_same_examples(cnn, tmp_path):
    """The real CNN/DM sample as JSON lines, a JSON list, CSV (its articles hold commas, quotes and newlines),
    a parquet file and the hub's shard layout under 3.0.0/: the same examples from each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    task = get_task("cnn_dailymail")
    expected = load_split(task, "train", cnn)
    rows = json_lines(cnn / "train.jsonl")
    assert [(e["id"], e["document"], e["summary"]) for e in expected] == [
        (r["id"], r["article"], r["highlights"]) for r in rows
    ]
    layouts = {name: tmp_path / name for name in ("json", "csv", "parquet", "shards")}
    for folder in layouts.values():
        folder.mkdir()
    (layouts["json"] / "train.json").write_text(json.dumps(rows))
    with open(layouts["csv"] / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "article", "highlights"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), layouts["parquet"] / "train.parquet")
    (layouts["shards"] / "3.0.0").mkdir()
    for i, part in enumerate((rows[:60], rows[60:])):
        pq.write_table(pa.Table.from_pylist(part), layouts["shards"] / "3.0.0" / f"train-0000{i}-of-00002.parquet")
    for name, folder in layouts.items():
        assert load_split(task, "train", folder) == expected, name


def test_xsum_sample_without_ids_and_renamed_columns(xsum_rows, tmp_path):
    task = get_task("XSum")
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in xsum_rows))
    examples = load_split(task, "validation", tmp_path)
    assert [e["id"] for e in examples] == [str(i) for i in range(10)]  # no id column: the row number
    assert [(e["document"], e["summary"]) for e in examples] == [(r["document"], r["summary"]) for r in xsum_rows]
    renamed = [{"text": r["document"], "headline": r["summary"]} for r in xsum_rows]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in renamed))
    again = load_split(task, "test", tmp_path, text_column="text", summary_column="headline")
    assert [(e["document"], e["summary"]) for e in again] == [(e["document"], e["summary"]) for e in examples]


@pytest.mark.parametrize("case, message", [
    ("missing column", "train.jsonl has no column 'article' (its columns: id, text, highlights); name the text "
                       "and summary columns with --text-column and --summary-column"),
    ("empty split", "the train split ({dir}/train.jsonl) holds no examples"),
    ("no file", "no test split of cnn_dailymail in {dir}: expected test.jsonl, .json, .csv or .parquet (or "
                "test-*.parquet shards); it holds train.jsonl; pass --eval-split validation"),
    ("twice", "holds the train split more than once (train.jsonl, train.csv); keep one of them"),
    ("not text", "row 1 has NoneType in column 'highlights', not text"),
    ("bad json", "train.jsonl:2: not a JSON object"),
])  # fmt: skip
def test_bad_files_are_one_line_data_errors(tmp_path, case, message):
    good = {"id": "a", "article": "Some text.", "highlights": "Text."}
    lines = {
        "missing column": [{"id": "a", "text": "x", "highlights": "y"}],
        "empty split": [],
        "no file": [good],
        "twice": [good],
        "not text": [good, {**good, "highlights": None}],
    }.get(case)
    if lines is not None:
        (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if case == "twice":
        (tmp_path / "train.csv").write_text("id,article,highlights\na,b,c\n")
    if case == "bad json":
        (tmp_path / "train.jsonl").write_text(json.dumps(good) + "\n{oops\n")
    split = "test" if case == "no file" else "train"
    with pytest.raises(DataError) as err:
        load_split(get_task("cnn_dailymail"), split, tmp_path)
    assert "\n" not in str(err.value) and message.format(dir=tmp_path) in str(err.value)


# ---------------------------------------------------------------- tokenization and batches


def test_byte_tokenized_pairs_end_in_eos_and_shift_as_transformers_shifts(cnn):
    from transformers.models.bart.modeling_flax_bart import shift_tokens_right as bart_shift
    from transformers.models.mbart.modeling_flax_mbart import shift_tokens_right as mbart_shift

    tokenizer = make_byte_tokenizer()
    records = load_split(get_task("cnn_dailymail"), "validation", cnn)[:3]
    sources = encode(tokenizer, [r["document"] for r in records], 64)
    targets = encode(tokenizer, ["Short.", *(r["summary"] for r in records[1:])], 32, target=True)
    assert sources[0] == [BOS_ID, *records[0]["document"].encode()[:62], EOS_ID]  # cut, EOS kept last
    assert targets[0] == [BOS_ID, *b"Short.", EOS_ID] and all(len(t) == 32 for t in targets[1:])
    batch = seq2seq_batch(sources, targets, 64, 32, Seq2SeqLayout(PAD_ID, EOS_ID, False, 0.1))
    assert {k: v.shape for k, v in batch.items()} == {
        "input_ids": (3, 64),
        "attention_mask": (3, 64),
        "labels": (3, 32),
        "decoder_input_ids": (3, 32),
        "decoder_attention_mask": (3, 32),
        "label_smoothing": (3,),
    }
    assert (batch["labels"][0, 8:] == IGNORE_INDEX).all() and batch["decoder_attention_mask"][0].sum() == 8
    np.testing.assert_array_equal(batch["label_smoothing"], np.full(3, 0.1, np.float32))
    np.testing.assert_array_equal(batch["decoder_input_ids"], np.asarray(bart_shift(batch["labels"], PAD_ID, EOS_ID)))
    np.testing.assert_array_equal(
        shift_right(batch["labels"], PAD_ID, None, wrap_last=True), np.asarray(mbart_shift(batch["labels"], PAD_ID))
    )


def per_step_local(job, rows: np.ndarray) -> dict[str, np.ndarray]:
    """`SummarizationJob.local` as it was when every step tokenized its records (`encode`) and padded them
    (`seq2seq_batch`): the reference the tokens stored once must reproduce."""
    config = job.config
    records = [job.train_records[i] for i in rows.reshape(-1)]
    sources = encode(job.tokenizer, [r["document"] for r in records], config.max_source_length)
    targets = encode(job.tokenizer, [r["summary"] for r in records], config.max_target_length, target=True)
    source_length, target_length = config.max_source_length, config.max_target_length
    if job.source_buckets:
        source_length = fit_bucket(job.source_buckets, max(map(len, sources)))
        target_length = fit_bucket(job.target_buckets, max(map(len, targets)))
    batch = seq2seq_batch(sources, targets, source_length, target_length, job.layout)
    return {k: v.reshape(*rows.shape, *v.shape[1:]) for k, v in batch.items()}


def summarization_job(data_dir: Path, task: str = "cnn_dailymail", **options):
    """A prepared `SummarizationJob` of ``tiny-bart`` (byte tokenizer) on one device."""
    from rocoft_jax import sharding
    from train.config import TrainConfig
    from train.tasks.summarization import SummarizationJob

    values = dict(model="tiny-bart", task=task, data_dir=str(data_dir), eval_split="validation", label_smoothing=0.1)
    job = SummarizationJob(TrainConfig(**{**values, **options}))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    job.prepare(make_byte_tokenizer(), jax.sharding.NamedSharding(mesh, sharding.BATCH))
    return job


@pytest.mark.parametrize("task, options", [
    ("cnn_dailymail", dict(max_source_length=1024, max_target_length=512, batch_size=1, grad_accum=2)),
    ("cnn_dailymail", dict(max_source_length=512, max_target_length=128, batch_size=3, bucket=False)),
    ("xsum", dict(max_source_length=1024, max_target_length=128, batch_size=1)),  # sources of 219 to 5634 bytes
])  # fmt: skip
def test_pairs_stored_once_give_the_per_step_batches(cnn, xsum_rows, tmp_path, task, options):
    """`SummarizationJob.local` from the train split tokenized once equals tokenizing each step's records anew,
    array for array, for every step of an epoch and for row sets of any shape."""
    data_dir = cnn
    if task == "xsum":
        data_dir = tmp_path
        for split in ("train", "validation"):
            (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in xsum_rows))
    job = summarization_job(data_dir, task, **options)
    config, n = job.config, job.num_train
    rng = np.random.default_rng(0)
    row_sets = [job.step_rows(s) for s in range(n // (config.batch_size * config.grad_accum))]
    row_sets += [rng.integers(0, n, shape) for shape in ((1,), (5,), (2, 3))]
    shapes = set()
    for rows in row_sets:
        got, want = job.local(rows), per_step_local(job, rows)
        assert list(got) == list(want)
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        shapes.add((want["input_ids"].shape[-1], want["labels"].shape[-1]))
    assert len(shapes) > 1 or not config.bucket  # the batches met several buckets


def test_planned_batches_are_the_shapes_of_every_train_batch(cnn):
    """Three epochs of the real CNN/DailyMail sample at 2 rows: the planned shapes are those of the train
    batches (source and target buckets, and whether the source mask is dropped), each once."""
    from train import timing

    job = summarization_job(cnn, max_source_length=1024, max_target_length=512, batch_size=2)
    steps = 3 * job.num_train // 2
    train, evals = job.planned_batches(steps)

    def key(batch):
        return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))

    assert evals == [] and len({key(b) for b in train}) == len(train)
    assert {key(job.train_batch(s)) for s in range(steps)} == {key(b) for b in train}
    assert {timing.describe(b) for b in train} == {  # sources cut to 1024 tokens, or shorter ones
        "2x1024 no mask, decoder 2x256",
        "2x1024 no mask, decoder 2x512",
        "2x1024, decoder 2x512",
    }


def test_no_repeat_ngram_bans_what_transformers_pytorch_bans():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    from train.tasks.summarization import NoRepeatNGram

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, (6, 24)).astype(np.int32)  # a small vocabulary repeats n-grams often
    scores = rng.normal(size=(6, 7)).astype(np.float32)
    for size in (1, 2, 3, 4):
        ours, banned = jax.jit(NoRepeatNGram(size).__call__), 0
        for cur_len in (1, 2, 3, 9, 24):
            padded = ids.copy()
            padded[:, cur_len:] = 6  # not yet generated: must not count
            expected = NoRepeatNGramLogitsProcessor(size)(
                torch.from_numpy(ids[:, :cur_len]).long(), torch.from_numpy(scores.copy())
            ).numpy()
            got = np.asarray(ours(padded, scores, cur_len))
            np.testing.assert_array_equal(np.isinf(got), np.isinf(expected), err_msg=f"size {size}, length {cur_len}")
            banned += int(np.isinf(expected).sum())
        assert banned > 0, size  # the cases exercise bans


# ---------------------------------------------------------------- configs, sharding, bad input


@pytest.mark.parametrize("task, search", [
    ("xsum", (6, 62, 0, 1.0, 0)),
    ("cnn_dailymail", (4, 142, 56, 2.0, 3)),
])  # fmt: skip
def test_task_configs_are_table_10_with_the_bart_recipes(task, search):
    from train import config as config_lib

    parser = argparse.ArgumentParser()
    config_lib.add_arguments(parser)
    config = config_lib.resolve(parser.parse_args(["--task", task]))
    assert (config.lr, config.epochs, config.batch_size, config.warmup_steps, config.weight_decay) == (
        1e-4,
        4,
        16,
        100,
        0.01,
    )
    assert (config.method, config.rank, config.mode, config.strategy, config.lr_schedule) == (
        "rocoft",
        3,
        "row",
        "random",
        "cosine",
    )
    assert (config.dropout, config.train_bias, config.label_smoothing) == (0.1, True, 0.1)
    assert (config.max_source_length, config.max_target_length) == (1024, 128)
    got = (config.num_beams, config.max_new_tokens, config.min_new_tokens, config.length_penalty)
    assert (*got, config.no_repeat_ngram_size) == search


def test_every_leaf_of_a_seq2seq_bart_has_a_partition_rule():
    """On a data=1,fsdp=2,tensor=2 mesh: cross-attention shards as self-attention does, the LM bias is replicated."""
    from jax.sharding import AbstractMesh, AxisType
    from jax.sharding import PartitionSpec as P

    from rocoft_jax import sharding
    from rocoft_jax.tree import flat_paths
    from train import models

    model = models.unbound_model(models.preset_config("tiny-bart"), "seq2seq-lm", "fp32", remat=False)
    shapes = jax.eval_shape(lambda rng: model.init_weights(rng, (1, 8)), jax.random.PRNGKey(0))
    mesh = AbstractMesh((1, 2, 2), sharding.AXES, axis_types=(AxisType.Auto,) * 3)
    specs = flat_paths(sharding.partition_specs(shapes, "bart", mesh))
    layer = "model/decoder/layers/0"
    assert (
        specs[f"{layer}/encoder_attn/k_proj/kernel"] == specs[f"{layer}/self_attn/k_proj/kernel"] == P("fsdp", "tensor")
    )
    assert specs[f"{layer}/encoder_attn/out_proj/kernel"] == P("tensor", "fsdp")
    assert set(specs["final_logits_bias"]) == {None} and specs["model/shared/embedding"] == P(None, "fsdp")


@pytest.mark.parametrize("args, message", [
    (["--task", "xsum2"], "unknown task 'xsum2'; valid tasks: cola, "),
    (["--model", "tiny"], "--task cnn_dailymail trains a seq2seq LM, and --model tiny is a roberta model"),
    (["--model", "T5DIR"], "is a t5 model, and transformers' Flax T5 does not run on jax >= 0.10"),
    (["--min-new-tokens", "20", "--max-new-tokens", "10"], "--min-new-tokens 20 exceeds the 10 tokens generated"),
    (["--max-source-length", "2048"], "--max-source-length asks for 2048 positions, but --model tiny-bart has 1024"),
    (["--eval-split", "test"], "no test split of cnn_dailymail in DATA"),
    (["--text-column", "body"], "train.jsonl has no column 'body' (its columns: id, article, highlights)"),
    (["--data-dir", "EMPTY"], "the train split (EMPTY/train.jsonl) holds no examples"),
])  # fmt: skip
def test_bad_summarization_input_gives_one_line_and_exit_2(cnn, tmp_path, capsys, args, message):
    import transformers

    transformers.T5Config().save_pretrained(tmp_path / "t5")
    (tmp_path / "empty").mkdir()
    for split in ("train", "validation"):
        (tmp_path / "empty" / f"{split}.jsonl").write_text("")
    names = {"T5DIR": str(tmp_path / "t5"), "DATA": str(cnn), "EMPTY": str(tmp_path / "empty")}
    args = [names.get(a, a) for a in args]
    base = ["--model", "tiny-bart", "--task", "cnn_dailymail", "--data-dir", str(cnn), "--eval-split", "validation"]
    code = run.main(["--output-dir", str(tmp_path / "o"), "--max-steps", "1", *base, *args])
    assert code == 2
    for key, value in names.items():
        message = message.replace(key, value)
    assert_one_line_error(capsys, message)
