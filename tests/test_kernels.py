"""The attention kernels equal the blocked band: outputs and gradients, in Pallas interpret mode on a CPU.

Every kernel (``splash``, ``pallas-gpu``) against ``attention.lean_band_attention_heads`` (the blocked
path, exact to the dense statement and to HF): tail padding, interior pads, no globals, many globals,
windows 8 and 16, float32 and bfloat16; every head with per-layer windows, the kernel chosen by the
config setting ``attention_implementation`` (outputs of every head, every parameter's gradient); the
kernel dropout against a dense reference with the same mask; the refusals of the dispatcher.

Errors are measured against the size of the reference (``max |a - b| / max(1, max |b|)``): bfloat16
keeps 8 bits, so one unit in the last place at 8 is 0.06.

The helpers (``scaled_error``, ``assert_trees_close``, ``values_and_grads``) are meant for any
comparison of two implementations, whole models included.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import longformer_jax as lj
from longformer_jax import attention as A
from longformer_jax import kernels
from longformer_jax.kernels import common
from longformer_jax.state_dict import convert_params

KERNELS = ("splash", "pallas-gpu")
TOL = {"float32": 1e-5, "bfloat16": 2e-2}
MASKED = common.MASKED


# ------------------------------------------------------------------------------------- helpers
def scaled_error(got, want) -> float:
    """max |got - want| / max(1, max |want|), in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} vs {want.shape}"
    if not want.size:
        return 0.0
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def assert_trees_close(got, want, tol: float, what: str = "") -> None:
    """Every leaf of ``got`` within ``tol`` (scaled error) of the same leaf of ``want``; names the worst."""
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    want_leaves = jax.tree_util.tree_leaves_with_path(want)
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves], f"{what}: the trees differ in structure"
    assert got_leaves, f"{what}: nothing to compare"
    errors = {jax.tree_util.keystr(p): scaled_error(g, w) for (p, g), (_, w) in zip(got_leaves, want_leaves)}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{what}: {worst} differs by {errors[worst]:.3g} (tolerance {tol:g})"


def values_and_grads(fn, args, cotangent_seed: int = 7):
    """``fn(*args)`` and the gradients of ``sum(fn(*args) * c)`` for every arg (c random, fixed), jitted."""

    def loss(*a):
        out = fn(*a)
        c = jax.random.normal(jax.random.PRNGKey(cotangent_seed), out.shape, jnp.float32)
        return jnp.sum(out.astype(jnp.float32) * c), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return out, grads


@dataclasses.dataclass(frozen=True)
class Case:
    """A band problem (see ``band_inputs``): length, head size, one-sided window, global tokens of even
    and odd rows, tail pads (even rows), interior pads (odd rows)."""

    L: int
    D: int
    w: int
    globals: tuple[int, int]
    tail_pads: int
    interior: tuple[int, int]
    spare_slots: int = 1  # empty slots must change nothing


CASES = {
    # row 0: 20 global tokens and 11 pads at the end; row 1: 3 global tokens and 5 pads inside
    "pads+globals,w8": Case(L=64, D=8, w=8, globals=(20, 3), tail_pads=11, interior=(20, 25)),
    "no-globals,w16": Case(L=64, D=16, w=16, globals=(0, 0), tail_pads=5, interior=(30, 35), spare_slots=0),
}


def band_inputs(case: Case, dtype: str, seed: int = 0, batch: int = 2):
    """(q, k, v, mask, slots): q scaled by 1/sqrt(D) as the model does; mask 0 pad / 1 local / 2 global.

    Even rows have the case's tail pads and ``globals[0]`` global tokens, odd rows its interior pads
    and ``globals[1]``."""
    B, H = batch, 2
    rng = np.random.default_rng(seed)
    mask = np.ones((B, case.L), np.int32)
    for b in range(B):
        if b % 2 == 0 and case.tail_pads:
            mask[b, case.L - case.tail_pads :] = 0
        if b % 2 == 1:
            mask[b, case.interior[0] : case.interior[1]] = 0
        mask[b, rng.choice(np.flatnonzero(mask[b]), size=case.globals[b % 2], replace=False)] = 2
    q, k, v = (rng.normal(size=(B, H, case.L, case.D)).astype(np.float32) for _ in range(3))
    q = q / np.sqrt(case.D)
    q, k, v = (jnp.asarray(x).astype(dtype) for x in (q, k, v))
    mask = jnp.asarray(mask)
    return q, k, v, mask, A.global_slots(mask == 2, max(case.globals) + case.spare_slots)


