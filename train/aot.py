"""A run's steps compiled for an accelerator target with no accelerator, data or weights: will it fit, how fast at best.

``python -m train.pretrain --preset seed-recipe --target v5e-8 --compile-only [--report FILE] [--fit]``
(and the same flags on ``python -m train.finetune``) builds the run exactly as the program would (its
objective, optimizer, partition rules, ``--dtype``, ``--remat``, ``--scan-layers``, ``--mesh`` with a
``sequence`` axis) with the trainer's own `MeshDriver` on the target's devices
(`longformer_jax.targets`), lowers its train step (and evaluation step) with abstract inputs
(``jax.ShapeDtypeStruct`` with the driver's shardings) and compiles them with the target's compiler.
The model comes from ``--model`` settings or the ``config.json`` of ``--init`` (never its weights);
the batch's shapes from the settings.

The report (printed; JSON with ``--report``), per device: the bytes of the arguments, outputs and
temporaries of the compiled step (``compiled.memory_analysis()``) against the chip's memory, whether it
fits and with what headroom; the model's FLOPs per step (`longformer_jax.flops`, the count the
benchmarks use) and XLA's where it reports them (TPU; a scanned body counts once there); a lower bound
of the step time at the chip's peak bfloat16 FLOP/s and of the whole run; the attention implementation
each layer runs and the number of Mosaic (TPU) / Triton (GPU) kernel calls in the compiled program;
the compile time. ``--fit`` compiles the micro-batches per device that keep the global batch (through
accumulation), with and without rematerialisation, for every attention implementation that compiles
for the target, and recommends the fastest that fits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import longformer_jax as lj
from longformer_jax import attention, kernels, sharding, targets
from longformer_jax import flops as flops_lib
from longformer_jax.config import LongformerConfig
from train import config as config_lib
from train import trainer
from train.config import SEED_MODEL
from train.masking import max_masked
from train.objectives import Objective, mlm_objective

GiB = targets.GiB
# The architecture of checkpoints known by name, for a host that cannot read their config.json (SPEC.md).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "kiddothe2b/longformer-base-4096": dict(
        **SEED_MODEL,
        vocab_size=50265,
        max_position_embeddings=4099,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        sep_token_id=2,
    ),
}
# Kernel calls in a compiled program's text, by what runs them.
_KERNEL_PATTERNS = {
    "mosaic": re.compile(r'custom_call_target="tpu_custom_call"'),
    "triton": re.compile(r'custom_call_target="(?:__gpu\$xla\.gpu\.triton|triton_kernel_call)"'),
    "mosaic_gpu": re.compile(r'custom_call_target="mosaic_gpu[^"]*"'),
}
# What a rematerialised step costs over a plain one: the forward pass again in the backward one.
REMAT_FLOPS_FACTOR = 4.0 / 3.0
# The share of a chip's usable memory that --fit leaves free for what the compiler does not see (the
# runtime's own buffers, fragmentation, a profiler): a recommendation at 99 % of HBM fails at run time.
DEFAULT_FIT_HEADROOM = 0.1


# ----------------------------------------------------------------------------------------------
# The command line: --target NAME --compile-only [--report FILE] [--fit] [--num-labels N]


@dataclasses.dataclass(frozen=True)
class Request:
    target: str
    compile_only: bool = False
    report: str | None = None
    fit: bool = False
    num_labels: int | None = None  # fine-tuning: the head's labels (no data is read)
    fit_headroom: float = DEFAULT_FIT_HEADROOM


def split_args(argv: list[str] | None) -> tuple[Request | None, list[str]]:
    """(the compile-only request or None, the program's own arguments)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    config_lib.add_target_flags(p, defaults=None)
    ns, rest = p.parse_known_args(argv)
    if ns.target is None:
        given = [
            f for f in ("--compile-only", "--report", "--fit", "--num-labels") if getattr(ns, f[2:].replace("-", "_"))
        ]
        if given:
            raise ValueError(f"{' '.join(given)} needs --target NAME (one of {', '.join(targets.known_targets())}).")
        return None, rest
    if not ns.compile_only:
        raise ValueError(f"--target {ns.target} compiles for another machine: add --compile-only (nothing is trained).")
    if not 0.0 <= ns.fit_headroom < 1.0:
        raise ValueError(f"--fit-headroom {ns.fit_headroom} must be a fraction in [0, 1), e.g. 0.1 (10 % kept free).")
    return Request(ns.target, True, ns.report, ns.fit, ns.num_labels, ns.fit_headroom), rest


def use_cpu_host() -> None:
    """Before JAX starts: run on the host's CPU, so that the compilers of the aot extra are loaded only
    to compile for a target (never probed for a device of their own)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


# ----------------------------------------------------------------------------------------------
# What to compile


@dataclasses.dataclass
class Plan:
    """A run's model, objective and batch shapes: everything the steps need but the devices."""

    cfg: Any  # TrainConfig (or FinetuneConfig)
    model: Any
    objective: Objective
    row_shapes: dict[str, tuple[tuple[int, ...], Any]]  # one row of a batch: name -> (shape, dtype)
    eval_batch_size: int
    global_slots: int
    head_tokens_per_row: float  # where the masked-LM head runs (for the FLOP count)
    run_steps: int | None
    evaluates_by_predict: bool = False  # fine-tuning: evaluation runs `make_predict_step` (the Driver's predict)

    @property
    def config(self) -> LongformerConfig:
        return self.model.config

    def model_flops_per_step(self) -> float:
        return flops_lib.model_flops_per_step(
            self.config,
            rows=self.cfg.global_batch_size,
            length=self.cfg.seq_len,
            globals_=self.global_slots,
            head_tokens_per_row=self.head_tokens_per_row,
        )


def read_model_config(init: str) -> dict[str, Any]:
    """The config.json of ``--init`` (a directory, a run directory, or a hub id) as a dict, never its weights."""
    path = Path(init).expanduser()
    for candidate in (path / "config.json", path / "model" / "config.json", path / "best" / "config.json"):
        if path.is_dir() and candidate.is_file():
            d = json.loads(candidate.read_text())
            if "hidden_size" in d:
                return d
    if init in KNOWN_CONFIGS:
        return {**KNOWN_CONFIGS[init]}
    try:
        import huggingface_hub

        return json.loads(Path(huggingface_hub.hf_hub_download(init, "config.json")).read_text())
    except Exception as e:  # no network, no such repository: the user can describe the model instead
        raise ValueError(
            f"--init {init}: no config.json could be read ({type(e).__name__}); give a local directory "
            "with config.json, or describe the model with --model KEY=VALUE and --init none."
        ) from e


def model_config(cfg) -> LongformerConfig:
    """The run's model: ``config.json`` of ``--init`` (or a fresh one of ``--model``), then the run's options."""
    options = cfg.model_options()
    if cfg.init:
        base = read_model_config(cfg.init)
    else:
        vocab = cfg.model.get("vocab_size", cfg.tokenizer_vocab_size)
        base = dict(
            vocab_size=vocab,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            sep_token_id=2,
            max_position_embeddings=cfg.seq_len + 2,
        )
    config = LongformerConfig.from_dict(base, **options)  # --model over config.json; JAX-side options too
    if cfg.seq_len > config.max_sequence_length:
        raise ValueError(
            f"seq_len={cfg.seq_len} is longer than the model allows ({config.max_sequence_length} tokens); "
            "lower --seq-len or raise --model max_position_embeddings=N."
        )
    if cfg.seq_len % config.max_window:
        raise ValueError(f"seq_len={cfg.seq_len} is not a multiple of the attention window {config.max_window}.")
    return config


def pretrain_plan(cfg) -> Plan:
    """The pretraining run of `cfg` (`train.pretrain`): masked-LM over rows of ``seq_len`` tokens."""
    config = model_config(cfg)
    model = lj.LongformerForMaskedLM(config)
    L, K = cfg.seq_len, max_masked(cfg.seq_len, cfg.mlm_probability)
    rows = {
        "input_ids": ((L,), np.int32),
        "attention_mask": ((L,), np.int32),
        "global_attention_mask": ((L,), np.int32),
        "labels": ((L,), np.int32),
        "masked_positions": ((K,), np.int32),
        "masked_labels": ((K,), np.int32),
    }
    slots = cfg.num_global_slots
    return Plan(cfg, model, mlm_objective(slots), rows, cfg.batch_size, slots, cfg.mlm_probability * L, cfg.max_steps)


def finetune_row_shapes(cfg, num_labels: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """One laid-out fine-tuning example (`train.finetune_data`) of the task: its arrays' shapes and dtypes."""
    L = cfg.seq_len
    rows: dict[str, tuple[tuple[int, ...], Any]] = {
        k: ((L,), np.int32) for k in ("input_ids", "attention_mask", "global_attention_mask")
    }
    label = ((num_labels,), np.float32) if cfg.multi_label else ((), np.int32)
    if cfg.task == "document-classification":
        rows["labels"] = label
    elif cfg.task == "sequential-sentence-classification":
        rows["labels"] = ((L // cfg.block_size, *label[0]), label[1])
    elif cfg.task == "token-classification":
        rows["labels"] = ((L,), np.int32)
    elif cfg.task == "question-answering":
        rows.update(start_positions=((), np.int32), end_positions=((), np.int32))
    else:
        raise ValueError(
            f"--compile-only does not lay out {cfg.task!r} examples yet; size a document-classification run "
            "of the same model and length instead."
        )
    return rows


# ----------------------------------------------------------------------------------------------
# Compiling


def _bytes(stats) -> dict[str, int]:
    get = lambda name: int(getattr(stats, name, 0) or 0)  # noqa: E731
    out = {
        "arguments": get("argument_size_in_bytes"),
        "outputs": get("output_size_in_bytes"),
        "temp": get("temp_size_in_bytes"),
        "alias": get("alias_size_in_bytes"),
        "code": get("generated_code_size_in_bytes"),
    }
    out["total"] = out["arguments"] + out["outputs"] - out["alias"] + out["temp"]
    return out


def kernel_calls(hlo_text: str) -> dict[str, int]:
    """Mosaic (TPU), Triton and Mosaic GPU kernel calls in a compiled program's text, and their total."""
    counts = {k: len(p.findall(hlo_text)) for k, p in _KERNEL_PATTERNS.items()}
    return {**counts, "total": sum(counts.values())}


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend has a cost model (the CUDA plugin's gives none)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def layer_implementations(config: LongformerConfig, platform: str, dropout: bool) -> list[str]:
    """The attention implementation each layer runs on `platform` (``auto`` resolved per layer)."""
    backend = "gpu" if platform == "cuda" else platform
    attention_dropout = dropout and config.attention_probs_dropout_prob > 0
    return [
        kernels.resolve_implementation(
            config.attention_implementation,
            backend,
            dropout=attention_dropout,
            pattern=not attention.is_plain_band(d, config.causal_attention),
        )
        for d in config.attention_dilations
    ]


@dataclasses.dataclass
class Compiled:
    """One compiled step: its bytes per device, XLA's FLOPs, kernel calls and compile time."""

    bytes: dict[str, int]
    xla_flops: float | None
    kernels: dict[str, int]
    seconds: float
    refused: str | None = None  # the compiler's words when it refused the step for want of memory


# The TPU compiler refuses a program that cannot fit, with what its temporaries need.
_TPU_OOM = re.compile(
    r"RESOURCE_EXHAUSTED.*?HLO temporaries \(([\d.]+)([KMGT]?)\).*?available HBM \(([\d.]+)([KMGT]?)\)", re.S
)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def per_device_bytes(tree) -> int:
    """Bytes one device holds of abstract arrays (``jax.ShapeDtypeStruct`` with shardings)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def _refused_for_memory(error: Exception, args, seconds: float) -> Compiled | None:
    """The bytes of a step the compiler refused for want of memory (TPU): its arguments and the
    temporaries it says it needs; None for any other error."""
    m = _TPU_OOM.search(str(error))
    if not m:
        return None
    temp = int(float(m[1]) * _UNITS[m[2]])
    arguments = per_device_bytes(args)
    b = {"arguments": arguments, "outputs": 0, "temp": temp, "alias": 0, "code": 0, "total": arguments + temp}
    return Compiled(b, None, {k: 0 for k in (*_KERNEL_PATTERNS, "total")}, seconds, refused=" ".join(m[0].split()))


def _compile(jitted, mesh, *args) -> Compiled:
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = jitted.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        refused = _refused_for_memory(e, args, time.perf_counter() - t0)
        if refused is None:
            raise
        return refused
    seconds = time.perf_counter() - t0
    return Compiled(_bytes(compiled.memory_analysis()), _xla_flops(compiled), kernel_calls(compiled.as_text()), seconds)


def abstract_batch(driver: trainer.MeshDriver, plan: Plan, leading: tuple[int, ...]) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch of the driver's step: ``leading`` (A, B) or (B,) then each row's shape, laid out by the driver."""
    out = {}
    for k, (shape, dtype) in plan.row_shapes.items():
        full = (*leading, *shape)
        out[k] = jax.ShapeDtypeStruct(full, dtype, sharding=driver.batch_sharding(full, len(leading) - 1))
    return out


def compile_steps(
    plan: Plan, target: targets.Target, devices, *, eval_step: bool = True
) -> tuple[Compiled, Compiled | None]:
    """(train step, eval step or None) of the plan compiled for the target's devices, by the trainer's driver."""
    cfg = plan.cfg
    tx, schedule = trainer.make_optimizer(cfg)
    driver = trainer.make_driver(cfg, plan.model, tx, plan.objective, schedule, devices=devices)
    if not isinstance(driver, trainer.MeshDriver):
        raise ValueError("--compile-only compiles the mesh driver's steps: use --driver mesh.")
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    # The parameters' shapes, traced as the run's init is: on one device (here one of the target's, so that the
    # model's kernels are those of its platform), with no sequence axis to split the init's short dummy input.
    with jax.set_mesh(sharding.make_mesh(devices=devices[:1])):
        state = driver.abstract_state(lambda k: lj.init_params(plan.model, k), key)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=driver.replicated)
    batch = abstract_batch(driver, plan, (cfg.grad_accum_steps, cfg.batch_size))
    train = _compile(driver.jit_train(jax.tree.map(lambda x: x.sharding, batch)), driver.mesh, state, batch, rng)
    ev = None
    if eval_step:  # pretraining evaluates with the eval step, fine-tuning with the predict step (outputs too)
        eval_batch = abstract_batch(driver, plan, (plan.eval_batch_size,))
        shardings = jax.tree.map(lambda x: x.sharding, eval_batch)
        jitted = driver.jit_predict() if plan.evaluates_by_predict else driver.jit_eval(shardings)
        ev = _compile(jitted, driver.mesh, state.params, eval_batch)
    return train, ev


# ----------------------------------------------------------------------------------------------
# The report


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / (1 << 20):.1f} MiB"


def settings_of(cfg) -> dict[str, Any]:
    return {
        "batch_size": cfg.batch_size,
        "grad_accum_steps": cfg.grad_accum_steps,
        "global_batch_size": cfg.global_batch_size,
        "seq_len": cfg.seq_len,
        "dtype": cfg.dtype,
        "remat": cfg.remat,
        "scan_layers": cfg.scan_layers,
        "mesh": {"data": cfg.mesh_data, "fsdp": cfg.mesh_fsdp, "sequence": cfg.mesh_sequence},
        "attention_implementation": cfg.model.get("attention_implementation", "blocked"),
    }


def build_report(plan: Plan, target: targets.Target, train: Compiled, ev: Compiled | None) -> dict[str, Any]:
    """The JSON report of one compiled run (see the module docstring)."""
    cfg, memory = plan.cfg, target.usable_memory_bytes
    peak_bytes = max(train.bytes["total"], ev.bytes["total"] if ev else 0)
    model_flops = plan.model_flops_per_step()
    factor = REMAT_FLOPS_FACTOR if cfg.remat else 1.0
    bound = model_flops * factor / (target.num_devices * target.peak_flops)
    impls = layer_implementations(plan.config, target.platform, cfg.dropout)
    return {
        "target": target.name,
        "target_description": target.describe(),
        "platform": target.platform,
        "topology": target.topology,
        "num_devices": target.num_devices,
        "device_kind": target.chip.device_kind,
        "settings": settings_of(cfg),
        "per_device_bytes": train.bytes,
        "eval_per_device_bytes": ev.bytes if ev else None,
        "peak_per_device_bytes": peak_bytes,
        "device_memory_bytes": target.memory_bytes,
        "usable_memory_bytes": memory,
        "fits": peak_bytes <= memory,
        "headroom_bytes": memory - peak_bytes,
        "headroom_fraction": (memory - peak_bytes) / memory,
        "model_flops_per_step": model_flops,
        "xla_flops_per_device": train.xla_flops,
        "peak_flops_per_device": target.peak_flops,
        "step_time_lower_bound_s": bound,
        "run_steps": plan.run_steps,
        "run_time_lower_bound_days": bound * plan.run_steps / 86400 if plan.run_steps else None,
        "tokens_per_step": cfg.global_batch_size * cfg.seq_len,
        "attention_implementation": impls[0] if len(set(impls)) == 1 else "mixed",
        "attention_implementation_per_layer": impls,
        "kernel_calls": train.kernels["total"],
        "kernel_calls_by_kind": train.kernels,
        "eval_kernel_calls": ev.kernels["total"] if ev else None,
        "compile_seconds": train.seconds + (ev.seconds if ev else 0.0),
        "compiler_refused": train.refused or (ev.refused if ev else None),
    }


def format_report(r: dict[str, Any]) -> str:
    """The report as the program prints it."""
    b, s = r["per_device_bytes"], r["settings"]
    lines = [
        f"target:        {r['target_description']}",
        f"settings:      batch {s['batch_size']} x {s['grad_accum_steps']} accumulation = {s['global_batch_size']}, "
        f"{s['seq_len']} tokens, {s['dtype']}, remat {s['remat']}, scan {s['scan_layers']}, mesh {s['mesh']}",
        f"train step:    arguments {_gib(b['arguments'])}, outputs {_gib(b['outputs'])} (aliased {_gib(b['alias'])}), "
        f"temporaries {_gib(b['temp'])}: {_gib(b['total'])} per device",
    ]
    if r["eval_per_device_bytes"]:
        lines.append(f"eval step:     {_gib(r['eval_per_device_bytes']['total'])} per device")
    verdict = "fits" if r["fits"] else "does NOT fit"
    lines += [
        f"memory:        {verdict}: {_gib(r['peak_per_device_bytes'])} of {_gib(r['usable_memory_bytes'])} usable "
        f"(of {_gib(r['device_memory_bytes'])}) "
        f"({r['headroom_fraction']:.0%} headroom)",
        f"model FLOPs:   {r['model_flops_per_step']:.4g} per step"
        + (
            f" (XLA: {r['xla_flops_per_device']:.4g} per device, a scanned body counted once)"
            if r["xla_flops_per_device"]
            else ""
        ),
        f"step time:     >= {r['step_time_lower_bound_s'] * 1e3:.1f} ms at the peak bf16 FLOP/s"
        + (f"; {r['run_steps']} steps >= {r['run_time_lower_bound_days']:.2f} days" if r["run_steps"] else ""),
        f"attention:     {r['attention_implementation']} on every layer"
        if r["attention_implementation"] != "mixed"
        else f"attention:     {r['attention_implementation_per_layer']}",
        f"kernel calls:  {r['kernel_calls']} in the train step {r['kernel_calls_by_kind']}",
        f"compile time:  {r['compile_seconds']:.1f} s",
    ]
    if r.get("compiler_refused"):
        lines.append(f"compiler:      refused the step: {r['compiler_refused']}")
    if "recommended" in r:
        lines.append(f"--fit:         {r['recommended']['flags']}")
    return "\n".join(lines)


def overflow_error(r: dict[str, Any], cfg) -> str:
    """The one `error:` line of a run that does not fit: by how much, and settings estimated to fit."""
    b = r["per_device_bytes"]
    over = r["peak_per_device_bytes"] - r["usable_memory_bytes"]
    fixed = b["arguments"] + b["outputs"] - b["alias"]
    rows = cfg.batch_size
    hints = []
    if fixed < r["usable_memory_bytes"] and b["temp"]:
        scale = (r["usable_memory_bytes"] - fixed) / b["temp"]
        for smaller in sorted((d for d in _divisors(rows) if d < rows), reverse=True):
            if smaller / rows <= scale * 0.9:
                hints.append(f"--batch-size {smaller} --grad-accum-steps {cfg.grad_accum_steps * rows // smaller}")
                break
    if not cfg.remat:
        hints.append("--remat")
    hints.append("more devices or --mesh fsdp=N")
    return (
        f"{r['target']}: the step needs {_gib(r['peak_per_device_bytes'])} per device but the chip has "
        f"{_gib(r['usable_memory_bytes'])} to use (over by {_gib(over)}; temporaries {_gib(b['temp'])}, arguments "
        f"{_gib(b['arguments'])}); settings estimated to fit: {' or '.join(hints)} (--fit compiles and checks them)"
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ----------------------------------------------------------------------------------------------
# --fit


def target_kernels(target: targets.Target) -> list[str]:
    """The kernel made for the target's platform (``splash`` on TPU, ``pallas-gpu`` on GPU)."""
    kernel = kernels.AUTO.get("gpu" if target.platform == "cuda" else target.platform)
    return [kernel] if kernel else []


def _variant(plan: Plan, *, batch_size: int, remat: bool, implementation: str) -> Plan:
    cfg = plan.cfg.replace(
        batch_size=batch_size,
        grad_accum_steps=plan.cfg.global_batch_size // batch_size,
        remat=remat,
        model={**plan.cfg.model, "attention_implementation": implementation},
    )
    config = plan.config.replace(remat=remat, attention_implementation=implementation)
    return dataclasses.replace(plan, cfg=cfg, model=type(plan.model)(config), eval_batch_size=plan.eval_batch_size)


def fit_flags(cfg) -> str:
    impl = cfg.model.get("attention_implementation", "blocked")
    return (
        f"--batch-size {cfg.batch_size} --grad-accum-steps {cfg.grad_accum_steps} "
        f"{'--remat' if cfg.remat else '--no-remat'} --model attention_implementation={impl}"
    )


def _batch_sizes(plan: Plan, batch_devices: int) -> list[int]:
    """Global micro-batches that split over the devices and divide the global batch, largest first."""
    g = plan.cfg.global_batch_size
    return sorted((b for b in _divisors(g) if b % batch_devices == 0), reverse=True)


def _first_fit(
    plan: Plan,
    target,
    devices,
    sizes: list[int],
    remat: bool,
    impl: str,
    known: dict[str, Any] | None,
    limit: int,
    log,
) -> list[dict[str, Any]]:
    """Compiles the micro-batches of `sizes` (largest first) until one fits under `limit` bytes per device;
    every try as a row. `known`: the run's own compile (of the same implementation and remat), not compiled
    again."""
    tried = []
    for b in sizes:
        variant = _variant(plan, batch_size=b, remat=remat, implementation=impl)
        try:
            if known and known["batch_size"] == b:
                train = known["compiled"]
            else:
                train, _ = compile_steps(variant, target, devices, eval_step=False)
        except ValueError as e:  # the kernel refuses these settings: no smaller batch changes that
            tried.append({"implementation": impl, "remat": remat, "batch_size": b, "error": " ".join(str(e).split())})
            log(f"  {impl}, remat {remat}: refused ({tried[-1]['error'][:120]})")
            return tried
        r = build_report(variant, target, train, None)
        row = {
            "implementation": impl,
            "remat": remat,
            "batch_size": b,
            "grad_accum_steps": variant.cfg.grad_accum_steps,
            "per_device_batch": b // (target.num_devices // variant.cfg.mesh_sequence),
            "total_bytes": r["per_device_bytes"]["total"],
            "fits": r["per_device_bytes"]["total"] <= limit,
            "step_time_lower_bound_s": r["step_time_lower_bound_s"],
            "kernel_calls": r["kernel_calls"],
            "compile_seconds": r["compile_seconds"],
            "flags": fit_flags(variant.cfg),
        }
        tried.append(row)
        log(f"  {row['flags']}: {_gib(row['total_bytes'])} per device, {'fits' if row['fits'] else 'too big'}")
        if row["fits"]:
            break
    return tried


def _start(sizes: list[int], known: dict[str, Any] | None, memory: int) -> list[int]:
    """The sizes worth compiling: from the largest one that the known compile's bytes, scaled by the
    micro-batch, put under the memory (temporaries grow with it, arguments do not)."""
    if not known:
        return sizes
    b, bytes_ = known["batch_size"], known["bytes"]
    fixed = bytes_["arguments"] + bytes_["outputs"] - bytes_["alias"]
    fitting = [s for s in sizes if fixed + bytes_["temp"] * s / b <= memory]
    return sizes[sizes.index(fitting[0]) :] if fitting else sizes[-1:]


def fit(
    plan: Plan,
    target: targets.Target,
    devices,
    known: dict[str, Any] | None,
    headroom: float = DEFAULT_FIT_HEADROOM,
    log=print,
) -> dict[str, Any]:
    """Compiles micro-batch x remat x implementation variants; the fastest that fits by the step-time bound
    (rematerialisation costs a forward pass again; then the larger micro-batch; then a kernel). A variant fits
    when it leaves `headroom` (a fraction) of the usable memory free."""
    limit = int(target.usable_memory_bytes * (1.0 - headroom))
    batch_devices = target.num_devices // plan.cfg.mesh_sequence
    sizes = _batch_sizes(plan, batch_devices)
    tried = []
    for impl in ["blocked", *target_kernels(target)]:
        for remat in (False, True):
            same_impl = known if known and known["implementation"] == impl else None
            same = same_impl if same_impl and same_impl["remat"] == remat else None
            # The run's compile bounds what fits: exactly with the same settings, from below without remat
            # when it had remat (a rematerialised step holds less).
            bound = same_impl if same_impl and (same_impl["remat"] == remat or same_impl["remat"]) else None
            start = _start(sizes, bound, limit)
            rows = _first_fit(plan, target, devices, start, remat, impl, same, limit, log)
            tried += rows
            if any(r.get("fits") for r in rows) or any("error" in r for r in rows):
                break
    fitting = [r for r in tried if r.get("fits")]
    kernel_set = set(target_kernels(target))
    fitting.sort(key=lambda r: (r["step_time_lower_bound_s"], -r["batch_size"], r["implementation"] not in kernel_set))
    return {"recommended": fitting[0] if fitting else None, "tried": tried, "limit_bytes": limit}


# ----------------------------------------------------------------------------------------------
# The programs' entry


def compile_run(
    plan: Plan,
    target_name: str,
    *,
    fit_search: bool = False,
    fit_headroom: float = DEFAULT_FIT_HEADROOM,
    log=print,
) -> dict[str, Any]:
    """The report of a plan compiled for a target (with ``recommended`` and ``fit`` from the search)."""
    target = targets.get_target(target_name)
    devices = targets.target_devices(target)
    train, ev = compile_steps(plan, target, devices)
    report = build_report(plan, target, train, ev)
    if fit_search:
        known = {
            "batch_size": plan.cfg.batch_size,
            "bytes": train.bytes,
            "compiled": train,
            "remat": plan.cfg.remat,
            "implementation": plan.config.attention_implementation,
        }
        log(
            f"--fit: global batch {plan.cfg.global_batch_size} kept, {fit_headroom:.0%} of the memory left free; "
            f"compiling the variants for {target.name}"
        )
        found = fit(plan, target, devices, known, fit_headroom, log)
        report["fit"] = found["tried"]
        report["fit_limit_bytes"] = found["limit_bytes"]
        report["recommended"] = found["recommended"]
    return report


def main(request: Request, plan: Plan, log=print) -> int:
    """Compiles, prints the report (writes it with ``--report``); 0 when it fits, else 1 and an `error:` line."""
    report = compile_run(plan, request.target, fit_search=request.fit, fit_headroom=request.fit_headroom, log=log)
    print(format_report(report))
    if request.report:
        Path(request.report).parent.mkdir(parents=True, exist_ok=True)
        Path(request.report).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report:        {request.report}")
    if report["fits"]:
        return 0
    found = report.get("recommended")
    if found:
        message = (
            f"{report['target']}: the step needs {_gib(report['peak_per_device_bytes'])} per device, the chip has "
            f"{_gib(report['usable_memory_bytes'])} to use; these settings fit (compiled): {found['flags']}"
        )
    elif request.fit:
        message = (
            f"{report['target']}: nothing tried fits (micro-batch, remat, attention); add devices or --mesh fsdp=N"
        )
    else:
        message = overflow_error(report, plan.cfg)
    print(f"error: {message}", file=sys.stderr)
    return 1
