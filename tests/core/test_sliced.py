"""The sliced matmul and the layer interception that runs HF models on frozen kernels plus slices.

References are plain ``x @ W`` with the slice written into W by the test's own
indexing; the weight-gradient trap (docs/design.md) is checked by looking at the
dot products XLA is asked to form and at its FLOP count.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    classification_batch,
    dot_output_shapes,
    efficient_forward,
    full_forward,
    lm_batch,
    tiny_gpt2,
    tiny_roberta,
)

import rocoft_jax
from rocoft_jax import sliced
from rocoft_jax.fast import fused_dense
from rocoft_jax.mask import KernelSlice

D_IN, D_OUT = 24, 40

LAYOUTS = [
    # (name, out_axis, mode, selection)
    ("dense-row", 1, "row", [1, 7, 30]),
    ("dense-column", 1, "column", [0, 5, 23]),
    ("conv1d-row", 0, "row", [2, 3, 39]),
    ("conv1d-column", 0, "column", [4, 11]),
    ("dense-random", 1, "random", [0, 17, 100, 959]),
    ("conv1d-random", 0, "random", [3, 64, 500]),
    ("dense-row-unsorted", 1, "row", [30, 1, 7]),
    ("dense-row-range", 1, "row", [0, 1, 2]),  # contiguous ("first"): slices instead of gathers
    ("conv1d-column-range", 0, "column", [4, 5, 6]),
]
SLICED = [c for c in LAYOUTS if c[2] != "random"]


def _spec(out_axis, mode, idx, d_in=D_IN, d_out=D_OUT):
    shape = (d_in, d_out) if out_axis == 1 else (d_out, d_in)
    idx = np.asarray(idx, np.int32)
    if mode == "random":
        return KernelSlice(shape, None, out_axis, idx)
    axis = out_axis if mode == "row" else 1 - out_axis
    return KernelSlice(shape, axis, out_axis, idx)


def _place(kernel, values, out_axis, mode, idx):
    """The kernel with the trained entries written in, by the test's own indexing."""
    if mode == "random":
        return kernel.reshape(-1).at[np.asarray(idx)].set(values).reshape(kernel.shape)
    if (mode == "row") == (out_axis == 1):
        return kernel.at[:, np.asarray(idx)].set(values)
    return kernel.at[np.asarray(idx), :].set(values)


def _inputs(out_axis, mode, idx, seed=0, d_in=D_IN, d_out=D_OUT, lead=(3, 5)):
    rng = np.random.default_rng(seed)
    spec = _spec(out_axis, mode, idx, d_in, d_out)
    kernel = jnp.asarray(rng.normal(size=spec.shape), jnp.float32)
    values = jnp.asarray(rng.normal(size=spec.slice_shape), jnp.float32)
    x = jnp.asarray(rng.normal(size=(*lead, d_in)), jnp.float32)
    return spec, kernel, values, x


# Leading shapes of x: few tokens (rank-r corrections on the frozen kernel) and many (merged kernel).
LEADS = {"corrections": (3, 5), "merged": (4, 30)}


@pytest.mark.parametrize("name, out_axis, mode, idx", SLICED, ids=[c[0] for c in SLICED])
def test_both_paths_are_exercised(name, out_axis, mode, idx):
    for path, lead in LEADS.items():
        spec, kernel, _, x = _inputs(out_axis, mode, idx, lead=lead)
        assert sliced.merges(x, kernel, spec) == (path == "merged")


def _reference(x, kernel, values, out_axis, mode, idx):
    w = _place(kernel, values, out_axis, mode, idx)
    return x @ (w if out_axis == 1 else w.T)