_REFERENCE = {}


def blocked_reference(case_name: str, dtype: str):
    """Outputs and (q, k, v) gradients of the blocked path, computed once per case and dtype."""
    if (case_name, dtype) not in _REFERENCE:
        case = CASES[case_name]
        q, k, v, mask, slots = band_inputs(case, dtype)
        fn = lambda q, k, v: A.lean_band_attention_heads(q, k, v, mask, case.w, slots)
        _REFERENCE[case_name, dtype] = values_and_grads(fn, (q, k, v))
    return _REFERENCE[case_name, dtype]


# ------------------------------------------------------------------------------------- the band
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_equals_blocked_band(impl, case_name, dtype):
    case = CASES[case_name]
    q, k, v, mask, slots = band_inputs(case, dtype)
    fn = lambda q, k, v: kernels.band_attention(impl, q, k, v, mask, case.w, slots, interpret=True)
    out, grads = values_and_grads(fn, (q, k, v))
    ref_out, ref_grads = blocked_reference(case_name, dtype)
    assert out.dtype == jnp.dtype(dtype) and out.shape == ref_out.shape
    assert scaled_error(out, ref_out) <= TOL[dtype], scaled_error(out, ref_out)
    assert_trees_close(dict(zip("qkv", grads)), dict(zip("qkv", ref_grads)), TOL[dtype], f"{impl} {case_name}")
    pad_rows = np.broadcast_to(np.asarray(mask == 0)[:, None, :, None], out.shape)
    assert np.all(np.asarray(out.astype(jnp.float32))[pad_rows] == 0), "pad rows must be exactly zero"


def test_blocked_is_the_lean_band_exactly():
    case = CASES["pads+globals,w8"]
    q, k, v, mask, slots = band_inputs(case, "float32")
    rng = jax.random.PRNGKey(3)
    got = kernels.band_attention("blocked", q, k, v, mask, case.w, slots, dropout_rate=0.2, dropout_rng=rng)
    want = A.lean_band_attention_heads(q, k, v, mask, case.w, slots, dropout_rate=0.2, dropout_rng=rng)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize(
    "impl,platform,call", [("pallas-gpu", "cuda", "__gpu$xla.gpu.triton"), ("splash", "tpu", "tpu_custom_call")]
)
def test_kernels_lower_for_their_accelerator(impl, platform, call):
    """Compiled (not interpreted) at the model's head size, window and dtype, the forward and both backward
    kernels lower to Triton / Mosaic from this CPU: every operation they use has a lowering there."""
    case = Case(L=256, D=64, w=64, globals=(5, 2), tail_pads=11, interior=(20, 25))
    q, k, v, mask, slots = band_inputs(case, "bfloat16")
    fn = {"pallas-gpu": kernels.pallas_gpu.band_attention, "splash": kernels.splash.band_attention}[impl]
    kw = dict(dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0)) if impl == "pallas-gpu" else {}

    def grads(q, k, v):
        return jax.grad(lambda *a: jnp.sum(fn(*a, mask, case.w, slots, **kw).astype(jnp.float32)), (0, 1, 2))(q, k, v)

    text = jax.jit(grads).trace(q, k, v).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(call) == 3, f"{impl}: {text.count(call)} kernel calls, expected forward, dQ, dK/dV"


