"""Tokenization shapes, and the batch guarantees resume and multi-host rely on."""

import itertools

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from transformers import PreTrainedTokenizerFast

from rocoft_jax import sharding
from train import input_pipeline as ip
from train.config import TrainConfig
from train.errors import DataError
from train.glue import get_task
from train.tasks.demo import make_demo_task, make_demo_tokenizer
from train.tasks.glue import Batches


@pytest.fixture(scope="module")
def tokenizer():
    return make_demo_tokenizer(model_max_length=64)


def test_demo_tokenizer_round_trip(tokenizer):
    sentence = make_demo_task(num_train=1, num_eval=1)["train"]["sentence"][0]
    ids = tokenizer(sentence)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 0 and ids[-1] == tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 1 and tokenizer.model_max_length == 64
    assert tokenizer.decode(ids, skip_special_tokens=True) == sentence
    assert tokenizer.unk_token_id in tokenizer("zebra cat")["input_ids"]


def test_encode_fixed_shapes_and_dtypes(tokenizer):
    cols = {"sentence": ["good cat", "bad dog walks near the river " * 4], "label": [1, 0]}
    enc = ip.encode(tokenizer, cols, ("sentence",), max_length=16)
    assert set(enc) == {"input_ids", "attention_mask", "labels"}  # RoBERTa style: no token type ids
    assert all(v.dtype == np.int32 for v in enc.values()) and enc["input_ids"].shape == (2, 16)
    assert enc["input_ids"][0, :5].tolist() == [0, *tokenizer.convert_tokens_to_ids(["good", "cat"]), 2, 1]
    assert enc["attention_mask"][0].sum() == 4 and enc["attention_mask"][1].sum() == 16  # truncated
    assert enc["labels"].tolist() == [1, 0]


def test_encode_pairs_regression_and_chunks(tokenizer):
    cols = {"s1": ["good cat", "a dog", "the tree"], "s2": ["sad bird", "cold", "warm road"], "label": [5.0, 0.4, 2.5]}
    enc = ip.encode(tokenizer, cols, ("s1", "s2"), max_length=12)
    assert enc["labels"].dtype == np.float32
    assert (
        tokenizer.decode(enc["input_ids"][0]).split() == "<s> good cat </s> </s> sad bird </s>".split() + ["<pad>"] * 4
    )
    chunked = ip.encode(tokenizer, cols, ("s1", "s2"), max_length=12, chunk_size=2)
    assert all(np.array_equal(enc[k], chunked[k]) for k in enc)


def test_encode_keeps_token_type_ids_when_returned(tokenizer):
    bert_like = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>")
    enc = ip.encode(bert_like, {"sentence": ["good cat"], "label": [1]}, ("sentence",), max_length=8)
    assert enc["token_type_ids"].dtype == np.int32 and enc["token_type_ids"].shape == (1, 8)


def test_train_batches_are_deterministic_and_resume_exactly():
    n, bs, seed = 103, 8, 7
    run = [ip.train_batch_indices(n, bs, seed, s) for s in range(40)]
    ip.epoch_permutation.cache_clear()  # a fresh process resuming at step 25
    resumed = [ip.train_batch_indices(n, bs, seed, s) for s in range(25, 40)]
    assert all(np.array_equal(a, b) for a, b in zip(run[25:], resumed, strict=True))
    assert not np.array_equal(run[0], ip.train_batch_indices(n, bs, seed + 1, 0))
    assert all(b.shape == (bs,) for b in run)


def test_each_example_at_most_once_per_epoch():
    n, bs = 103, 8
    spe = ip.steps_per_epoch(n, bs)
    assert spe == 12
    for epoch in range(3):
        seen = np.concatenate([ip.train_batch_indices(n, bs, 0, epoch * spe + i) for i in range(spe)])
        assert len(np.unique(seen)) == spe * bs and seen.min() >= 0 and seen.max() < n
    epoch0 = np.concatenate([ip.train_batch_indices(n, bs, 0, i) for i in range(spe)])
    assert not np.array_equal(epoch0, seen)  # epochs reshuffle
    full = np.sort(np.concatenate([ip.train_batch_indices(96, bs, 0, i) for i in range(12)]))
    assert np.array_equal(full, np.arange(96))  # divisible: every example exactly once


