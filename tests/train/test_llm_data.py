"""LLM-Adapters data, prompts, tokenization and answer rules, against the original source and the real files."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from rocoft_jax import sharding
from train.byte_tokenizer import make_byte_tokenizer
from train.config import TrainConfig
from train.input_pipeline import fit_bucket
from train.llm_data import (
    IGNORE_INDEX,
    TASKS,
    DataError,
    extract_answer,
    find_file,
    format_eval_prompt,
    format_train_prompt,
    get_task,
    is_correct,
    load_records,
    tokenize_example,
)
from train.tasks.llm import LlmJob

REPO = Path(__file__).resolve().parents[2]
DATASET = REPO.parent / "shared" / "data" / "llm-adapters" / "dataset"

# generate_prompt of LLM-Adapters' finetune.py, line by line as in the source (AGI-Edgerunners/LLM-Adapters main,
# identical in the HZQ950419 fork and NVlabs/DoRA). Every line ends in an explicit "\n", so the trailing spaces
# after "request." and the 16-space "blank" lines cannot be lost to an editor; long lines are split in two literals.
FINETUNE_SOURCE = (
    "def generate_prompt(data_point):\n"
    "    # sorry about the formatting disaster gotta move fast\n"
    '    if data_point["input"]:\n'
    '        return f"""Below is an instruction that describes a task, paired with an input that provides further '
    'context. Write a response that appropriately completes the request. \n'
    "\n"
    "                ### Instruction:\n"
    '                {data_point["instruction"]}\n'
    "                \n"
    "                ### Input:\n"
    '                {data_point["input"]}\n'
    "                \n"
    "                ### Response:\n"
    '                {data_point["output"]}""" # noqa: E501\n'
    "    else:\n"
    '        return f"""Below is an instruction that describes a task. Write a response that appropriately '
    'completes the request.  \n'
    "\n"
    "                ### Instruction:\n"
    '                {data_point["instruction"]}\n'
    "                \n"
    "                ### Response:\n"
    '                {data_point["output"]}""" # noqa: E501\n'
)  # fmt: skip
# generate_prompt of evaluate.py and commonsense_evaluate.py (the same text in both).
EVALUATE_SOURCE = (
    "def generate_prompt(instruction, input=None):\n"
    "    if input:\n"
    '        return f"""Below is an instruction that describes a task, paired with an input that provides further '
    'context. Write a response that appropriately completes the request.\n'
    "\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "\n"
    "                ### Input:\n"
    "                {input}\n"
    "\n"
    "                ### Response:\n"
    '                """  # noqa: E501\n'
    "    else:\n"
    '        return f"""Below is an instruction that describes a task. Write a response that appropriately '
    'completes the request. \n'
    "\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "\n"
    "                ### Response:\n"
    '                """  # noqa: E501\n'
)  # fmt: skip


def original(source: str):
    """The original function, run from its source text."""
    namespace: dict = {}
    exec(source, namespace)
    return namespace["generate_prompt"]


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (real data lives beside the repo)")
    return path


def record(instruction="Is water wet?\n\nAnswer format: true/false", output="the correct answer is true", input=""):
    return {"instruction": instruction, "input": input, "output": output, "answer": "true"}


RECORDS = [
    record(),
    record(input="Some context {with braces}"),
    record(instruction="{x} and \\n ### Response: inside", output="line one\n\nline two  "),
    record(output=""),
]


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize("rec", RECORDS)
def test_train_prompt_is_finetune_py_byte_for_byte(rec):
    assert format_train_prompt(rec) == original(FINETUNE_SOURCE)(rec)


@pytest.mark.parametrize("rec", RECORDS)
def test_eval_prompt_is_evaluate_py_byte_for_byte(rec):
    ours = format_eval_prompt(rec["instruction"], rec["input"])
    assert ours == original(EVALUATE_SOURCE)(rec["instruction"], rec["input"])
    # the originals differ in whitespace, so the eval prompt is not a prefix of the training text
    assert not format_train_prompt(rec).startswith(ours)


def test_template_bytes_spelled_out():
    indent = " " * 16
    assert format_train_prompt(record(instruction="Q?", output="A")) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"  \n\n{indent}### Instruction:\n{indent}Q?\n{indent}\n{indent}### Response:\n{indent}A"
    )
    assert format_eval_prompt("Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f" \n\n{indent}### Instruction:\n{indent}Q?\n\n{indent}### Response:\n{indent}"
    )