def test_splash_is_made_with_no_device_computation():
    """Splash's mask tables are NumPy work that enters the program as constants: tracing the kernel
    moves nothing to a device (so it lowers for a target's devices that this host does not have)."""
    case = CASES["pads+globals,w8"]
    q, k, v, mask, slots = band_inputs(case, "float32")
    fn = jax.jit(lambda q, k, v: kernels.splash.band_attention(q, k, v, mask, case.w, slots, interpret=True))
    with jax.transfer_guard("disallow"):
        text = fn.trace(q, k, v).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" not in text  # interpret mode: plain HLO
    with jax.transfer_guard("disallow"):
        text = (
            jax.jit(lambda q: kernels.splash.band_attention(q, k, v, mask, case.w, slots))
            .trace(q)
            .lower(lowering_platforms=("tpu",))
        )
    assert text.as_text().count("tpu_custom_call") == 1


def tpu_topology_mesh(n: int):
    """A mesh of ``n`` devices of a v5e:2x2 topology (libtpu, no TPU needed); skipped where libtpu is absent."""
    pytest.importorskip("libtpu", reason="libtpu (the 'aot' extra) compiles for TPU targets")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    return jax.sharding.Mesh(np.array(devices[:n]), ("data",))


def test_kernel_choice_follows_the_mesh_platform_not_the_host():
    """On this CPU host, under a mesh of TPU target devices, ``auto`` is splash and splash runs compiled
    (Mosaic calls in the lowered program), not refused or interpreted; outside the mesh, the host's choice."""
    assert kernels.mesh_platform() is None
    assert kernels.resolve_implementation("auto") == "blocked"
    cpu_mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    with jax.set_mesh(cpu_mesh):
        assert kernels.mesh_platform() == "cpu"
    case = CASES["pads+globals,w8"]
    q, k, v, mask, slots = band_inputs(case, "float32")
    mesh = tpu_topology_mesh(q.shape[0])  # the kernel runs on each device's rows
    with jax.set_mesh(mesh):
        assert kernels.mesh_platform() == "tpu"
        assert kernels.resolve_implementation("auto") == "splash"
        assert kernels.check_implementation("splash") == ("splash", False)
        fn = jax.jit(lambda q: kernels.band_attention("auto", q, k, v, mask, case.w, slots))
        text = fn.trace(q).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 1
    with pytest.raises(ValueError, match=r"'splash' runs on TPU, but the program is built for 'cpu' devices"):
        kernels.check_implementation("splash")


# ------------------------------------------------------------------------------------- dropout
def dense_band(q, k, v, mask, w, slots, keep_hf=None, rate=0.0):
    """The band function stated densely (L x L scores), with an optional dropout mask in HF's layout."""
    B, H, L, D = q.shape
    G = common.num_slots(slots)
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    in_band = np.abs(i - j) <= w
    bias = jnp.where(in_band[None], jnp.where((mask == 1)[:, None, :], 0.0, MASKED), -jnp.inf)[:, None]
    s = jnp.einsum("bhid,bhjd->bhij", q, k) + bias
    kg, vg = common.global_prefix(k, v, slots)
    sg = jnp.einsum("bhid,bhgd->bhig", q, kg) + jnp.where(slots.valid_BxG, 0.0, MASKED)[:, None, None, :]
    p = jax.nn.softmax(jnp.concatenate([sg, s], axis=-1), axis=-1)
    pg, pb = p[..., :G], p[..., G:]
    if keep_hf is not None:
        scale = 1.0 / (1.0 - rate)
        col = G + np.clip(j - i + w, 0, 2 * w)  # the HF column of key j in row i
        keep_band = jnp.take_along_axis(keep_hf, jnp.broadcast_to(jnp.asarray(col), (B, H, L, L)), axis=-1)
        pb = jnp.where(keep_band & in_band, pb * scale, 0.0)
        pg = jnp.where(keep_hf[..., :G], pg * scale, 0.0)
    out = jnp.einsum("bhij,bhjd->bhid", pb, v) + jnp.einsum("bhig,bhgd->bhid", pg, vg)
    return jnp.where((mask == 0)[:, None, :, None], 0.0, out)


def test_dense_reference_is_the_blocked_band():
    case = CASES["pads+globals,w8"]
    q, k, v, mask, slots = band_inputs(case, "float32")
    want = A.lean_band_attention_heads(q, k, v, mask, case.w, slots)
    assert scaled_error(dense_band(q, k, v, mask, case.w, slots), want) <= 1e-5