def test_batch_larger_than_dataset_is_a_clear_error():
    with pytest.raises(DataError, match="batch size 64 exceeds the 10 training examples"):
        ip.train_batch_indices(10, 64, 0, 0)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_process_shards_concatenate_to_global_batch(count):
    batch = ip.train_batch_indices(1000, 32, 3, 17)
    shards = [ip.shard_for_process(batch, i, count) for i in range(count)]
    assert np.array_equal(np.concatenate(shards), batch) and {len(s) for s in shards} == {32 // count}


def test_indivisible_process_share_is_a_clear_error():
    with pytest.raises(DataError, match="global batch size 30 is not divisible by the 4 processes"):
        ip.shard_for_process(np.arange(30), 0, 4)


@pytest.mark.parametrize("n, bs, count", [(37, 8, 1), (37, 8, 2), (37, 8, 4), (32, 8, 2), (3, 16, 4)])
def test_eval_rows_cover_each_example_once(n, bs, count):
    real = []
    for rows, weights in ip.eval_rows(n, bs):
        assert rows.shape == (bs,) and weights.dtype == np.float32 and rows.max() < n
        shares = [ip.shard_for_process(rows, i, count) for i in range(count)]
        assert np.array_equal(np.concatenate(shares), rows)
        real.extend(rows[weights == 1].tolist())
    assert sorted(real) == list(range(n))


def test_select_takes_raw_rows():
    columns = {"sentence": ["a", "b", "c"], "label": [0, 1, 0]}
    assert ip.select(columns, np.array([2, 0])) == {"sentence": ["c", "a"], "label": [0, 0]}


def test_drop_full_mask_drops_an_all_ones_mask_and_keeps_padding():
    ids = np.arange(24, dtype=np.int32).reshape(2, 3, 4)  # (B, N, T), as under --grad-accum
    full = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    dropped = ip.drop_full_mask(full, process_count=1)
    assert set(dropped) == {"input_ids", "loss_mask"} and dropped["input_ids"] is ids
    assert "attention_mask" in full  # the input is left alone
    padded = {**full, "attention_mask": np.ones_like(ids)}
    padded["attention_mask"][1, 2, 3] = 0
    assert ip.drop_full_mask(padded, process_count=1) is padded
    assert ip.drop_full_mask({"input_ids": ids}, process_count=1) == {"input_ids": ids}
    assert ip.drop_full_mask(full, process_count=2) is full  # processes must run one program


@pytest.mark.parametrize("max_length, dropped", [(4, True), (32, False)])
def test_train_batches_drop_a_full_mask_and_eval_batches_keep_it(tokenizer, max_length, dropped):
    """Cut to 4 tokens every row is full; at 32 (bucket 16) the demo sentences leave padding."""
    columns = make_demo_task(num_train=8, num_eval=1)["train"]
    mesh = sharding.make_mesh(sharding.parse_mesh("", 1), jax.devices()[:1])
    config = TrainConfig(max_length=max_length, batch_size=4)
    spec = get_task("demo")
    splits = {"train": columns, **dict.fromkeys(spec.eval_splits, columns)}
    batches = Batches(config, spec, tokenizer, NamedSharding(mesh, sharding.BATCH), splits)
    train = batches.train(0)
    assert ("attention_mask" not in train) == dropped
    evaluated = batches.make("train", np.arange(4))
    assert np.asarray(evaluated["attention_mask"]).all() == dropped  # eval batches always carry the mask


def test_ragged_encoding_pads_exactly_as_encode(tokenizer):
    """`Encoded.batch` rebuilds `encode`'s arrays for any rows, at full length and cut to a shorter one."""
    columns = make_demo_task(num_train=40, num_eval=1)["train"]
    dense = ip.encode(tokenizer, columns, ("sentence",), max_length=24, chunk_size=16)
    ragged = ip.encode_ragged(tokenizer, columns, ("sentence",), max_length=24, chunk_size=16)
    rows = np.array([5, 0, 39, 17, 17])
    assert ragged.lengths.tolist() == dense["attention_mask"].sum(axis=1).tolist()
    full = ragged.batch(rows)
    assert set(full) == set(dense) and all(np.array_equal(full[k], dense[k][rows]) for k in dense)
    short = ragged.batch(rows, int(ragged.lengths[rows].max()))
    assert np.array_equal(short["input_ids"], dense["input_ids"][rows, : short["input_ids"].shape[1]])
    with pytest.raises(ValueError, match="more than the batch length"):
        ragged.batch(rows, 2)


def test_ragged_encoding_of_real_pairs_keeps_token_type_ids(minilm_tokenizer, glue_dir):
    """Real RTE sentence pairs with a WordPiece tokenizer (token type ids, longest-first truncation)."""
    from train.glue import load_glue

    columns = {k: v[:64] for k, v in load_glue("rte", glue_dir)["train"].items()}
    keys = get_task("rte").text_keys
    dense = ip.encode(minilm_tokenizer, columns, keys, max_length=128)
    ragged = ip.encode_ragged(minilm_tokenizer, columns, keys, max_length=128)
    rows = np.arange(64)[::-1]
    batch = ragged.batch(rows)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert all(np.array_equal(batch[k], dense[k][rows]) for k in batch)
    assert (ragged.lengths == 128).any() and (ragged.lengths < 128).any()  # some were truncated


def test_ragged_rows_of_chunks_pad_as_encoded_without_labels():
    """Token rows given chunk by chunk: any rows right-padded with the input's pad value, no labels."""
    encoded = ip.ragged_rows(iter([[[5, 6, 7], [8]], [], [[9, 10]]]), "labels", -100, 4)
    assert encoded.lengths.tolist() == [3, 1, 2] and encoded.labels is None
    batch = encoded.batch(np.array([2, 0, 2]), 3)
    assert list(batch) == ["labels", "attention_mask"]
    assert batch["labels"].tolist() == [[9, 10, -100], [5, 6, 7], [9, 10, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 0]]
    assert batch["labels"].dtype == batch["attention_mask"].dtype == np.int32


def test_chunked_gives_consecutive_slices_and_counts_each_item_once(capsys):
    """Every item once, in order, in slices of the size (the last one short); the bar ends at the item count."""
    items = list(range(10))
    assert [list(part) for part in ip.chunked(items, 4, "tokenizing", progress=True)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]
    assert "10/10" in capsys.readouterr().err
    assert list(ip.chunked([], 4, "tokenizing")) == []


@settings(max_examples=40, deadline=None)
@given(st.integers(4, 40), st.integers(1, 4), st.integers(0, 60), st.integers(0, 3))
def test_steps_by_shapes_finds_the_first_step_of_every_shape(n, batch_size, total_steps, seed):
    """Against every step's rows: the first step of each combination of (bucket, full) over two sequences; with
    one sequence, `steps_by_shape`."""
    rng = np.random.default_rng(seed)
    lengths = [rng.integers(1, 9, n), rng.integers(1, 33, n)]
    buckets = [(2, 4, 8), (8, 16, 32)]
    batch_size = min(batch_size, n)
    first: dict[tuple, int] = {}
    first_of_one: dict[tuple, int] = {}
    for step in range(total_steps):
        rows = ip.train_batch_indices(n, batch_size, seed, step)
        key = []
        for sequence, bucket in zip(lengths, buckets):
            length = ip.fit_bucket(bucket, int(sequence[rows].max()))
            key += [length, bool((sequence[rows] == length).all())]
        first.setdefault(tuple(key), step)
        first_of_one.setdefault(tuple(key[:2]), step)
    assert ip.steps_by_shapes(lengths, buckets, batch_size, seed, total_steps) == sorted(first.values())
    one = ip.steps_by_shape(lengths[0], batch_size, seed, total_steps, buckets[0])
    assert one == sorted(first_of_one.values())


def _padded_tokens(buckets, longest):
    return sum(next(b for b in sorted(buckets) if b >= x) for x in longest)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 200), min_size=1, max_size=24), st.sampled_from([0.0, 0.05, 0.3]))