def test_real_records_match_the_original_templates():
    records = load_records(need(DATASET / "boolq" / "train.json"))[:200]
    for rec in records:
        assert format_train_prompt(rec) == original(FINETUNE_SOURCE)(rec)
        assert format_eval_prompt(rec["instruction"], rec["input"]) == original(EVALUATE_SOURCE)(rec["instruction"])


# ---------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenizer():
    """A LLaMA-like byte-level BPE (BOS added, EOS not) trained here on the templates; lossless on any text.

    Each whitespace character is its own pre-token, so the prompt's tokens are a prefix of prompt+output and the
    response-only mask can be checked token for token.
    """
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s"), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    corpus = [format_train_prompt(r) for r in RECORDS] * 20
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))  # fmt: skip
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def test_eos_appended_and_loss_over_everything(tokenizer):
    rec = record()
    out = tokenize_example(tokenizer, rec)
    expected = ids_of(tokenizer, format_train_prompt(rec)) + [tokenizer.eos_token_id]
    assert out["input_ids"].tolist() == expected and expected[0] == tokenizer.bos_token_id
    np.testing.assert_array_equal(out["labels"], out["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], np.ones(len(expected)))
    assert tokenizer.decode(out["input_ids"], skip_special_tokens=True) == format_train_prompt(rec)


def test_cutoff_and_eos_boundary(tokenizer):
    rec = record()
    full = ids_of(tokenizer, format_train_prompt(rec))
    n = len(full)
    exact = tokenize_example(tokenizer, rec, cutoff=n)["input_ids"].tolist()
    assert exact == full  # len == cutoff: no EOS, as `len(ids) < cutoff_len` fails
    assert tokenize_example(tokenizer, rec, cutoff=n + 1)["input_ids"].tolist() == full + [tokenizer.eos_token_id]
    truncated = tokenize_example(tokenizer, rec, cutoff=n - 5)
    assert truncated["input_ids"].tolist() == full[: n - 5]
    np.testing.assert_array_equal(truncated["labels"], truncated["input_ids"])
    assert tokenize_example(tokenizer, rec, add_eos=False)["input_ids"].tolist() == full


def test_no_second_eos_when_the_text_ends_in_one(tokenizer):
    ids = tokenize_example(tokenizer, record(output="the correct answer is true</s>"))["input_ids"].tolist()
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1


@pytest.mark.parametrize("rec", RECORDS)
def test_response_only_loss_masks_exactly_the_prompt_tokens(tokenizer, rec):
    out = tokenize_example(tokenizer, rec, train_on_inputs=False)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    prompt = ids_of(tokenizer, format_train_prompt({**rec, "output": ""}))
    assert ids[: len(prompt)] == prompt
    assert labels == [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
    assert tokenizer.decode(ids[len(prompt) :], skip_special_tokens=True) == rec["output"]
    assert ids[-1] == tokenizer.eos_token_id  # the EOS is trained on


def test_response_only_loss_when_the_prompt_is_truncated(tokenizer):
    out = tokenize_example(tokenizer, record(), cutoff=10, train_on_inputs=False)
    assert len(out["input_ids"]) == 10 and (out["labels"] == IGNORE_INDEX).all()


def test_tokenizer_without_eos_is_an_error(tokenizer):
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>")
    with pytest.raises(DataError, match="the tokenizer has no EOS token; set tokenizer.eos_token"):
        tokenize_example(no_eos, record())
    assert len(tokenize_example(no_eos, record(), add_eos=False)["input_ids"]) == len(
        ids_of(tokenizer, format_train_prompt(record()))
    )


def test_real_boolq_train_tokenizes_within_cutoff(tokenizer):
    for rec in load_records(find_file(need(DATASET), "boolq", "train"))[:300]:
        out = tokenize_example(tokenizer, rec, cutoff=256, train_on_inputs=False)
        ids, labels = out["input_ids"], out["labels"]
        assert len(ids) <= 256 and labels.shape == ids.shape
        if len(ids) < 256:
            assert ids[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(ids[labels != IGNORE_INDEX], skip_special_tokens=True) == rec["output"]


def per_step_local(job, rows: np.ndarray) -> dict[str, np.ndarray]:
    """`LlmJob.local` as it was when every step tokenized its records (`tokenize_example`) and padded them: the
    reference the tokens stored once must reproduce."""
    config, tokenizer = job.config, job.tokenizer
    examples = [
        tokenize_example(tokenizer, job.train_records[i], config.cutoff, train_on_inputs=config.train_on_inputs)
        for i in rows.reshape(-1)
    ]
    longest = max(len(e["input_ids"]) for e in examples)
    length = fit_bucket(job.buckets, longest) if job.buckets else config.cutoff
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = {
        "input_ids": np.full((len(examples), length), pad_id, np.int32),
        "attention_mask": np.zeros((len(examples), length), np.int32),
        "loss_mask": np.zeros((len(examples), length), np.int32),
    }
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        batch["input_ids"][row, :n] = example["input_ids"]
        batch["attention_mask"][row, :n] = 1
        batch["loss_mask"][row, :n] = example["labels"] != IGNORE_INDEX
    return {k: v.reshape(*rows.shape, length) for k, v in batch.items()}


@pytest.mark.parametrize("task, tokenizer_name, options", [
    ("arc-e", "bytes", dict(cutoff=600, train_on_inputs=False, batch_size=1, grad_accum=2)),  # 512, 600; cut rows
    ("boolq", "bytes", dict(cutoff=256, bucket=False, batch_size=3, grad_accum=3)),  # every row cut to 256
    ("obqa", "bpe", dict(cutoff=512, train_on_inputs=False, batch_size=2)),  # no pad token: EOS pads
    ("boolq", "bpe", dict(cutoff=512, batch_size=1, grad_accum=3)),
])  # fmt: skip
def test_tokens_stored_once_give_the_per_step_batches(tokenizer, task, tokenizer_name, options):
    """`LlmJob.local` from the training file tokenized once (batched) equals tokenizing each step's records
    anew, array for array, for every step of an epoch and for row sets of any shape."""
    config = TrainConfig(model="tiny-llama", task=task, data_dir=str(need(DATASET)), limit_train=240, **options)
    job = LlmJob(config)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    job.prepare(make_byte_tokenizer() if tokenizer_name == "bytes" else tokenizer, NamedSharding(mesh, sharding.BATCH))
    rng = np.random.default_rng(0)
    steps = 240 // (config.batch_size * config.grad_accum)
    row_sets = [job.step_rows(s) for s in range(steps)] + [
        rng.integers(0, 240, shape) for shape in ((1,), (7,), (2, 5))
    ]
    lengths = set()
    for rows in row_sets:
        got, want = job.local(rows), per_step_local(job, rows)
        assert list(got) == list(want) == ["input_ids", "attention_mask", "loss_mask"]
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        lengths.add(want["input_ids"].shape[-1])
        assert (want["loss_mask"] < want["attention_mask"]).any() != config.train_on_inputs
    assert len(lengths) > 1 or not config.bucket  # the batches met several buckets


# ---------------------------------------------------------------- tasks and files


def test_task_table():
    assert tuple(TASKS) == ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc-e", "arc-c", "obqa",
                            "multiarith", "gsm8k", "addsub", "singleeq", "svamp", "aqua")  # fmt: skip
    assert [t.folder for t in TASKS.values()] == [
        "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa",
        "MultiArith", "gsm8k", "AddSub", "SingleEq", "SVAMP", "AQuA"]  # fmt: skip
    for task in TASKS.values():
        assert task.max_new_tokens == (32 if task.kind == "commonsense" else 256)
    assert [t.name for t in TASKS.values() if t.kind == "aqua"] == ["aqua"]


@pytest.mark.parametrize("alias, name", [("ARC-Challenge", "arc-c"), ("social_i_qa", "siqa"), ("AddSub", "addsub"),
                                         ("openbookqa", "obqa"), ("BoolQ", "boolq"), ("AQuA", "aqua")])  # fmt: skip
def test_folder_names_are_aliases(alias, name):
    assert get_task(alias).name == name


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(DataError, match="unknown task 'sst2'; valid tasks: boolq, piqa, siqa, hellaswag, .*, aqua$"):
        get_task("sst2")


@pytest.mark.parametrize("task, split, rows", [("boolq", "train", 9427), ("boolq", "test", 3270),
                                               ("gsm8k", "test", 1319), ("arc-c", "train", 1119)])  # fmt: skip
def test_real_files_load(task, split, rows):
    records = load_records(find_file(need(DATASET), task, split))
    assert len(records) == rows and not any(r["input"] for r in records)


def test_every_task_folder_exists():
    for task in TASKS.values():
        assert (need(DATASET) / task.folder).is_dir(), task.folder


def test_missing_split_says_where_it_looked():
    with pytest.raises(DataError, match=r"no train file for gsm8k: expected .*gsm8k/train\.json; pass --data-dir"):
        find_file(need(DATASET), "gsm8k", "train")
    with pytest.raises(DataError, match=r"dataset/boolq/train\.json exists: pass .*/dataset\)"):
        find_file(DATASET.parent, "boolq", "train")


@pytest.mark.parametrize("content, message", [
    (None, "does not exist; pass an LLM-Adapters JSON file"),
    ('{"instruction": "a", "input": "", "output": "b", "answer": "c"}\n{"instruction": "a"}',
     "is not a JSON file .*not JSON lines"),
    ("[]", "holds no records"),
    ('{"instruction": "a"}', "holds no records"),
    ('[["a", "b"]]', "record 0 is a list"),
    ('[{"instruction": "a", "input": "", "output": "b", "answer": "c"}, {"instruction": "a", "input": ""}]',
     r"record 1 lacks 'output' \(has \['input', 'instruction'\]\); every record needs instruction, input, output, "
     "answer"),
    ('[{"instruction": 3, "input": "", "output": "b", "answer": "c"}]', "record 0 has a int 'instruction'"),
])  # fmt: skip
def test_bad_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "train.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_records(path)


# ---------------------------------------------------------------- answers


PROMPT = format_eval_prompt("Please answer with true or false.\n\nAnswer format: true/false")


@pytest.mark.parametrize("task, text, prediction", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "True. It is false", "false"),  # case-sensitive
    ("boolq", "Yes", ""),
    ("boolq", PROMPT + "the correct answer is false</s>", "false"),  # the instruction's "true/false" is not read
    ("boolq", PROMPT + "false\n\n### Instruction:\ntrue?\n\n### Response:\ntrue", "false"),  # a second marker ends it
    ("piqa", "solution2, not solution1", "solution2"),
    ("siqa", "the correct answer is answer3", "answer3"),
    ("arc-c", "answer5", "answer5"),
    ("hellaswag", "ending4 or ending1", "ending4"),
    ("winogrande", "option2", "option2"),
    ("gsm8k", "She pays 1,250 dollars, then -3.5 more.", -3.5),
    ("addsub", "The answer is 1,250.", 1250.0),
    ("multiarith", "no digits", math.inf),
    ("svamp", "12 apples and 7.25", 7.25),
    ("aqua", "Divide both sides. The answer is (B)", "D"),  # the first capital A-E, as the original
    ("aqua", "the answer is none of them", ""),
])  # fmt: skip
def test_extract_answer(task, text, prediction):
    assert extract_answer(task, text) == prediction


@pytest.mark.parametrize("task, prediction, answer, correct", [
    ("gsm8k", 18.0009, "18.0", True),
    ("gsm8k", 18.002, "18", False),
    ("gsm8k", -3.0, "-3", True),
    ("gsm8k", math.inf, "18.0", False),
    ("boolq", "true", "true", True),
    ("boolq", "True", "true", False),
    ("boolq", "", "false", False),
    ("aqua", "B", "B", True),
    ("aqua", "b", "B", False),
])  # fmt: skip
def test_is_correct(task, prediction, answer, correct):
    assert is_correct(task, prediction, answer) is correct


def test_non_numeric_math_answer_is_an_error():
    with pytest.raises(DataError, match="answer 'B' of a gsm8k record is not a number"):
        is_correct("gsm8k", 1.0, "B")


@pytest.mark.parametrize("task", [t.name for t in TASKS.values() if t.kind == "commonsense"])
def test_reference_outputs_of_commonsense_sets_score_perfectly(task):
    """Each commonsense record's reference output names its answer; our extractor must read every one."""
    folder = need(DATASET / get_task(task).folder)
    path = folder / "test.json" if (folder / "test.json").exists() else folder / "test_first5.json"
    records = load_records(need(path))
    assert all(is_correct(task, extract_answer(task, r["output"]), r["answer"]) for r in records)