@pytest.mark.slow
def test_pallas_gpu_dropout_equals_dense_reference_with_the_same_mask():
    case = CASES["pads+globals,w8"]
    q, k, v, mask, slots = band_inputs(case, "float32")
    rate = 0.3
    B, H, L, _ = q.shape

    def kernel(rng):
        return lambda q, k, v: kernels.band_attention(
            "pallas-gpu", q, k, v, mask, case.w, slots, dropout_rate=rate, dropout_rng=rng, interpret=True
        )

    def dense(rng):
        keep_hf = common.keep_mask_hf(rng, rate, B, H, L, common.num_slots(slots), case.w)
        return lambda q, k, v: dense_band(q, k, v, mask, case.w, slots, keep_hf, rate)

    rng = jax.random.PRNGKey(11)
    out, grads = values_and_grads(kernel(rng), (q, k, v))
    ref_out, ref_grads = values_and_grads(dense(rng), (q, k, v))
    assert scaled_error(out, ref_out) <= 1e-5
    assert_trees_close(dict(zip("qkv", grads)), dict(zip("qkv", ref_grads)), 1e-5, "dropout")
    # Dropout happened, and another key draws another mask.
    plain, _ = blocked_reference("pads+globals,w8", "float32")
    assert scaled_error(out, plain) > 1e-2
    other = jax.jit(kernel(jax.random.PRNGKey(12)))(q, k, v)
    assert scaled_error(other, out) > 1e-2
    assert scaled_error(other, dense(jax.random.PRNGKey(12))(q, k, v)) <= 1e-5


