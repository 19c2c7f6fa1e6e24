"""The offline demo task: a made-up sentiment task, its tokenizer, and its job.

The project must train end to end with no download, so it ships a task it
generates itself. Sentences of 8 to 20 words mix positive, negative and
neutral words; the label is 1 iff positive words outnumber negative ones.
Ties are redrawn, so every label is decided. Counting is what attention
pooling does, so a tiny random-init transformer learns it in a minute on CPU.
The columns match ``load_glue`` (``sentence``, ``label``), so `DemoJob` is
GLUE's job with generated splits; its spec is ``train.glue.TASKS["demo"]``.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from train.errors import DataError
from train.tasks.glue import GlueJob

POSITIVE = ("good", "great", "happy", "bright", "kind", "warm", "calm", "brave", "clever", "gentle", "lovely", "joyful")
NEGATIVE = ("bad", "awful", "sad", "dark", "cruel", "cold", "angry", "timid", "dull", "harsh", "ugly", "gloomy")
NEUTRAL = (
    "the", "a", "cat", "dog", "tree", "river", "house", "car", "city", "road", "book", "table",
    "window", "chair", "bird", "boat", "hill", "door", "lamp", "cup", "train", "field", "stone", "cloud",
    "walks", "sees", "finds", "holds", "near", "under", "over", "with", "and", "then", "today", "there",
)  # fmt: skip
WORDS = POSITIVE + NEGATIVE + NEUTRAL
# RoBERTa's ids for the first four, so pad id is 1 as the model configs expect.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
_SIGN = np.array([1] * len(POSITIVE) + [-1] * len(NEGATIVE) + [0] * len(NEUTRAL))


def make_demo_task(seed: int = 0, num_train: int = 4000, num_eval: int = 500) -> dict[str, dict[str, list]]:
    """``{"train": ..., "validation": ...}`` splits; the same seed gives the same data."""
    return {
        "train": _make_split(np.random.default_rng([seed, 0]), num_train),
        "validation": _make_split(np.random.default_rng([seed, 1]), num_eval),
    }


def load_demo(data_dir=None) -> dict[str, dict[str, list]]:
    """The demo's splits (seed 0); it has no files, so a ``data_dir`` is an error rather than ignored."""
    if data_dir is not None:
        raise DataError("the demo task is generated in memory; do not pass --data-dir with it")
    return make_demo_task()


def _make_split(rng: np.random.Generator, num: int) -> dict[str, list]:
    """Draw ``num`` sentences uniformly over WORDS, redrawing ties."""
    sentences, labels = [], []
    while len(sentences) < num:
        ids = rng.integers(0, len(WORDS), size=rng.integers(8, 21))
        margin = np.sum(_SIGN[ids])
        if margin == 0:
            continue
        sentences.append(" ".join(WORDS[i] for i in ids))
        labels.append(int(margin > 0))
    return {"sentence": sentences, "label": labels}


def make_demo_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the demo vocabulary, RoBERTa-style specials.

    Pairs are encoded as ``<s> A </s></s> B </s>`` like RoBERTa; there are no
    token type ids, matching RoBERTa models.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
    )


class DemoJob(GlueJob):
    """GLUE's job on the generated splits."""

    def read_splits(self) -> dict[str, dict[str, list]]:
        return load_demo(self.config.data_dir)
