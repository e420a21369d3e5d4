"""The one switch between the implementations of the band attention (the setting ``attention_implementation``).

Every implementation computes ``attention.lean_band_attention_heads``: the local attention of every
query (the band of ``w`` keys each side without pad and global keys, plus the ``G`` global keys as
extra columns with the local keys and values), ``q`` already scaled, mask 0 pad / 1 local / 2 global,
pad rows zero, softmax in float32, output in ``v``'s dtype. The rows of global queries are computed
apart and written over these, as before.

=============  =======  ==========================================================================
name           runs on  what it is
=============  =======  ==========================================================================
``blocked``    any      ``attention.lean_band_attention_heads``: plain JAX, the reference (default)
``splash``     TPU      ``kernels.splash``: TPU splash attention, global keys as a key prefix; no
                        attention dropout (refused)
``pallas-gpu`` GPU      ``kernels.pallas_gpu``: Pallas (Triton) band kernels, forward and backward,
                        attention dropout inside the kernels
``auto``       any      the kernel of the platform (``splash`` on TPU, ``pallas-gpu`` on GPU), else
                        ``blocked``; ``blocked`` also where the kernel would refuse the dropout, and
                        for dilated or causal windows
=============  =======  ==========================================================================

The kernels implement the two-sided, undilated band only: dilated (``dilation``) and causal
(``causal``) windows are computed by ``blocked`` (``attention.band_pattern``), and asking a kernel for
them is a ValueError naming the setting.

The platform is that of the devices the program is built for: the ambient mesh's (``jax.set_mesh``)
when there is one, so a program compiled on a CPU host for a TPU or GPU target (a mesh of the
target's devices, ``longformer_jax.targets``) gets that target's kernels; else JAX's default backend.

On a backend a kernel is not made for it runs only in Pallas interpret mode (slow; what the tests
on a CPU use): pass ``interpret=True``, or wrap the call (or a whole model's ``apply``) in
:func:`interpret_mode`. Otherwise such a request is a ValueError, as are unknown names and dropout
that a kernel cannot apply. The dropout of ``pallas-gpu`` draws its own mask
(``kernels.common.keep``), not the blocked path's stream. Under an ambient mesh (``jax.set_mesh``)
a kernel runs on each device's rows of the batch (``shard_map``), with the numbers of one device.

Status: both kernels are exact to the blocked path in interpret mode and lower to Triton / Mosaic
(tests/test_kernels.py); neither has yet run on a GPU or TPU, so what ``auto`` picks there is the
design's expectation, to be confirmed by ``bash bench/accelerator.sh``.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from longformer_jax import attention, sharding
from longformer_jax.attention import GlobalSlots
from longformer_jax.config import ATTENTION_IMPLEMENTATIONS
from longformer_jax.kernels import common, pallas_gpu, splash

Array = jax.Array

IMPLEMENTATIONS = ATTENTION_IMPLEMENTATIONS
# The backends each implementation is compiled for (elsewhere: interpret mode only).
NATIVE_BACKENDS = {"blocked": ("cpu", "gpu", "tpu"), "splash": ("tpu",), "pallas-gpu": ("gpu",)}
# Implementations that apply dropout to the attention probabilities.
WITH_DROPOUT = ("blocked", "pallas-gpu")
# What "auto" picks per backend when the kernel can run the request.
AUTO = {"tpu": "splash", "gpu": "pallas-gpu"}

_INTERPRET = contextvars.ContextVar("longformer_jax_kernels_interpret", default=False)


@contextlib.contextmanager
def interpret_mode(enabled: bool = True):
    """Within this block, kernels asked for on a backend they are not made for run in interpret mode.

    Read when a function is traced: wrap the first call of a jitted function (or ``model.apply``).
    For tests on a CPU; interpret mode is far too slow for anything else."""
    token = _INTERPRET.set(enabled)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def mesh_platform() -> str | None:
    """The platform of the ambient mesh's devices (``jax.set_mesh``), None without a mesh.

    A program compiled ahead of time for an accelerator target from a CPU host runs under a mesh of
    that target's devices (``longformer_jax.targets``): the kernels follow the devices the program is
    built for, not the host's backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None)


