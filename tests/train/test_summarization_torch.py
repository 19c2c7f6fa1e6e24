"""The seq2seq loss and the RoCoFT step on BART against transformers' PyTorch BART and the paper's Algorithm 1.

The same tiny random BART weights go into ``FlaxBartForConditionalGeneration`` and PyTorch's
``BartForConditionalGeneration``. PyTorch builds its own decoder inputs from the labels (its
``shift_tokens_right``), so the batches' shift is checked too. Algorithm 1 is `test_torch_reference`'s
``RoCoFTLinear`` (a trainable Parameter of the first r rows or columns concatenated with a frozen buffer of the
rest) on every encoder self-attention, decoder self-attention, decoder cross-attention (``encoder_attn``) and
feed-forward (fc1, fc2) Linear, trained by torch's AdamW on torch's label-smoothed cross-entropy.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import transformers as tf
from conftest import abstract_params, fast_jit, flat
from test_torch_reference import RoCoFTLinear, one_torch_thread  # noqa: F401 - a fixture used below

from train import step as step_lib
from train.methods import build_method
from train.summarization_data import IGNORE_INDEX, Seq2SeqLayout, seq2seq_batch

torch = pytest.importorskip("torch")

PAD, BOS, EOS, START = 1, 0, 2, 2
STEPS, RANK, LR, WEIGHT_DECAY, SMOOTHING = 5, 2, 1e-2, 0.1, 0.1
ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
ENCODER_TARGETS = tuple(f"self_attn.{p}" for p in ATTENTION) + ("fc1", "fc2")
DECODER_TARGETS = ENCODER_TARGETS[:4] + tuple(f"encoder_attn.{p}" for p in ATTENTION) + ("fc1", "fc2")


def bart_config() -> tf.BartConfig:
    return tf.BartConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=START,
        forced_eos_token_id=EOS,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )


@functools.cache
def flax_bart():
    """``(FlaxBartForConditionalGeneration, params)``: matrices N(0, 0.1), norms 1 + N(0, 0.05), biases N(0, 0.05)."""
    model, shapes = abstract_params(tf.FlaxBartForConditionalGeneration, bart_config())
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = str(path[-1].key)
        if len(leaf.shape) == 2 and name != "final_logits_bias":
            return np.asarray(rng.normal(0.0, 0.1, leaf.shape), np.float32)
        return np.asarray((name == "scale") + rng.normal(0.0, 0.05, leaf.shape), np.float32)

    return model, jax.tree_util.tree_map_with_path(draw, shapes)


def torch_state_dict(params) -> dict:
    """Flax Dense kernel (d_in, d_out) is torch weight.T; LayerNorm scale and Embed embedding are .weight."""
    state = {}
    for path, value in flat(params).items():
        *module, leaf = path.split("/")
        prefix = "".join(m + "." for m in module)
        if leaf == "kernel":
            state[prefix + "weight"] = torch.from_numpy(np.ascontiguousarray(value.T))
        elif leaf in ("scale", "embedding"):
            state[prefix + "weight"] = torch.from_numpy(value.copy())
        else:
            state[prefix + leaf] = torch.from_numpy(value.copy())
    return state


def torch_bart(params):
    config = bart_config()
    config._attn_implementation = "eager"
    model = tf.BartForConditionalGeneration(config).eval()
    missing, unexpected = model.load_state_dict(torch_state_dict(params), strict=False)
    tied = {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"}
    assert not unexpected and set(missing) <= tied, (missing, unexpected)
    return model


@functools.cache
def batch() -> dict[str, np.ndarray]:
    """Three pairs of unequal source and target lengths, right-padded as the job pads them."""
    rng = np.random.default_rng(3)
    sources = [[BOS, *rng.integers(3, 64, n), EOS] for n in (9, 5, 12)]
    targets = [[BOS, *rng.integers(3, 64, n), EOS] for n in (4, 7, 2)]
    return seq2seq_batch(sources, targets, 16, 10, Seq2SeqLayout(PAD, START, False, SMOOTHING))


def torch_inputs(b) -> dict:
    """What PyTorch BART gets: the source, the labels and the decoder mask; it shifts the labels itself."""
    keys = ("input_ids", "attention_mask", "labels", "decoder_attention_mask")
    return {k: torch.from_numpy(b[k]).long() for k in keys}


def torch_smoothed_loss(logits, labels):
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, label_smoothing=SMOOTHING
    )


@functools.cache
def forward(model):
    """The plain HF model's logits, compiled once per model."""
    return fast_jit(lambda params, inputs: model(**inputs, params=params).logits)