@pytest.mark.parametrize("lead", LEADS.values(), ids=LEADS.keys())
@pytest.mark.parametrize("name, out_axis, mode, idx", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_sliced_matmul_matches_the_merged_kernel(name, out_axis, mode, idx, lead):
    spec, kernel, values, x = _inputs(out_axis, mode, idx, lead=lead)
    y = rocoft_jax.sliced_matmul(x, kernel, values, spec)
    assert y.shape == (*lead, D_OUT) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, _reference(x, kernel, values, out_axis, mode, idx), atol=1e-5, rtol=1e-5)
    # Differentiated calls take their own forward (merged with many tokens); it must agree too.
    y_vjp, _ = jax.vjp(lambda v: rocoft_jax.sliced_matmul(x, kernel, v, spec), values)
    np.testing.assert_allclose(y_vjp, _reference(x, kernel, values, out_axis, mode, idx), atol=1e-5, rtol=1e-5)
    # With the kernel's own entries as the slice it is the plain matmul.
    own = jnp.asarray(
        np.asarray(kernel).reshape(-1)[idx] if mode == "random" else np.take(np.asarray(kernel), idx, axis=spec.axis)
    )
    np.testing.assert_allclose(
        rocoft_jax.sliced_matmul(x, kernel, own, spec),
        x @ (kernel if out_axis == 1 else kernel.T),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("lead", LEADS.values(), ids=LEADS.keys())
@pytest.mark.parametrize("name, out_axis, mode, idx", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_sliced_matmul_gradients_match_the_merged_kernel(name, out_axis, mode, idx, lead):
    spec, kernel, values, x = _inputs(out_axis, mode, idx, lead=lead)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(*lead, D_OUT)), jnp.float32)
    sliced = lambda v, x: jnp.sum(cotangent * rocoft_jax.sliced_matmul(x, kernel, v, spec))
    merged = lambda v, x: jnp.sum(cotangent * _reference(x, kernel, v, out_axis, mode, idx))
    (gv, gx), (rv, rx) = jax.grad(sliced, argnums=(0, 1))(values, x), jax.grad(merged, argnums=(0, 1))(values, x)
    assert gv.shape == spec.slice_shape
    np.testing.assert_allclose(gv, rv, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(gx, rx, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("lead", LEADS.values(), ids=LEADS.keys())
@pytest.mark.parametrize("name, out_axis, mode, idx", SLICED, ids=[c[0] for c in SLICED])
def test_bf16_kernel_with_fp32_slice_sees_updates_below_bf16_resolution(name, out_axis, mode, idx, lead):
    spec, kernel, _, x = _inputs(out_axis, mode, idx, lead=lead)
    kernel = jnp.ones_like(kernel).astype(jnp.bfloat16)  # bf16 spacing at 1.0 is 2**-7
    values = jnp.full(spec.slice_shape, 1.0 + 3e-3, jnp.float32)
    assert np.all(np.asarray(values.astype(jnp.bfloat16), np.float32) == 1.0)  # lost if stored in bf16
    y = rocoft_jax.sliced_matmul(x, kernel, values, spec)
    assert y.dtype == jnp.float32
    reference = _reference(x, kernel.astype(jnp.float32), values, out_axis, mode, idx)
    np.testing.assert_allclose(y, reference, atol=1e-5, rtol=1e-6)
    assert np.abs(np.asarray(reference) - np.asarray(x @ jnp.ones((D_IN, D_OUT)))).max() > 1e-3


# ---------------------------------------------------------------- the weight-gradient trap


@pytest.mark.parametrize("tokens", [64, 512], ids=["corrections", "merged"])
@pytest.mark.parametrize("name, out_axis, mode, idx", SLICED, ids=[c[0] for c in SLICED])
def test_slice_gradient_costs_two_thirds_of_full_fine_tuning(name, out_axis, mode, idx, tokens):
    # Wide enough that the rank-r corrections (r / d of the FLOPs) stay small, as in real layers.
    spec, kernel, values, x = _inputs(out_axis, mode, idx, d_in=4 * D_IN, d_out=4 * D_OUT, lead=(tokens,))
    assert sliced.merges(x, kernel, spec) == (tokens == 512)
    sliced_grad = jax.grad(lambda v, x, k: jnp.sum(rocoft_jax.sliced_matmul(x, k, v, spec) ** 2), argnums=(0, 1))
    full = jax.grad(lambda k, x: jnp.sum((x @ (k if out_axis == 1 else k.T)) ** 2), argnums=(0, 1))
    shapes = dot_output_shapes(jax.make_jaxpr(sliced_grad)(values, x, kernel).jaxpr)
    assert kernel.shape not in shapes and kernel.shape[::-1] not in shapes  # no full weight gradient
    full_shapes = dot_output_shapes(jax.make_jaxpr(full)(kernel, x).jaxpr)
    assert kernel.shape in full_shapes or kernel.shape[::-1] in full_shapes  # the check can see one
    flops = lambda f, *args: jax.jit(f).lower(*args).compile().cost_analysis()["flops"]
    assert flops(sliced_grad, values, x, kernel) < 0.75 * flops(full, kernel, x)


@pytest.mark.parametrize("tokens", [32, 512], ids=["corrections", "merged"])
def test_layers_sharing_an_input_match_separate_layers_with_one_slice_gradient_product(tokens):
    # q, k and v: different row selections and widths, one input.
    widths, picks = (D_OUT, 16, 16), ([1, 7, 30], [0, 5], [3, 9, 11, 15])
    rng = np.random.default_rng(3)
    specs = tuple(_spec(1, "row", idx, d_out=w) for w, idx in zip(widths, picks))
    kernels = tuple(jnp.asarray(rng.normal(size=s.shape), jnp.float32) for s in specs)
    values = tuple(jnp.asarray(rng.normal(size=s.slice_shape), jnp.float32) for s in specs)
    x = jnp.asarray(rng.normal(size=(tokens, D_IN)), jnp.float32)
    cotangents = tuple(jnp.asarray(rng.normal(size=(tokens, w)), jnp.float32) for w in widths)
    loss = lambda ys: sum(jnp.sum(y * c) for y, c in zip(ys, cotangents))
    shared = lambda x, v: loss(fused_dense._rows_sharing_input((x,) * 3, kernels, v, specs, None))
    separate = lambda x, v: loss([rocoft_jax.sliced_matmul(x, k, vi, s) for k, vi, s in zip(kernels, v, specs)])
    assert sliced.merges(x, kernels[0], specs[0]) == (tokens == 512)
    (value, grads), (ref_value, ref_grads) = (
        jax.value_and_grad(f, argnums=(0, 1))(x, values) for f in (shared, separate)
    )
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    shapes = dot_output_shapes(jax.make_jaxpr(jax.grad(shared, argnums=1))(x, values).jaxpr)
    assert (D_IN, 9) in shapes and not {(D_IN, 3), (D_IN, 2), (D_IN, 4)} & set(shapes)


def test_efficient_model_gradient_forms_no_full_weight_gradient():
    model, params = tiny_roberta()
    batch = classification_batch(model.config)
    kernel_shapes = {(32, 32), (32, 64), (64, 32)}
    for mode in ("row", "column"):
        mask = rocoft_jax.mask_params(params, 2, mode, train=())
        trainable, frozen = rocoft_jax.split(params, mask)
        loss = lambda tr, fr, mask=mask: jnp.sum(efficient_forward(model, tr, fr, mask, batch) ** 2)
        shapes = dot_output_shapes(jax.make_jaxpr(jax.grad(loss))(trainable, frozen).jaxpr)
        assert not kernel_shapes & set(shapes), mode
        assert (32, 2) in shapes if mode == "row" else (2, 32) in shapes  # the r-sized slice gradients
    full = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(full_forward(model, p, batch) ** 2)))(params)
    assert kernel_shapes <= set(dot_output_shapes(full.jaxpr))


