"""The trainer's RoCoFT step against the paper's Algorithm 1 written in PyTorch.

The same tiny RoBERTa weights go into transformers' PyTorch
``RobertaForSequenceClassification``. There the first r rows ``W[:r]`` (or
columns ``W[:, :r]``) of each query/key/value/attention-output/intermediate/
output Linear become a trainable Parameter concatenated with a frozen buffer
of the rest, the classification head is trained in full, and torch's AdamW
runs with HF Trainer's parameter groups (no weight decay on biases). The JAX
side is `build_method` + `make_optimizer` + `train_step`, the trainer's own
path. Logits after every step and the final slices must agree.
"""

import functools

import numpy as np
import pytest
from conftest import classification_batch, fast_jit, flat, roberta_config, tiny_roberta

from train import step as step_lib
from train.methods import build_method

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# lr and weight decay are large enough that decaying the head's biases too (or not decaying at all)
# moves logits or biases by more than the 1e-4 tolerance; the correct setup agrees to about 1e-5.
STEPS, RANK, LR, WEIGHT_DECAY = 5, 2, 1e-2, 0.1
TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def flax_to_torch_state_dict(params) -> dict:
    """Flax Dense kernel (d_in, d_out) is torch weight.T; LayerNorm scale and Embed embedding are .weight."""
    state = {}
    for path, value in flat(params).items():
        *module, leaf = path.split("/")
        name = ".".join(module)
        value = np.asarray(value, np.float32)
        if leaf == "kernel":
            state[f"{name}.weight"] = torch.from_numpy(value.T.copy())
        elif leaf in ("scale", "embedding"):
            state[f"{name}.weight"] = torch.from_numpy(value.copy())
        else:
            state[f"{name}.{leaf}"] = torch.from_numpy(value.copy())
    return state


class RoCoFTLinear(torch.nn.Module):
    """Algorithm 1: W = cat(trainable first r rows or columns, frozen rest); the bias, if any, stays frozen."""

    def __init__(self, linear: torch.nn.Linear, rank: int, mode: str):
        super().__init__()
        weight = linear.weight.detach()
        self.dim = 0 if mode == "row" else 1
        live, rest = (weight[:rank], weight[rank:]) if mode == "row" else (weight[:, :rank], weight[:, rank:])
        self.trainable = torch.nn.Parameter(live.clone())
        self.register_buffer("frozen", rest.clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x):
        return torch.nn.functional.linear(x, torch.cat([self.trainable, self.frozen], dim=self.dim), self.bias)


def torch_rocoft_model(params, rank: int, mode: str):
    config = transformers.RobertaConfig(**roberta_config().to_dict())
    config._attn_implementation = "eager"
    model = transformers.RobertaForSequenceClassification(config).eval()
    missing, unexpected = model.load_state_dict(flax_to_torch_state_dict(params), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.roberta.encoder.layer:
        for target in TARGETS:
            parent_name, child = target.rsplit(".", 1)
            parent = layer.get_submodule(parent_name)
            setattr(parent, child, RoCoFTLinear(getattr(parent, child), rank, mode))
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    assert len(no_decay) == 2 and len(decay) == len(TARGETS) * config.num_hidden_layers + 2
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    return model, optimizer


def _torch_logits(model, batch):
    return model(
        input_ids=torch.from_numpy(batch["input_ids"]).long(),
        attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
    ).logits


def trainer_steps(model, method, tx, loss_kind: str, trainable, frozen, batch, steps: int):
    """``(state, logits)``: ``steps`` of the trainer's own jitted train step on one batch, and the eval step's
    logits before the first and after each step."""
    state = step_lib.init_state(trainable, tx, seed=0)
    train_fn = fast_jit(functools.partial(step_lib.train_step, model=model, method=method, tx=tx, loss_kind=loss_kind))
    eval_fn = fast_jit(functools.partial(step_lib.eval_step, model=model, method=method))
    logits = [np.asarray(eval_fn(state.trainable, frozen, batch))]
    for _ in range(steps):
        state, _ = train_fn(state, frozen, batch)
        logits.append(np.asarray(eval_fn(state.trainable, frozen, batch)))
    return state, logits


@pytest.fixture
def one_torch_thread():
    """A tiny model: torch's threads only contend with XLA's pool (this halves the test's time)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _batch():
    return classification_batch(roberta_config(), seed=7, batch=4, seq=12)


@pytest.mark.parametrize("mode", ["row", "column"])
@pytest.mark.usefixtures("one_torch_thread")
def test_trainer_step_matches_torch_algorithm_1(mode):
    flax_model, params = tiny_roberta()
    batch = _batch()

    # PyTorch: the paper's Algorithm 1.
    torch_model, optimizer = torch_rocoft_model(params, RANK, mode)
    labels = torch.from_numpy(batch["labels"]).long()
    with torch.no_grad():
        torch_logits = [_torch_logits(torch_model, batch).numpy()]
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(_torch_logits(torch_model, batch), labels)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch_logits.append(_torch_logits(torch_model, batch).numpy())

    # JAX: the trainer's efficient path.
    method = build_method("rocoft", params, rank=RANK, mode=mode, strategy="first")
    trainable, frozen = method.split(params)
    tx, schedule = step_lib.make_optimizer(
        LR, STEPS, warmup_steps=0, weight_decay=WEIGHT_DECAY, schedule="constant", max_grad_norm=0
    )
    assert [float(schedule(i)) for i in range(STEPS)] == pytest.approx([LR] * STEPS)  # no warm-up step at lr 0
    state, jax_logits = trainer_steps(flax_model, method, tx, "classification", trainable, frozen, batch, STEPS)

    for step, (j, t) in enumerate(zip(jax_logits, torch_logits)):
        np.testing.assert_allclose(j, t, atol=1e-4, rtol=0, err_msg=f"logits after step {step}")
    assert np.abs(torch_logits[-1] - torch_logits[0]).max() > 1e-2  # training moved the logits

    # The final slices: Flax rows are kernel[:, :r] = (torch W[:r]).T, columns kernel[:r, :] = (W[:, :r]).T.
    slices = flat(state.trainable["rocoft"])
    for i, layer in enumerate(torch_model.roberta.encoder.layer):
        for target in TARGETS:
            path = f"roberta/encoder/layer/{i}/{target.replace('.', '/')}/kernel"
            expected = layer.get_submodule(target).trainable.detach().numpy().T
            np.testing.assert_allclose(slices[path], expected, atol=1e-4, rtol=0, err_msg=path)
    head = flat(state.trainable["train"])
    np.testing.assert_allclose(
        head["classifier/out_proj/kernel"], torch_model.classifier.out_proj.weight.detach().numpy().T, atol=1e-4, rtol=0
    )
    np.testing.assert_allclose(
        head["classifier/dense/bias"], torch_model.classifier.dense.bias.detach().numpy(), atol=1e-4, rtol=0
    )