def test_kernel_dropout_mask_rate_and_independence():
    rate = 0.1
    a = np.asarray(common.keep_mask_hf(jax.random.PRNGKey(0), rate, 2, 4, 512, 32, 64))
    b = np.asarray(common.keep_mask_hf(jax.random.PRNGKey(1), rate, 2, 4, 512, 32, 64))
    n = a.size  # about 1.2 M entries: the kept fraction is within 5 standard deviations of 0.9
    assert abs(a.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
    # Different keys, heads, batch rows and neighbouring entries draw unrelated masks.
    for x, y in [(a, b), (a[0, 0], a[0, 1]), (a[0], a[1]), (a[..., :-1], a[..., 1:]), (a[:, :, :-1], a[:, :, 1:])]:
        agree = (x == y).mean()
        assert abs(agree - (rate**2 + (1 - rate) ** 2)) < 0.01, agree
    assert not np.asarray(common.keep_mask_hf(jax.random.PRNGKey(0), 1.0, 1, 1, 8, 0, 2)).any()


# ------------------------------------------------------------------------------------- dispatch
def test_resolution_and_availability():
    assert kernels.available_implementations("cpu") == ("blocked",)
    assert kernels.available_implementations("gpu") == ("blocked", "pallas-gpu")
    assert kernels.available_implementations("cuda") == ("blocked", "pallas-gpu")
    assert kernels.available_implementations("tpu") == ("blocked", "splash")
    assert kernels.resolve_implementation("auto", "cpu") == "blocked"
    assert kernels.resolve_implementation("auto", "gpu") == "pallas-gpu"
    assert kernels.resolve_implementation("auto", "gpu", dropout=True) == "pallas-gpu"
    assert kernels.resolve_implementation("auto", "tpu") == "splash"
    assert kernels.resolve_implementation("auto", "tpu", dropout=True) == "blocked"
    assert kernels.resolve_implementation("splash", "cpu") == "splash"
    assert kernels.resolve_implementation("auto") == "blocked"  # this test runs on a CPU


def test_refusals_name_the_setting_and_the_fix():
    case = CASES["no-globals,w16"]
    q, k, v, mask, slots = band_inputs(case, "float32")
    call = lambda impl, **kw: kernels.band_attention(impl, q, k, v, mask, case.w, slots, **kw)
    with pytest.raises(ValueError, match=r"attention_implementation='flash' is not known.*'blocked'"):
        call("flash")
    for impl, device in (("splash", "TPU"), ("pallas-gpu", "GPU")):
        with pytest.raises(ValueError, match=rf"attention_implementation='{impl}' runs on {device}.*'cpu'.*'auto'"):
            call(impl)
    with pytest.raises(ValueError, match=r"'splash' cannot apply attention dropout.*attention_probs_dropout_prob=0"):
        call("splash", dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0), interpret=True)
    with pytest.raises(ValueError, match="cannot apply attention dropout"):
        kernels.check_implementation("splash", "tpu", dropout=True)
    # Without an rng (evaluation) the rate is not applied, so splash takes it.
    out = call("splash", dropout_rate=0.1, interpret=True)
    assert scaled_error(out, A.lean_band_attention_heads(q, k, v, mask, case.w, slots)) <= 1e-5
    with pytest.raises(ValueError, match="powers of two"):
        kernels.pallas_gpu.band_attention(q, k, v, mask, case.w, slots, tiles=(24, 16), interpret=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        kernels.splash.band_attention(q, k, v, mask, case.w, slots, block=64, interpret=True)


def test_interpret_mode_context():
    case = CASES["no-globals,w16"]
    q, k, v, mask, slots = band_inputs(case, "float32")
    with kernels.interpret_mode():
        out = kernels.band_attention("pallas-gpu", q, k, v, mask, case.w, slots)
        assert kernels.check_implementation("auto") == ("blocked", False)
    assert scaled_error(out, A.lean_band_attention_heads(q, k, v, mask, case.w, slots)) <= 1e-5
    with pytest.raises(ValueError, match="runs on GPU"):
        kernels.band_attention("pallas-gpu", q, k, v, mask, case.w, slots)


MESH_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp
    jax.config.update("jax_default_matmul_precision", "highest")
    from jax.sharding import NamedSharding, PartitionSpec as P
    from longformer_jax import attention as A, kernels, sharding
    from tests.test_kernels import CASES, band_inputs, scaled_error
    assert jax.device_count() == 4, jax.devices()
    case = CASES["pads+globals,w8"]
    q, k, v, mask, slots = band_inputs(case, "float32", batch=4)
    rng = jax.random.PRNGKey(5)
    def f(impl, **kw):
        band = lambda q, k, v, mask, slots: kernels.band_attention(impl, q, k, v, mask, case.w, slots,
                                                                   interpret=True, **kw)
        return jax.jit(band)
    cases = [("splash", {}), ("pallas-gpu", {}), ("pallas-gpu", dict(dropout_rate=0.3, dropout_rng=rng))]
    one_device = [f(impl, **kw)(q, k, v, mask, slots) for impl, kw in cases]
    mesh = sharding.make_mesh(2, 2)
    args = jax.device_put((q, k, v, mask, slots), NamedSharding(mesh, P(("data", "fsdp"))))
    with jax.set_mesh(mesh):
        assert kernels.batch_shard_axes(4) == ("data", "fsdp") and kernels.batch_shard_axes(6) == ()
        for (impl, kw), want in zip(cases, one_device):
            assert "shard_map" in str(jax.make_jaxpr(f(impl, **kw))(*args)), impl
            assert scaled_error(f(impl, **kw)(*args), want) <= 1e-6, (impl, kw)
        band = lambda q: jnp.sum(kernels.band_attention("pallas-gpu", q, k, v, mask, case.w, slots, interpret=True))
        ref = lambda q: jnp.sum(A.lean_band_attention_heads(q, k, v, mask, case.w, slots))
        assert scaled_error(jax.jit(jax.grad(band))(args[0]), jax.grad(ref)(q)) <= 1e-5
    print("OK")
""")


@pytest.mark.slow
def test_kernels_run_on_each_batch_shard_of_a_mesh():
    """On a 2 x 2 ("data", "fsdp") mesh (4 CPU devices) the kernels run per batch shard (shard_map) with
    the numbers of one device, dropout masks included, and gradients flow."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


# ------------------------------------------------------------------------------------- whole models
def tiny_model_inputs():
    """B=2, L=37 (padded to 48): interior pads, 3 / 1 global tokens, MLM labels."""
    rng = np.random.default_rng(0)
    B, L = 2, 37
    ids = rng.integers(5, 100, (B, L))
    am = np.ones((B, L), np.int32)
    am[0, 30:] = 0
    am[1, 9:13] = 0
    gm = np.zeros((B, L), np.int32)
    gm[0, [0, 8, 20]] = 1
    gm[1, 0] = 1
    labels = np.where(rng.random((B, L)) < 0.3, rng.integers(5, 100, (B, L)), -100)
    return {
        k: jnp.asarray(x)
        for k, x in dict(input_ids=ids, attention_mask=am, global_attention_mask=gm, labels=labels).items()
    }


def tiny_config(
    impl: str = "blocked", dtype: str = "float32", attention_window=(8, 16), **extra
) -> lj.LongformerConfig:
    """A 2-layer model with per-layer windows 8 / 16; ``extra`` goes to config.json's extra fields."""
    return lj.LongformerConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        attention_window=attention_window,
        max_position_embeddings=64,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        num_labels=3,
        attention_implementation=impl,
        dtype=dtype,
        extra=extra,
    )