def _backend(backend: str | None) -> str:
    """``backend``, else the ambient mesh's platform, else JAX's default backend; ``gpu`` for CUDA and ROCm."""
    b = backend or mesh_platform() or jax.default_backend()
    return "gpu" if b in ("cuda", "rocm") else b


def _check_name(name: str) -> None:
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention_implementation={name!r} is not known; choose one of "
            + ", ".join(repr(n) for n in IMPLEMENTATIONS)
            + " ('blocked' is the plain-JAX reference, 'auto' the fastest exact one for the backend)."
        )


def available_implementations(backend: str | None = None) -> tuple[str, ...]:
    """The implementations that run compiled (not interpreted) on ``backend`` (default: the ambient mesh's
    platform, else JAX's backend)."""
    b = _backend(backend)
    return tuple(n for n in IMPLEMENTATIONS[:-1] if b in NATIVE_BACKENDS[n])


def resolve_implementation(
    name: str, backend: str | None = None, *, dropout: bool = False, pattern: bool = False
) -> str:
    """``name`` itself, or for ``"auto"`` the implementation it stands for on ``backend``.

    ``dropout``: whether attention dropout is applied (then ``auto`` never picks a kernel without it);
    ``pattern``: whether the band is dilated or causal (then ``auto`` is ``blocked``)."""
    _check_name(name)
    if name != "auto":
        return name
    kernel = AUTO.get(_backend(backend))
    if kernel is None or (dropout and kernel not in WITH_DROPOUT) or pattern:
        return "blocked"
    return kernel


def _check_pattern(impl: str, dilation, causal: bool) -> None:
    """A ValueError when a kernel is asked for a dilated or causal band (they implement neither)."""
    if impl == "blocked" or attention.is_plain_band(dilation, causal):
        return
    settings = ([] if attention.is_plain_band(dilation) else [f"attention_dilation={dilation!r}"]) + (
        ["causal_attention=True"] if causal else []
    )
    raise ValueError(
        f"attention_implementation={impl!r} implements only the two-sided, undilated band, but "
        f"{' and '.join(settings)} asked for another. Use attention_implementation='blocked' (or 'auto', "
        "which takes 'blocked' for dilated and causal windows)."
    )


def check_implementation(
    name: str,
    backend: str | None = None,
    *,
    dropout: bool = False,
    interpret: bool | None = None,
    dilation=1,
    causal: bool = False,
) -> tuple[str, bool]:
    """(resolved name, interpret) for a request, or a ValueError that says what to change.

    ``dilation`` (an int or one per head) and ``causal``: the band's pattern; kernels refuse any but the
    two-sided, undilated band."""
    b = _backend(backend)
    impl = resolve_implementation(name, b, dropout=dropout, pattern=not attention.is_plain_band(dilation, causal))
    _check_pattern(impl, dilation, causal)
    if dropout and impl not in WITH_DROPOUT:
        raise ValueError(
            f"attention_implementation={impl!r} cannot apply attention dropout (its kernel has none), and "
            "training with attention_probs_dropout_prob > 0 asked for it. Set attention_probs_dropout_prob=0.0, "
            "or use attention_implementation='auto' (which then takes 'blocked'), 'blocked' or 'pallas-gpu' (GPU)."
        )
    if interpret is None:
        interpret = _INTERPRET.get() and b not in NATIVE_BACKENDS[impl]
    if not interpret and b not in NATIVE_BACKENDS[impl]:
        where = " or ".join(x.upper() for x in NATIVE_BACKENDS[impl])
        raise ValueError(
            f"attention_implementation={impl!r} runs on {where}, but the program is built for {b!r} devices. Use "
            f"attention_implementation='auto' (here: {resolve_implementation('auto', b, dropout=dropout)!r}) or "
            "'blocked'; to test the kernel on this backend, run it in Pallas interpret mode "
            "(interpret=True, or inside longformer_jax.kernels.interpret_mode())."
        )
    return impl, bool(interpret) and impl != "blocked"


