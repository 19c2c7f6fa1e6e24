"""An offline byte-level tokenizer for the random-init causal-LM presets (``tiny-llama`` and friends).

A preset has no tokenizer of its own and the hub may be unreachable, so causal presets read text as UTF-8
bytes: token i < 256 is byte i, then BOS, EOS and PAD. It is lossless on any text, fixed by construction
(nothing is trained, so every machine gets the same ids), and adds BOS in front of every text as LLaMA's
tokenizer does, so the LLM-Adapters tokenization (`train.llm_data.tokenize_example`) behaves as with LLaMA.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259


def make_byte_tokenizer(model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """UTF-8 bytes as ids 0-255, ``<s>`` 256 (prepended), ``</s>`` 257, ``<pad>`` 258."""
    # ByteLevel maps each byte to a printable character; BPE without merges keeps one token per byte.
    byte_to_char = _byte_level_chars()
    vocab = {byte_to_char[b]: b for b in range(256)}
    vocab.update({BOS: BOS_ID, EOS: EOS_ID, PAD: PAD_ID})
    core = Tokenizer(models.BPE(vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([BOS, EOS, PAD])
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
    )


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the one ByteLevel (pre-tokenizer and decoder) uses."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