def test_choose_buckets_is_the_optimal_set_of_the_fewest_buckets(longest, tolerance):
    """Against brute force over every candidate set: the fewest buckets within tolerance, optimal for that count."""
    buckets = ip.choose_buckets(longest, 256, tolerance=tolerance, multiple=16, limit=4)
    rounded = [-(-x // 16) * 16 for x in longest]
    assert buckets[-1] == 256 and all(b % 16 == 0 for b in buckets) and list(buckets) == sorted(set(buckets))
    candidates = sorted(set(rounded))
    for count in range(1, min(4, len(candidates)) + 1):
        best = min(
            _padded_tokens(set(c), rounded) for c in itertools.combinations(candidates, count) if max(candidates) in c
        )
        if best <= sum(rounded) * (1 + tolerance) or count == min(4, len(candidates)):
            break
    assert _padded_tokens(buckets, rounded) == best
    assert len(set(buckets) - {256}) <= count


def test_choose_buckets_on_real_stsb_beats_powers_of_two_in_padding(minilm_tokenizer, glue_dir):
    """STS-B at batch 32: a few data-chosen buckets pad less than 16, 32, 64, 128."""
    from train.glue import load_glue

    columns = load_glue("stsb", glue_dir)["train"]
    lengths = ip.encode_ragged(minilm_tokenizer, columns, get_task("stsb").text_keys, 128).lengths
    order = ip.epoch_permutation(len(lengths), 0, 0)
    longest = lengths[order[: len(order) // 32 * 32]].reshape(-1, 32).max(axis=1)
    chosen = ip.choose_buckets(longest, 128)
    assert len(chosen) <= 5
    assert _padded_tokens(chosen, longest) < 0.9 * _padded_tokens(ip.bucket_lengths(128), longest)


@pytest.mark.parametrize("bucket, max_length", [(True, 128), (False, 12)], ids=["buckets", "no-buckets"])
def test_planned_batches_hold_every_shape_a_run_meets(minilm_tokenizer, glue_dir, bucket, max_length):
    """Real STS-B: every train step of three epochs and every eval batch has a shape in `Batches.planned`,
    which lists each shape once; without buckets too, where a batch whose rows all fill --max-length drops
    its mask."""
    from train.glue import load_glue

    spec = get_task("stsb")
    data = load_glue("stsb", glue_dir)
    splits = {"train": {k: v[:640] for k, v in data["train"].items()}, "validation": data["validation"]}
    mesh = sharding.make_mesh(sharding.parse_mesh("", 1), jax.devices()[:1])
    config = TrainConfig(task="stsb", batch_size=32, max_length=max_length, bucket=bucket)
    batches = Batches(config, spec, minilm_tokenizer, NamedSharding(mesh, sharding.BATCH), splits)
    steps = 3 * ip.steps_per_epoch(640, 32)
    train, evals = batches.planned(steps)

    def key(batch):
        return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))

    assert len({key(b) for b in train}) == len(train) and len({key(b) for b in evals}) == len(evals)
    assert {key(batches.host("train", batches.train_rows(s), train=True)) for s in range(steps)} == {
        key(b) for b in train
    }
    assert {key(batch) for batch, _, _ in batches.eval_batches("validation")} == {key(b) for b in evals}
    if bucket:
        assert len(batches.buckets) <= 5 and batches.buckets[-1] == 128
    else:  # both shapes occur at length 12: the test would pass vacuously otherwise
        assert batches.buckets is None and {"attention_mask" in b for b in train} == {True, False}
