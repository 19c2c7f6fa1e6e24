"""Tokenization shapes, and the batch guarantees resume and multi-host rely on."""

import jax
import numpy as np
import pytest
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
    ip._epoch_permutation.cache_clear()  # a fresh process resuming at step 25
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
    batches = Batches(config, get_task("demo"), tokenizer, NamedSharding(mesh, sharding.BATCH))
    train = batches.train(columns, 0)
    assert ("attention_mask" not in train) == dropped
    evaluated = batches.make(columns, np.arange(4))
    assert np.asarray(evaluated["attention_mask"]).all() == dropped  # eval batches always carry the mask