def head_inputs(task: str) -> dict:
    """Inputs of every head for ``tiny_model_inputs``' rows, with explicit global attention (so every
    head gets the same interior pads and uneven global tokens)."""
    x = tiny_model_inputs()
    base = {k: x[k] for k in ("input_ids", "attention_mask", "global_attention_mask")}
    if task in ("document-classification", "sequential-sentence-classification"):  # whole 16-token blocks
        pad = lambda a, value: jnp.pad(a, ((0, 0), (0, 48 - a.shape[1])), constant_values=value)
        base = {
            "input_ids": pad(base["input_ids"], 1),
            "attention_mask": pad(base["attention_mask"], 0),
            "global_attention_mask": pad(base["global_attention_mask"], 0),
        }
    if task == "multiple-choice":  # (B, 2 choices, L): the rows and their reverses
        return {k: jnp.stack([v, v[:, ::-1]], axis=1) for k, v in base.items()}
    return base


def outputs_and_grads(task: str, config: lj.LongformerConfig, params):
    """Every float output of ``task``'s model and the gradients of ``sum(outputs * c)`` for every parameter."""
    model = lj.build_model(config, task)
    inputs = head_inputs(task)

    def loss(p):
        out = model.apply({"params": p}, **inputs, num_global_slots=4)
        leaves = [x for x in jax.tree.leaves(out) if x is not None]
        total = 0.0
        for i, x in enumerate(leaves):
            c = jax.random.normal(jax.random.PRNGKey(i), x.shape, jnp.float32)
            total = total + jnp.sum(x.astype(jnp.float32) * c)
        return total, leaves

    (_, outputs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return outputs, grads


TASKS = tuple(lj.TASKS)


@pytest.mark.slow
@pytest.mark.parametrize("impl", KERNELS)
def test_every_head_with_a_kernel_equals_the_blocked_model(impl):
    """Every head (the block heads with 16-token blocks), per-layer windows 8 / 16, interior pads and
    uneven global tokens, the kernel chosen by the config setting ``attention_implementation`` (run in
    interpret mode): every output of every head; and for the masked LM the gradient of every parameter
    (the heads' own parameters see the kernel only through the encoder, whose gradients this checks)."""

    def outputs(task, config, params):
        out = lj.build_model(config, task).apply({"params": params}, **head_inputs(task), num_global_slots=4)
        return [x for x in jax.tree.leaves(out) if x is not None]

    for task in TASKS:
        reference_config = tiny_config(sentence_block_size=16)
        params = lj.init_params(lj.build_model(reference_config, task), 0)
        want = outputs(task, reference_config, params)
        with kernels.interpret_mode():
            got = outputs(task, tiny_config(impl, sentence_block_size=16), params)
        assert len(got) == len(want) > 0, task
        for g, w in zip(got, want):
            assert scaled_error(g, w) <= TOL["float32"], (task, impl)
    params = lj.init_params(lj.build_model(tiny_config(), "masked-lm"), 0)
    want, want_grads = outputs_and_grads("masked-lm", tiny_config(), params)
    with kernels.interpret_mode():
        got, grads = outputs_and_grads("masked-lm", tiny_config(impl), params)
    for g, w in zip(got, want):
        assert scaled_error(g, w) <= TOL["float32"], impl
    assert_trees_close(grads, want_grads, TOL["float32"], f"masked-lm gradients with {impl}")


@pytest.mark.slow
@pytest.mark.parametrize("impl", KERNELS)
def test_bfloat16_model_with_a_kernel_equals_the_blocked_model(impl):
    """The masked LM computing in bfloat16: logits and every parameter's gradient within 2e-2."""
    params = lj.init_params(lj.build_model(tiny_config(), "masked-lm"), 0)
    want, want_grads = outputs_and_grads("masked-lm", tiny_config(dtype="bfloat16"), params)
    with kernels.interpret_mode():
        got, grads = outputs_and_grads("masked-lm", tiny_config(impl, dtype="bfloat16"), params)
    for g, w in zip(got, want):
        assert scaled_error(g, w) <= TOL["bfloat16"], impl
    assert_trees_close(grads, want_grads, TOL["bfloat16"], f"bfloat16 with {impl}")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ("blocked", *KERNELS))
