"""PyTorch peers of `benchmarks.step`: the paper's Algorithm 1, peft LoRA and full fine-tuning.

    python -m benchmarks.torch_step --peer algorithm1 --model roberta-large --batch-size 32 --seq-len 512
    python -m benchmarks.torch_step --peer lora --model llama-2-7b --batch-size 4 --seq-len 1024 --compile

Prints one JSON line (the driver reads the last line). Weights are random (shape
presets below, no download) so it runs offline. Models are built with explicit
config classes and `Model(config).to(dtype)`, which works on transformers 4.57 and
5.x alike (v5 renamed `torch_dtype=`). Attention is the models' default
scaled-dot-product one, `attn_implementation="sdpa"` (set explicitly, and reported).
Dropout probabilities are 0, but the model is in train() mode.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaForSequenceClassification

from train import strict_json

ROBERTA = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)
PRESETS = {  # name: (family, config kwargs)
    "tiny": (
        "roberta",
        dict(
            ROBERTA, vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
        ),
    ),
    "tiny-llama": (
        "llama",
        dict(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=128,
        ),
    ),
    "roberta-base": (
        "roberta",
        dict(ROBERTA, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    ),
    "roberta-large": (
        "roberta",
        dict(ROBERTA, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    ),
    "llama-2-7b": (
        "llama",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            intermediate_size=11008,
            max_position_embeddings=4096,
        ),
    ),
}
# Linear layers that Algorithm 1 (and `--lora-targets all`) adapts, as module-name suffixes.
TARGETS = {
    "roberta": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
PER_LAYER = {"roberta": 6, "llama": 7}


class RowLinear(nn.Module):
    """Paper's Algorithm 1: trainable first r rows (output units) + frozen buffer of the rest.

    The weight is re-assembled by `torch.cat` every forward, exactly as the paper's
    code does, so the timing includes that copy and autograd's full-size weight grad.
    """

    def __init__(self, linear: nn.Linear, r: int):
        super().__init__()
        w = linear.weight.detach()
        self.trainable = nn.Parameter(w[:r].clone())
        self.register_buffer("frozen", w[r:].clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return F.linear(x, torch.cat([self.trainable, self.frozen], 0), self.bias)


def build_model(name: str, dtype: torch.dtype, device: str, dropout: float = 0.0):
    """Random-init model on `device` (built there, so a 7B init is fast), cast to `dtype`.

    ``dropout``: RoBERTa's hidden and attention dropout (Llama has none by default).
    """
    family, kw = PRESETS[name]
    if family == "roberta":
        config = RobertaConfig(
            **kw,
            num_labels=2,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            attn_implementation="sdpa",
        )
        cls = RobertaForSequenceClassification
    else:
        config = LlamaConfig(**kw, attention_dropout=0.0, attn_implementation="sdpa")
        cls = LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(config)
    return family, model.to(dtype)


def target_names(model: nn.Module, family: str) -> list[str]:
    """Names of the target Linears; checks the per-layer count so a renamed module fails loudly."""
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".layer" in n and n.endswith(TARGETS[family])
    ]
    assert len(names) == PER_LAYER[family] * model.config.num_hidden_layers, names
    return names


def apply_algorithm1(model: nn.Module, family: str, r: int) -> nn.Module:
    """Freeze everything, swap each target Linear for a RowLinear; RoBERTa's classifier stays trainable."""
    model.requires_grad_(False)
    for name in target_names(model, family):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, RowLinear(getattr(parent, child), r))
    if family == "roberta":
        model.classifier.requires_grad_(True)
    return model


def apply_lora(model: nn.Module, family: str, all_targets: bool) -> nn.Module:
    """peft LoRA r=8, alpha=16, as the paper's baseline (query/value unless `all`)."""
    from peft import LoraConfig, get_peft_model

    if all_targets:  # peft matches by name suffix, like TARGETS
        targets = list(TARGETS[family])
    else:
        targets = ["query", "value"] if family == "roberta" else ["q_proj", "v_proj"]
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=targets,
        lora_dropout=0.0,
        modules_to_save=["classifier"] if family == "roberta" else None,
    )
    return get_peft_model(model, cfg)


def make_batch(family: str, vocab: int, b: int, t: int, device: str) -> dict:
    """Fixed random batch; ids avoid 0-2 (RoBERTa's bos/pad/eos). Llama labels = ids (causal-LM loss)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones(b, t, dtype=torch.long)}
    batch["labels"] = torch.randint(0, 2, (b,), generator=g) if family == "roberta" else ids.clone()
    return {k: v.to(device) for k, v in batch.items()}


def _completion_mark(cuda: bool):
    """An event the GPU passes when the work queued so far is done (on CPU, the time now)."""
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _seconds_between(a, b, cuda: bool) -> float:
    return a.elapsed_time(b) / 1e3 if cuda else b - a


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", choices=("algorithm1", "lora", "full"), required=True)
    p.add_argument("--model", choices=tuple(PRESETS), required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--rank", type=int, default=3, help="rows r for algorithm1")
    p.add_argument("--lora-targets", choices=("qv", "all"), default="qv")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    p.add_argument("--dropout", type=float, default=0.0, help="RoBERTa's hidden and attention dropout")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    family, model = build_model(args.model, dtype, args.device, args.dropout)
    if args.peer == "algorithm1":
        model = apply_algorithm1(model, family, args.rank)
    elif args.peer == "lora":
        model = apply_lora(model, family, args.lora_targets == "all")
    attn = getattr(model.config, "_attn_implementation", None)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    num_trainable = sum(q.numel() for q in params)
    opt = torch.optim.AdamW(params, lr=args.lr, fused=cuda)
    batch = make_batch(family, model.config.vocab_size, args.batch_size, args.seq_len, args.device)
    fwd = torch.compile(model) if args.compile else model

    def step():
        loss = fwd(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # Steady state, timed as benchmarks.step times ours: no wait between steps, and a step's time is
    # the interval between consecutive completions (CUDA events on the GPU).
    losses, done = [], []
    for _ in range(args.warmup + args.steps + 1):
        losses.append(step())
        done.append(_completion_mark(cuda))
    if cuda:
        torch.cuda.synchronize()
    marks = done[args.warmup :]
    median = statistics.median(_seconds_between(a, b, cuda) for a, b in zip(marks, marks[1:]))
    return {
        "method": f"torch-{args.peer}",
        "step_ms": 1e3 * median,
        "tokens_per_s": args.batch_size * args.seq_len / median,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan,
        "num_trainable": num_trainable,
        "loss": float(losses[-1]),
        "first_loss": float(losses[0]),
        "compile": args.compile,
        "model": args.model,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "dropout": args.dropout,
        "attn": attn,
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    print(strict_json.dumps(main()), flush=True)