def batch_shard_axes(batch: int) -> tuple[str, ...]:
    """The axes of the ambient mesh (``jax.set_mesh``) that the batch is split over, () when none.

    The batch axes are those of ``longformer_jax.sharding`` (``BATCH_AXES``: "data", "fsdp"),
    where the mesh has them with more than one device, not already manual (inside a ``shard_map``),
    and their product divides ``batch``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    wanted = sharding.BATCH_AXES
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    axes = tuple(a for a in wanted if a in types and mesh.shape[a] > 1 and types[a] != jax.sharding.AxisType.Manual)
    n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    return axes if axes and batch % n == 0 else ()


def band_attention(
    implementation: str,
    q_BxHxLxD: Array,
    k_BxHxLxD: Array,
    v_BxHxLxD: Array,
    mask_BxL: Array,
    one_sided_window: int,
    slots: GlobalSlots | None = None,
    *,
    block_size: int | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    interpret: bool | None = None,
    dilation: int | tuple[int, ...] = 1,
    causal: bool = False,
) -> Array:
    """The band plus global columns, (B, H, L, D), by ``implementation`` (see the module docstring).

    The arguments are those of ``attention.lean_band_attention_heads``; ``block_size`` (the blocked
    path's query block) is used by ``blocked`` only, the kernels choose their own tiles. Dropout is
    on when ``dropout_rng`` is given and ``dropout_rate > 0``. ``interpret``: run a kernel in Pallas
    interpret mode (None: only inside :func:`interpret_mode`, on a backend it is not made for).
    ``dilation`` and ``causal``: a dilated or causal band, ``blocked`` only (a kernel refuses them).

    A kernel is one custom call that XLA cannot split over devices: under an ambient mesh
    (``jax.set_mesh``) whose batch axes divide the batch (:func:`batch_shard_axes`), it runs on each
    device's rows in a ``shard_map``, and a row's dropout mask stays the one it draws on one device."""
    dropout = dropout_rng is not None and float(dropout_rate) > 0.0
    impl, interpret = check_implementation(
        implementation, dropout=dropout, interpret=interpret, dilation=dilation, causal=causal
    )
    args = (q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, mask_BxL, one_sided_window, slots)
    if impl == "blocked":
        return attention.lean_band_attention_heads(
            *args,
            block_size=block_size,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
            dilation=dilation,
            causal=causal,
        )
    B, H = q_BxHxLxD.shape[:2]
    streams = common.dropout_streams(dropout_rng, B, H) if dropout else None
    w = one_sided_window

    def kernel(q, k, v, mask, slots, streams):
        if impl == "splash":
            return splash.band_attention(q, k, v, mask, w, slots, interpret=interpret)
        return pallas_gpu.band_attention(
            q,
            k,
            v,
            mask,
            w,
            slots,
            dropout_rate=dropout_rate if dropout else 0.0,
            dropout_streams_BxH=streams,
            interpret=interpret,
        )

    operands = (q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, mask_BxL, slots, streams)
    axes = batch_shard_axes(B)
    if not axes:
        return kernel(*operands)
    rows = P(axes)
    specs = tuple(None if x is None else jax.tree_util.tree_map(lambda _: rows, x) for x in operands)
    return jax.shard_map(kernel, in_specs=specs, out_specs=rows, check_vma=False)(*operands)


__all__ = [
    "IMPLEMENTATIONS",
    "available_implementations",
    "band_attention",
    "batch_shard_axes",
    "check_implementation",
    "interpret_mode",
    "mesh_platform",
    "resolve_implementation",
]