def test_scan_over_layers_with_every_implementation_equals_the_unrolled_blocked_model(impl):
    """``scan_layers=True`` with each implementation (kernels in interpret mode): the masked LM's outputs
    and every parameter's gradient equal the unrolled blocked model's. A kernel is made inside the
    scanned layer's trace and keeps nothing traced across traces."""
    unrolled = tiny_config(attention_window=8)
    params = lj.init_params(lj.build_model(unrolled, "masked-lm"), 0)
    want, want_grads = outputs_and_grads("masked-lm", unrolled, params)
    scanned, scanned_params = convert_params(params, unrolled, "masked-lm", scan_layers=True)
    scanned = scanned.replace(attention_implementation=impl)
    with kernels.interpret_mode():
        initialised = lj.init_params(lj.build_model(scanned, "masked-lm"), 0)  # traces the kernel inside nn.scan
        got, grads = outputs_and_grads("masked-lm", scanned, scanned_params)
    assert jax.tree.structure(initialised) == jax.tree.structure(scanned_params)
    for g, w in zip(got, want):
        assert scaled_error(g, w) <= TOL["float32"], impl
    _, grads = convert_params(grads, unrolled.replace(scan_layers=True), "masked-lm", scan_layers=False)
    assert_trees_close(grads, want_grads, TOL["float32"], f"scan with {impl}")


@pytest.mark.slow
def test_the_setting_is_validated_saved_with_flax_checkpoints_and_kept_out_of_config_json(tmp_path):
    with pytest.raises(ValueError, match=r"attention_implementation='flash' is not known.*'blocked'"):
        tiny_config("flash")
    config = tiny_config("pallas-gpu")
    assert "attention_implementation" not in config.to_hf_dict()
    model = lj.build_model(config, "masked-lm")
    params = lj.init_params(lj.build_model(tiny_config(), "masked-lm"), 0)
    from longformer_jax import pretrained

    pretrained.save_flax_checkpoint(tmp_path / "flax", config, params, "masked-lm")
    loaded, _ = lj.load_pretrained(str(tmp_path / "flax"), task="masked-lm")
    assert loaded.config.attention_implementation == "pallas-gpu"
    loaded, _ = lj.load_pretrained(str(tmp_path / "flax"), task="masked-lm", attention_implementation="blocked")
    assert loaded.config.attention_implementation == "blocked"
    # Without interpret mode, a GPU kernel on this CPU is refused, naming the setting.
    with pytest.raises(ValueError, match="attention_implementation='pallas-gpu' runs on GPU"):
        model.apply({"params": params}, **head_inputs("masked-lm"), num_global_slots=4)