def flax_logits(model, params, b):
    keys = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
    return np.asarray(forward(model)(params, {k: b[k] for k in keys}))


@pytest.mark.usefixtures("one_torch_thread")
def test_seq2seq_logits_and_losses_match_pytorch_bart():
    model, params = flax_bart()
    b = batch()
    with torch.no_grad():
        out = torch_bart(params)(**torch_inputs(b))
    logits = flax_logits(model, params, b)
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=1e-5, rtol=0)
    # PyTorch's own loss (no smoothing) from its own shift of the labels, then torch's label smoothing.
    plain = {k: v for k, v in b.items() if k != "label_smoothing"}
    total, count = step_lib.loss_sum(logits, plain, "seq2seq-lm")
    assert float(count) == 6 + 9 + 4  # BOS, tokens and EOS of each target
    np.testing.assert_allclose(float(total / count), float(out.loss), atol=1e-5, rtol=0)
    total, count = step_lib.loss_sum(logits, b, "seq2seq-lm")
    expected = torch_smoothed_loss(out.logits, torch.from_numpy(b["labels"]).long())
    np.testing.assert_allclose(float(total / count), float(expected), atol=1e-5, rtol=0)


def torch_rocoft_model(params, mode: str):
    """BART with Algorithm 1 on every target Linear; only those slices are trainable."""
    model = torch_bart(params)
    for p in model.parameters():
        p.requires_grad_(False)
    for stack, targets in ((model.model.encoder, ENCODER_TARGETS), (model.model.decoder, DECODER_TARGETS)):
        for layer in stack.layers:
            for target in targets:
                parent_name, _, child = target.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                setattr(parent, child, RoCoFTLinear(getattr(parent, child), RANK, mode))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(ENCODER_TARGETS) + 2 * len(DECODER_TARGETS) == 32
    optimizer = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    return model, optimizer


@pytest.mark.parametrize("mode", ["row", "column"])
@pytest.mark.usefixtures("one_torch_thread")
def test_rocoft_steps_on_bart_match_torch_algorithm_1(mode):
    """5 steps of the trainer's step (label-smoothed seq2seq loss) against Algorithm 1 in PyTorch, cross-attention
    included: the loss of every step (so the logits before it, whose forward pass the test above checks) and the
    final slices of every targeted kernel. The step runs with the fast paths on (``attention="xla"``): BART has
    none, so HF's own attention runs, and the results stay exact."""
    flax_model, params = flax_bart()
    b = batch()
    inputs = torch_inputs(b)
    torch_model, optimizer = torch_rocoft_model(params, mode)
    torch_losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = torch_smoothed_loss(torch_model(**inputs).logits, inputs["labels"])
        loss.backward()
        optimizer.step()
        torch_losses.append(float(loss.detach()))

    method = build_method("rocoft", params, rank=RANK, mode=mode, strategy="first")
    trainable, frozen = method.split(params)
    assert len(method.mask.slices) == 32 and not jax.tree.leaves(trainable["train"])  # slices alone
    tx, _ = step_lib.make_optimizer(LR, STEPS, 0, WEIGHT_DECAY, "constant", max_grad_norm=0)
    state = step_lib.init_state(trainable, tx, seed=0)
    train_fn = fast_jit(
        functools.partial(
            step_lib.train_step, model=flax_model, method=method, tx=tx, loss_kind="seq2seq-lm", attention="xla"
        )
    )
    jax_losses = []
    for _ in range(STEPS):
        state, metrics = train_fn(state, frozen, b)
        jax_losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(jax_losses, torch_losses, atol=1e-5, rtol=0)
    assert torch_losses[-1] < torch_losses[0] - 0.05  # the steps trained

    # Flax rows are kernel[:, :r] = (torch W[:r]).T; columns kernel[:r, :] = (W[:, :r]).T.
    slices = flat(state.trainable["rocoft"])
    for name, stack, targets in (
        ("encoder", torch_model.model.encoder, ENCODER_TARGETS),
        ("decoder", torch_model.model.decoder, DECODER_TARGETS),
    ):
        for i, layer in enumerate(stack.layers):
            for target in targets:
                path = f"model/{name}/layers/{i}/{target.replace('.', '/')}/kernel"
                expected = layer.get_submodule(target).trainable.detach().numpy().T
                np.testing.assert_allclose(slices[path], expected, atol=1e-4, rtol=0, err_msg=path)