# ---------------------------------------------------------------- interception of HF layers

MODELS = [("roberta", tiny_roberta, classification_batch), ("gpt2", tiny_gpt2, lm_batch)]


@pytest.mark.parametrize("mode", ["row", "column"])
@pytest.mark.parametrize("model_name, factory, make_batch", MODELS, ids=[m[0] for m in MODELS])
def test_intercepted_model_runs_on_frozen_kernels_plus_slices(model_name, factory, make_batch, mode):
    model, params = factory()
    batch = make_batch(model.config, seed=4)
    mask = rocoft_jax.mask_params(params, 2, mode, train=())
    trainable, frozen = rocoft_jax.split(params, mask)
    forward = lambda tr, fr: efficient_forward(model, tr, fr, mask, batch)
    plain = lambda p: full_forward(model, p, batch)
    np.testing.assert_allclose(forward(trainable, frozen), plain(params), atol=1e-5, rtol=1e-5)
    # Moving the slices changes the model exactly as writing them into the kernels does.
    rng = np.random.default_rng(0)
    moved = jax.tree.map(lambda v: v + jnp.asarray(rng.normal(0.0, 0.05, v.shape), v.dtype), trainable)
    merged = rocoft_jax.merge(moved, frozen, mask)
    np.testing.assert_allclose(forward(moved, frozen), plain(merged), atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(plain(merged)) - np.asarray(plain(params))).max() > 1e-3


def test_sliced_kernels_errors():
    model, params = tiny_gpt2()
    batch = lm_batch(model.config)
    mask = rocoft_jax.mask_params(params, 1, "row")
    trainable, frozen = rocoft_jax.split(params, mask)
    partial = {"rocoft": {"transformer": {"h": {"0": trainable["rocoft"]["transformer"]["h"]["0"]}}}}
    with pytest.raises(
        ValueError,
        match=r"no trained slice for 'transformer/h/1/attn/c_attn/kernel'; pass the "
        r"trainable tree from split\(\)",
    ):
        rocoft_jax.sliced_kernels(partial, mask)

    # A selected kernel no layer uses would silently stay untrained.
    extra = dict(params, unused={"kernel": jnp.ones((4, 4))})
    mask = rocoft_jax.mask_params(
        extra, 1, "row", targets=[r"attn/c_attn/kernel$", r"^unused/kernel$"], train=(), family="gpt2"
    )
    trainable, frozen = rocoft_jax.split(extra, mask)
    with pytest.raises(ValueError, match=r"selected kernel unused/kernel was not used by any nn.Dense or FlaxConv1D"):
        jax.eval_shape(lambda tr, fr: efficient_forward(model, tr, fr, mask, batch), trainable, frozen)

    # A mask built for the wrong layout is refused at the layer, not silently applied to the other axis.
    mask = rocoft_jax.mask_params(params, 1, "row", targets=[r"attn/c_attn/kernel$"], family="llama")
    trainable, frozen = rocoft_jax.split(params, mask)
    with pytest.raises(
        ValueError,
        match=r"FlaxConv1D at transformer/h/0/attn/c_attn has output axis 0, but the "
        r"mask assumed 1; rebuild the mask with the right family",
    ):
        jax.eval_shape(lambda tr, fr: efficient_forward(model, tr, fr, mask, batch), trainable, frozen)
