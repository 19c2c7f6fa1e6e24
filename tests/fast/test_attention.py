"""`fused_attention` against HF's own attention, on CPU in fp32.

Every family gets a padding mask with rows of different lengths (right and
left padding) and attention dropout configured but off (deterministic), so
the fused path must be taken. Checked: logits and parameter gradients equal
the original, `jax.nn.dot_product_attention` ran once per layer, the
fallbacks reproduce the original exactly, and the fused path composes with
`sliced_kernels` (perturbed slices, so a bypassed Dense would show).
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf
from conftest import assert_trees_close, dot_output_shapes, fast_jit

import rocoft_jax
from rocoft_jax import faithful
from rocoft_jax.fast.attention import fused_attention
from rocoft_jax.fast.remat import remat_layers

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=34,
)
ENC = dict(SMALL, attention_probs_dropout_prob=0.1)  # hidden dropout stays on too: same rng streams
DEC = dict(SMALL, attention_dropout=0.1, num_key_value_heads=2)  # GQA: 4 query heads on 2 K/V heads
# name -> (config class, model class, config kwargs)
MODELS = {
    "bert": (tf.BertConfig, tf.FlaxBertForSequenceClassification, ENC),
    "bert-cross": (tf.BertConfig, tf.FlaxBertForCausalLM, dict(ENC, is_decoder=True, add_cross_attention=True)),
    "roberta": (tf.RobertaConfig, tf.FlaxRobertaForSequenceClassification, dict(ENC, pad_token_id=1)),
    "xlm-roberta": (tf.XLMRobertaConfig, tf.FlaxXLMRobertaForSequenceClassification, dict(ENC, pad_token_id=1)),
    "electra": (tf.ElectraConfig, tf.FlaxElectraForSequenceClassification, dict(ENC, embedding_size=16)),
    "llama": (tf.LlamaConfig, tf.FlaxLlamaForCausalLM, DEC),
    "mistral": (tf.MistralConfig, tf.FlaxMistralForCausalLM, dict(DEC, sliding_window=3)),
    "mistral-nowindow": (tf.MistralConfig, tf.FlaxMistralForCausalLM, dict(DEC, sliding_window=None)),
    # rocoft_jax.faithful's fixes (rotary base and scaling, tied head, Mistral's true window) on the fused path
    "llama-faithful": (
        tf.LlamaConfig,
        faithful.fixed(tf.FlaxLlamaForCausalLM),
        dict(DEC, rope_theta=5e5, tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    "mistral-faithful": (tf.MistralConfig, faithful.fixed(tf.FlaxMistralForCausalLM), dict(DEC, sliding_window=3)),
    "gemma": (
        tf.GemmaConfig,
        tf.FlaxGemmaForCausalLM,  # MQA, head_dim set apart from hidden/heads
        dict(DEC, num_key_value_heads=1, head_dim=16, hidden_activation="gelu_pytorch_tanh"),
    ),
}
LENGTHS = (8, 5, -5)  # per row: full, right-padded to 5, left-padded (5 real tokens at the end)


@functools.cache
def tiny(name):
    """``(model, params)`` with numpy-drawn random weights (no init program to compile)."""
    config_cls, model_cls, kwargs = MODELS[name]
    model = model_cls(config_cls(**kwargs), _do_init=False)
    shapes = jax.eval_shape(lambda rng: model.init_weights(rng, (1, 8)), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)

    def draw(path, leaf):  # matrices N(0, 0.2), norm scales 1 + N(0, 0.05), biases N(0, 0.05)
        base = 1.0 if str(path[-1].key) in ("scale", "weight") else 0.0
        return jnp.asarray(base + rng.normal(0.0, 0.2 if leaf.ndim == 2 else 0.05, leaf.shape), leaf.dtype)

    return model, jax.tree_util.tree_map_with_path(draw, shapes)


def make_batch(lengths=LENGTHS, seq=8, seed=0):
    ids = np.random.default_rng(seed).integers(3, 64, (len(lengths), seq)).astype(np.int32)
    positions = np.arange(seq)
    mask = np.stack([positions < n if n >= 0 else positions >= seq + n for n in lengths]).astype(np.int32)
    return ids, mask


def forward(model, params, ids, mask, **kwargs):
    return model(ids, attention_mask=mask, params=params, **kwargs).logits


def loss_and_logits(model, params, ids, mask):
    """A random linear loss over the logits of real tokens, as a real loss would mask them.

    At padded positions HF's gradient is an artifact: a query with no key left (left padding under the
    causal mask) gets scores + finfo.min, all rounded to finfo.min, so the forward is uniform and constant,
    yet autodiff still sends gradient into the scores; the fused path sends none.
    """
    logits = forward(model, params, ids, mask)
    weights = np.random.default_rng(1).normal(size=logits.shape)
    if logits.ndim == 3:
        weights = weights * mask[..., None]
    return jnp.sum(logits * jnp.asarray(weights, logits.dtype)), logits


def assert_grads_close(actual, expected, rtol):
    """Per leaf, ||actual - expected|| <= rtol * ||expected|| + 1e-5.

    The floor is for leaves whose exact gradient is zero but whose computed one is rounding noise: the key
    bias (softmax ignores a shift shared by all keys).
    """
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree_util.tree_leaves(expected)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)  # numpy: no per-shape eager compiles
        err, ref = np.linalg.norm(a - b), np.linalg.norm(b)
        assert err <= rtol * ref + 1e-5, (jax.tree_util.keystr(path), err, ref)


GRADIENT_MODELS = ("bert", "roberta", "electra", "llama", "mistral", "gemma", "llama-faithful", "mistral-faithful")


@functools.cache
def reference(name):
    """Loss, logits and gradients without fused attention."""
    model, params = tiny(name)
    (_, logits), grads = fast_jit(jax.value_and_grad(lambda p, i, m: loss_and_logits(model, p, i, m), has_aux=True))(
        params, *make_batch()
    )
    return logits, grads


@functools.cache
def reference_logits(name, lengths=LENGTHS):
    """Logits without fused attention (from `reference` where it already ran)."""
    if name in GRADIENT_MODELS and lengths == LENGTHS:
        return reference(name)[0]
    model, params = tiny(name)
    return fast_jit(functools.partial(forward, model))(params, *make_batch(lengths))


@pytest.fixture
def count_fused_calls(monkeypatch):
    """The keyword arguments of each traced `jax.nn.dot_product_attention` call (which still runs)."""
    calls = []
    original = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append(k) or original(*a, **k))
    return calls


@pytest.mark.parametrize("name", GRADIENT_MODELS)
def test_logits_and_grads_match_and_fused_path_runs(name, count_fused_calls):
    model, params = tiny(name)

    def fused(p, i, m):
        with fused_attention() as counts:
            out = loss_and_logits(model, p, i, m)
        assert dict(counts) == {"fused:xla": model.config.num_hidden_layers}
        return out

    (_, logits), grads = fast_jit(jax.value_and_grad(fused, has_aux=True))(params, *make_batch())
    assert len(count_fused_calls) == model.config.num_hidden_layers
    ref_logits, ref_grads = reference(name)
    assert_trees_close(logits, ref_logits, atol=1e-5)
    assert_grads_close(grads, ref_grads, rtol=1e-3)


# (name, implementation, right_padded), logits only: the other classes; cuDNN, which falls back to XLA on
# CPU; padding as key lengths on right-padded rows
VARIANTS = [
    ("xlm-roberta", None, False),
    ("mistral-nowindow", None, False),
    ("llama", "cudnn", False),
    ("mistral", "xla", True),
]


@pytest.mark.parametrize("name,implementation,right_padded", VARIANTS)
def test_implementation_and_key_lengths(name, implementation, right_padded):
    model, params = tiny(name)
    lengths = (8, 5, 0, 2) if right_padded else LENGTHS
    ref = reference_logits(name, lengths)
    ids, mask = make_batch(lengths)
    with fused_attention(implementation, right_padded=right_padded) as counts:
        out = fast_jit(functools.partial(forward, model))(params, ids, mask)
    assert dict(counts) == {"fused:xla": model.config.num_hidden_layers}
    assert_trees_close(out, ref, atol=1e-5)


FULL = (8, 8, 8)  # no padding


@pytest.mark.parametrize("name", ["roberta", "llama", "mistral"])  # Mistral: its window still applies
def test_unpadded_runs_no_mask_and_equals_an_all_ones_mask(name, count_fused_calls):
    model, params = tiny(name)
    ids, _ = make_batch(FULL)
    with fused_attention("xla", unpadded=True) as counts:
        out = fast_jit(functools.partial(forward, model))(params, ids, None)  # HF builds an all-ones mask
    layers = model.config.num_hidden_layers
    assert dict(counts) == {"fused:xla": layers}
    assert [(k["mask"], k["key_value_seq_lengths"]) for k in count_fused_calls] == [(None, None)] * layers
    assert_trees_close(out, reference_logits(name, FULL), atol=1e-5)


def test_right_padded_poisons_rows_that_are_not_right_padded():
    model, params = tiny("bert")
    ids, mask = make_batch(lengths=(8, -5))
    with fused_attention(right_padded=True):
        out = np.asarray(fast_jit(functools.partial(forward, model))(params, ids, mask))
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


def test_right_padded_check_in_the_first_layer_reaches_outputs_and_gradients_under_remat():
    """The prefix check runs in layer 0 only; rematerialized layers and the backward pass keep it."""
    model, params = tiny("llama")
    loss = lambda p, ids, mask: jnp.sum(forward(model, p, ids, mask))
    with fused_attention(right_padded=True), remat_layers("dots"):
        ids, mask = make_batch(lengths=(8, -5))
        out = np.asarray(fast_jit(functools.partial(forward, model))(params, ids, mask))
        bad = jax.jit(jax.grad(loss))(params, ids, mask)
        good = jax.jit(jax.grad(loss))(params, *make_batch(lengths=(8, 5)))
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
    assert any(np.isnan(g).any() for g in jax.tree.leaves(bad))  # one bad row fails the whole step loudly
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(good))


def test_head_mask_is_applied_on_the_fused_path():
    model, params = tiny("bert")
    head_mask = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], np.float32)
    ref = fast_jit(lambda p, i, m: forward(model, p, i, m, head_mask=head_mask))(params, *make_batch())
    with fused_attention() as counts:
        out = fast_jit(lambda p, i, m: forward(model, p, i, m, head_mask=head_mask))(params, *make_batch())
    assert counts["fused:xla"] == 2
    assert_trees_close(out, ref, atol=1e-5)


def _dropout_run(model, params, ids, mask):
    return forward(model, params, ids, mask, train=True, dropout_rng=jax.random.PRNGKey(3))


def _attentions_run(model, params, ids, mask):
    out = model(ids, attention_mask=mask, params=params, output_attentions=True)
    return out.logits, out.attentions


def _cross_run(model, params, ids, mask):
    encoder_states = jnp.asarray(np.random.default_rng(4).normal(size=ids.shape + (32,)), jnp.float32)
    return forward(model, params, ids, mask, encoder_hidden_states=encoder_states, encoder_attention_mask=mask)


def _cache_run(model, params, ids, mask):
    cache = model.init_cache(ids.shape[0], ids.shape[1])
    position_ids = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return model(ids, attention_mask=mask, position_ids=position_ids, params=params, past_key_values=cache).logits


# (name, how the model is called, expected fallback reason)
FALLBACKS = [
    ("bert", _dropout_run, "dropout"),
    ("llama", _dropout_run, "dropout"),
    ("roberta", _attentions_run, "output_attentions"),
    ("llama", _cache_run, "kv_cache"),
    ("bert-cross", _cross_run, "cross_attention"),  # its causal self-attention stays fused
]


@pytest.mark.parametrize("name,run,reason", FALLBACKS, ids=[f"{n}-{r}" for n, _, r in FALLBACKS])
def test_fallbacks_reproduce_the_original(name, run, reason):
    model, params = tiny(name)
    ids, mask = make_batch()
    if reason == "kv_cache":
        mask = np.ones_like(mask)
    ref = fast_jit(functools.partial(run, model))(params, ids, mask)
    with fused_attention() as counts:
        out = fast_jit(functools.partial(run, model))(params, ids, mask)
    assert counts[f"fallback:{reason}"] >= model.config.num_hidden_layers  # init_cache's own trace counts too
    assert set(counts) == {f"fallback:{reason}"} | ({"fused:xla"} if reason == "cross_attention" else set())
    assert_trees_close(out, ref, atol=1e-5 if "fused:xla" in counts else 1e-6)
    if reason == "output_attentions":
        assert len(out[1]) == model.config.num_hidden_layers and out[1][0].shape == (3, 4, 8, 8)


# (name, fused_attention entered outside or inside sliced_kernels)
COMPOSED = [("roberta", "outside"), ("llama", "inside")]


@pytest.mark.parametrize("name,order", COMPOSED)
def test_composes_with_sliced_kernels(name, order):
    model, params = tiny(name)
    rmask = rocoft_jax.mask_params(params, 2, "row", train=())
    trainable, frozen = rocoft_jax.split(params, rmask)
    noise = np.random.default_rng(2)  # slices unlike the frozen kernel: a bypassed sliced Dense would show
    trainable = jax.tree.map(lambda x: x + jnp.asarray(noise.normal(0.0, 0.2, x.shape), x.dtype), trainable)

    def loss(tr, fr, ids, mask, fuse):
        contexts = [rocoft_jax.sliced_kernels(tr, rmask)]
        if fuse:
            contexts.insert(0 if order == "outside" else 1, fused_attention())
        with contextlib.ExitStack() as stack:
            counts = [stack.enter_context(c) for c in contexts]
            out = loss_and_logits(model, rocoft_jax.with_trained_leaves(fr, tr), ids, mask)
        if fuse:
            assert dict(next(c for c in counts if c is not None)) == {"fused:xla": model.config.num_hidden_layers}
        return out

    grad = lambda fuse: fast_jit(jax.value_and_grad(functools.partial(loss, fuse=fuse), has_aux=True))
    (_, ref_logits), ref_grads = grad(False)(trainable, frozen, *make_batch())
    (_, logits), grads = grad(True)(trainable, frozen, *make_batch())
    assert_trees_close(logits, ref_logits, atol=1e-5)
    assert_grads_close(grads, ref_grads, rtol=1e-3)
    # The fused path runs q, k and v as one sliced op: their 2 + 2 + 2 rows' gradients are one product.
    jaxpr = jax.make_jaxpr(jax.grad(lambda tr: loss(tr, frozen, *make_batch(), fuse=True)[0]))(trainable)
    shared = dot_output_shapes(jaxpr.jaxpr).count((model.config.hidden_size, 6))
    assert shared == model.config.num_hidden_layers


def test_rejects_unknown_implementation():
    with pytest.raises(ValueError, match="implementation must be one of"), fused_attention("flash"):
        pass
