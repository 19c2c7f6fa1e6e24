"""``(dy @ W^T) * s`` as one Hopper matmul, for the backward pass of BERT-family MLPs.

In the MLP ``y = GELU(h) @ W + b`` the backward pass forms ``dg = dy @ W^T`` and
then, in a second pass, ``dh = dg * GELU'(h)``: dg is written to memory once and
read back once. Here the slope s = GELU'(h), written by the forward pass's GELU
kernel next to GELU(h) (`rocoft_jax.fast.gelu.gelu_and_slope`), is applied in the
matmul's epilogue instead, to the fp32 accumulator, so dg never reaches memory.
The slope is kept rather than recomputed in the epilogue because the epilogue does
not overlap the tensor cores, so math there is paid in full.

Contract: `scaled_input_grad` returns ``(dy @ w.T) * s`` in s's dtype, the product
in fp32 until scaled, on any backend. The kernel (`matmul_t_scale`) runs only on a
Hopper GPU (`available`) for bf16 operands whose dimensions the tiles divide
(`supported`); everywhere else XLA forms the same product.

The kernel is jax's Mosaic GPU Hopper matmul
(``jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu``, Apache-2.0, The JAX
Authors), reduced to the one layout we need and changed twice: the right
operand is read as ``W`` (N, K), as Flax stores the output layer's kernel,
through a transposed shared-memory view; and the tiles of s are loaded while
the tensor cores run, so the epilogue only multiplies. Measurements and the
variants tried: docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.extend import backend

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # a jax without Mosaic GPU: `available` is False and XLA forms the product
    plgpu = None

# The oldest jax this kernel was lowered with (0.10.2; run on H100s with 0.11.2): Mosaic GPU's API moves fast.
MIN_JAX = (0, 10)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Each of the two compute warpgroups owns a (tile_m, tile_n) accumulator; they sit side by side along M."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    max_concurrent_steps: int = 3  # 4 leaves no shared memory for the prefetched tiles of s
    epi_tile: int = 64
    grid_minor_n: bool = True
    grid_tile_width: int = 16


def _kernel(a_gmem, w_gmem, s_gmem, out_gmem, tiling: Tiling):
    m, k = a_gmem.shape
    n = w_gmem.shape[0]
    dtype = a_gmem.dtype
    tile_m, tile_n, tile_k = tiling.tile_m, tiling.tile_n, tiling.tile_k
    cta_tile_m = 2 * tile_m
    epi = tiling.epi_tile
    swizzle = plgpu.find_swizzle(tile_k * jnp.dtype(dtype).itemsize * 8)
    transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))
    out_swizzle = plgpu.find_swizzle(epi * jnp.dtype(dtype).itemsize * 8)
    out_transforms = (
        plgpu.TilingTransform((8, out_swizzle // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(out_swizzle),
    )
    m_iters, n_iters, k_iters = m // cta_tile_m, n // tile_n, k // tile_k

    def get_pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec(
                    (cta_tile_m, tile_k), lambda kk: (0, kk), transforms=transforms, memory_space=plgpu.SMEM
                ),
                plgpu.BlockSpec((tile_n, tile_k), lambda kk: (0, kk), transforms=transforms, memory_space=plgpu.SMEM),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=tiling.max_concurrent_steps,
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None
    sub_tiles = [(mi, ni) for mi in range(tile_m // epi) for ni in range(tile_n // epi)]

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(a_gmem, w_gmem),
        s_smem=plgpu.SMEM((2, len(sub_tiles), epi, epi), dtype, transforms=out_transforms),
        s_barrier=plgpu.Barrier(num_barriers=2 * len(sub_tiles)),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, s_smem, s_barrier):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="cluster_grid")
        def _tiles(loop_info):
            (lin,) = loop_info.index
            m_idx, n_idx = plgpu.planar_snake(lin, (m_iters, n_iters), int(tiling.grid_minor_n), tiling.grid_tile_width)
            m_slice = pl.ds(m_idx * cta_tile_m, cta_tile_m)
            n_slice = pl.ds(n_idx * tile_n, tile_n)
            wg_m_slice = pl.ds(wg * tile_m, tile_m)

            def gmem_tile(ref, mi, ni):
                return ref.at[m_slice, n_slice].at[wg_m_slice, :].at[pl.ds(mi * epi, epi), pl.ds(ni * epi, epi)]

            def compute_context(eval_pipeline):
                # The tiles of s load while the tensor cores run; the last tile's stores must have read them first.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                for i, (mi, ni) in enumerate(sub_tiles):
                    plgpu.copy_gmem_to_smem(
                        gmem_tile(s_gmem, mi, ni), s_smem.at[wg, i], s_barrier.at[wg * len(sub_tiles) + i]
                    )

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.float32))
                def _acc(acc_ref):
                    eval_pipeline(acc_ref)
                    acc = acc_ref[...]
                    for i, (mi, ni) in enumerate(sub_tiles):
                        plgpu.barrier_wait(s_barrier.at[wg * len(sub_tiles) + i])
                        sub = acc[mi * epi : (mi + 1) * epi, ni * epi : (ni + 1) * epi]
                        s_smem[wg, i] = (sub * s_smem[wg, i].astype(jnp.float32)).astype(dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(s_smem.at[wg, i], gmem_tile(out_gmem, mi, ni))

            def mma(_, a_smem, w_smem, acc_ref):
                plgpu.wgmma(acc_ref, a_smem.at[wg_m_slice], w_smem.transpose((1, 0)))
                plgpu.wgmma_wait(0)
                return acc_ref

            get_pipeline(mma, compute_context)(
                a_gmem.at[m_slice, :], w_gmem.at[n_slice, :], allocations=pipeline_allocs
            )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def supported(dy, w, s, tiling: Tiling = Tiling()) -> bool:
    """Whether the kernel takes these shapes and dtypes (bf16, tiles dividing every dimension)."""
    (m, k), (n, k2) = dy.shape, w.shape
    return (
        dy.dtype == w.dtype == s.dtype == jnp.bfloat16
        and k == k2
        and s.shape == (m, n)
        and m % (2 * tiling.tile_m) == 0
        and n % tiling.tile_n == 0
        and k % tiling.tile_k == 0
    )


# Jitted with its configuration static: the calls of every layer share one traced and lowered kernel.
@functools.partial(jax.jit, static_argnames=("tiling",))
def matmul_t_scale(dy, w, s, tiling: Tiling = Tiling()):
    """``(dy @ w.T) * s`` in one Hopper kernel: dy (M, K), w (N, K), s (M, N), all bf16."""
    if not supported(dy, w, s, tiling):
        raise ValueError(
            f"matmul_t_scale needs bf16 dy (M, K), w (N, K), s (M, N) with M divisible by "
            f"{2 * tiling.tile_m}, N by {tiling.tile_n} and K by {tiling.tile_k}; got dy {dy.shape} "
            f"{dy.dtype}, w {w.shape} {w.dtype}, s {s.shape} {s.dtype}"
        )
    num_sms = getattr(backend.get_default_device(), "core_count", 132)  # 132: H100 SXM, when traced off-GPU
    call = plgpu.kernel(
        functools.partial(_kernel, tiling=tiling),
        out_type=jax.ShapeDtypeStruct(s.shape, s.dtype),
        grid=(num_sms,),
        grid_names=("cluster_grid",),
        cluster=(1,),
        cluster_names=("cluster",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return call(dy, w, s)


def available() -> bool:
    """Whether the kernel can run: a Hopper GPU (compute capability 9.x) and a jax at least ``MIN_JAX``."""
    if plgpu is None or jax.__version_info__[:2] < MIN_JAX:
        return False
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def scaled_input_grad(dy, w, s, precision=None):
    """``(dy @ w.T) * s`` for dy (..., K), w (N, K), s (..., N), in s's dtype; the product is fp32 until scaled.

    One `matmul_t_scale` kernel on a Hopper GPU where the shapes fit it, else XLA.
    """

    def xla(dy, w, s):
        dg = lax.dot_general(
            dy, w, (((dy.ndim - 1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
        return (dg * s.astype(jnp.float32)).astype(s.dtype)

    flat_dy, flat_s = dy.reshape(-1, dy.shape[-1]), s.reshape(-1, s.shape[-1])
    if not (available() and supported(flat_dy, w, flat_s)):
        return xla(dy, w, s)
    out = lax.platform_dependent(flat_dy, w, flat_s, cuda=matmul_t_scale, default=xla)
    return out.reshape(s.shape)
