"""Accelerator targets for ahead-of-time compilation: one table of TPU slices and GPUs, and their devices.

A program compiled for a target runs on no accelerator: JAX builds the target's devices from a
topology description (``jax.experimental.topologies.get_topology_desc``), a mesh is laid over them,
and ``jax.jit(...).lower(abstract inputs).compile()`` runs the real compiler of that chip (libtpu's
for a TPU, the CUDA plugin's for a GPU) on the host's CPU. ``compiled.memory_analysis()`` then tells
what one device holds, which is what decides whether a run fits before a machine is rented.

```python
from longformer_jax import targets

t = targets.get_target("v5e-8")        # or "v5e:2x4", "h100", "h100x8"
t.num_devices, t.memory_bytes, t.peak_flops   # 8, 16 GiB, 197e12
mesh = targets.target_mesh(t, data=-1, fsdp=1, sequence=1)   # needs libtpu (or the CUDA plugin)
```

Names: TPU slices as Cloud TPU calls them (``v4-8``, ``v5e-8``, ``v5p-8``, ``v6e-8``; v4 and v5p count
TensorCores, two per chip, v5e and v6e count chips), any topology name of the form
``GENERATION:AxB[xC]`` (``v5e:4x4``, ``v5p:2x2x2``), and GPUs on one host (``h100``, ``h200``,
``a100-80g``, and ``h100x8`` for eight of them). The GPU descriptions are XLA's ``GpuTargetConfigProto``
of the card (``xla/backends/gpu/target_config/specs`` in openxla/xla, cut down to the fields the
compiler reads). Memory is the chip's HBM; peak FLOP/s the vendor's dense bfloat16 figure.

The compilers come from the ``aot`` extra (``pip install 'longformer-jax[aot]'``: libtpu and the CUDA
plugin of the installed jax, without NVIDIA's libraries). On a CPU-only host, run JAX with
``JAX_PLATFORMS=cpu`` (the programs set it for ``--target``): the plugins are then loaded only to
compile, never probed for a device.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

import jax
from jax.experimental import topologies

from longformer_jax import sharding, startup

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: how it is named to JAX, its memory and its dense bfloat16 peak."""

    generation: str  # TPU topology prefix ("v5e") or GPU key ("h100")
    platform: str  # "tpu" | "cuda"
    memory_bytes: int
    peak_flops: float
    device_kind: str  # what jax.Device.device_kind says on the chip
    cores_per_chip: int = 1  # TensorCores per chip (v4, v5p: 2, run as one device)


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "tpu", 32 * GiB, 275e12, "TPU v4", 2),
    "v5e": Chip("v5e", "tpu", 16 * GiB, 197e12, "TPU v5 lite"),
    "v5p": Chip("v5p", "tpu", 95 * GiB, 459e12, "TPU v5", 2),
    "v6e": Chip("v6e", "tpu", 32 * GiB, 918e12, "TPU v6 lite"),
    "h100": Chip("h100", "cuda", 84_942_979_072, 989.4e12, "NVIDIA H100 80GB HBM3"),
    "h200": Chip("h200", "cuda", 151_397_597_184, 989.4e12, "NVIDIA H200 141GB HBM3e"),
    "a100-80g": Chip("a100-80g", "cuda", 85_100_068_864, 312e12, "NVIDIA A100-SXM4-80GB"),
}

# TPU slices by their Cloud TPU name -> topology name (chips as AxB or AxBxC).
TPU_SLICES: dict[str, str] = {
    "v4-8": "v4:2x2x1",
    "v4-16": "v4:2x2x2",
    "v4-32": "v4:2x2x4",
    "v5e-1": "v5e:1x1",
    "v5e-4": "v5e:2x2",
    "v5e-8": "v5e:2x4",
    "v5e-16": "v5e:4x4",
    "v5e-32": "v5e:4x8",
    "v5e-64": "v5e:8x8",
    "v5p-8": "v5p:2x2x1",
    "v5p-16": "v5p:2x2x2",
    "v5p-32": "v5p:2x2x4",
    "v6e-1": "v6e:1x1",
    "v6e-4": "v6e:2x2",
    "v6e-8": "v6e:2x4",
    "v6e-16": "v6e:4x4",
    "v6e-32": "v6e:4x8",
    "v6e-64": "v6e:8x8",
}

# GpuTargetConfigProto (text) per card: XLA's specs, the fields the compiler reads.
_GPU_INFO = {
    # name, SMs, FPUs per SM, shared memory per SM / per block (opt-in), L2, memory bandwidth, clock, cc, features
    "h100": (
        "NVIDIA H100 80GB HBM3",
        132,
        128,
        233472,
        232448,
        52428800,
        3352320000000,
        1.98,
        9,
        "ACCELERATED_FEATURES",
    ),
    "h200": (
        "NVIDIA H200 141GB HBM3e",
        132,
        128,
        233472,
        232448,
        52428800,
        4800000000000,
        1.98,
        9,
        "ACCELERATED_FEATURES",
    ),
    "a100-80g": ("NVIDIA A100-SXM4-80GB", 108, 64, 167936, 166912, 41943040, 2039040000000, 1.41, 8, "NONE"),
}
MAX_GPUS_PER_HOST = 8
GPU_MEMORY_FRACTION = 0.75  # JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION: the GPU memory it preallocates
_GPU_NAME = re.compile(r"^(?P<chip>[a-z0-9-]+?)(?:x(?P<count>\d+))?$")
_TOPOLOGY_NAME = re.compile(r"^(?P<gen>v\d+[a-z]*):(?P<dims>\d+(?:x\d+){1,2})$")


def gpu_target_config(chip: str) -> str:
    """The ``GpuTargetConfigProto`` text of a GPU of ``CHIPS`` (what ``get_topology_desc`` takes)."""
    name, sms, fpus, smem_core, smem_optin, l2, bandwidth, clock, major, features = _GPU_INFO[chip]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem_core}
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {CHIPS[chip].memory_bytes}
  shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{
    major: {major}
    feature_extension: {features}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation"
  name: "{name}"
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 10
  patch: 0
}}
device_description_str: "{name}"
"""


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator to compile for: a TPU slice or some GPUs of one host."""

    name: str  # as the user gave it
    chip: Chip
    topology: str  # TPU topology name ("v5e:2x4") or GPU topology ("1x1x8": slices x hosts x GPUs)
    num_devices: int

    @property
    def platform(self) -> str:
        return self.chip.platform

    @property
    def memory_bytes(self) -> int:
        """HBM of one device."""
        return self.chip.memory_bytes

    @property
    def usable_memory_bytes(self) -> int:
        """What a run may use of one device's memory: a TPU's HBM; on a GPU the share JAX preallocates
        (``XLA_PYTHON_CLIENT_MEM_FRACTION``, 0.75 unless set: set it the same when sizing and running)."""
        if self.platform == "tpu":
            return self.memory_bytes
        return int(self.memory_bytes * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION)))

    @property
    def peak_flops(self) -> float:
        """Dense bfloat16 FLOP/s of one device."""
        return self.chip.peak_flops

    def describe(self) -> str:
        return (
            f"{self.name} ({self.topology}: {self.num_devices} x {self.chip.device_kind}, "
            f"{self.memory_bytes / GiB:.1f} GiB, {self.peak_flops / 1e12:.0f} TFLOP/s bf16 each)"
        )


def known_targets() -> list[str]:
    """Every name `get_target` knows by heart (topology names of the TPU generations come on top)."""
    gpus = [g for g, c in CHIPS.items() if c.platform == "cuda"]
    return [*TPU_SLICES, *gpus, *(f"{g}x{MAX_GPUS_PER_HOST}" for g in gpus)]


def _unknown(name: str) -> ValueError:
    tpus = ", ".join(g for g, c in CHIPS.items() if c.platform == "tpu")
    return ValueError(
        f"target {name!r} is not known; choose one of {', '.join(known_targets())}, a TPU topology "
        f"GENERATION:AxB[xC] of {tpus} (e.g. v5e:4x4), or a GPU count such as h100x4 (--target)."
    )


def get_target(name: str) -> Target:
    """The target a name stands for (see the module docstring); a ValueError listing the known ones."""
    key = name.strip().lower()
    topology = TPU_SLICES.get(key, key)
    m = _TOPOLOGY_NAME.match(topology)
    if m:
        chip = CHIPS.get(m["gen"])
        if chip is None or chip.platform != "tpu":
            raise _unknown(name)
        chips = math.prod(int(d) for d in m["dims"].split("x"))
        return Target(name, chip, topology, chips)
    m = _GPU_NAME.match(key)
    chip = CHIPS.get(m["chip"]) if m else None
    if chip is None or chip.platform != "cuda":
        raise _unknown(name)
    count = int(m["count"] or 1)
    if not 1 <= count <= MAX_GPUS_PER_HOST:
        raise ValueError(
            f"target {name!r}: {count} GPUs; one host holds 1 to {MAX_GPUS_PER_HOST} (e.g. {m['chip']}x8)."
        )
    return Target(name, chip, f"1x1x{count}", count)


def _quiet_libtpu_environment(target: Target) -> None:
    """libtpu, loaded on a host without a TPU to compile, looks for the TPU's type and hosts and complains
    on stderr unless told them: the target's, on this one host."""
    cores = target.num_devices * target.chip.cores_per_chip
    prefix = {"v5e": "v5litepod"}.get(target.chip.generation, target.chip.generation)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{prefix}-{cores}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def target_devices(target: Target) -> list:
    """The target's devices (``jax.Device``-like objects that compile but do not run).

    A RuntimeError naming the package to install when the compiler of the target is missing."""
    try:
        if target.platform == "tpu":
            _quiet_libtpu_environment(target)
            kw = {"chip_config_name": "megacore"} if target.chip.cores_per_chip > 1 else {}
            if target.num_devices == 1:
                kw["chips_per_host_bounds"] = (1, 1, 1)
            topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu", **kw)
        else:
            os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
            topo = topologies.get_topology_desc(
                platform="cuda",
                topology_name="",
                target_config=gpu_target_config(target.chip.generation),
                topology=target.topology,
            )
    except (RuntimeError, NotImplementedError) as e:
        what = "libtpu" if target.platform == "tpu" else "the CUDA plugin (jax-cuda12-plugin, jax-cuda12-pjrt)"
        raise RuntimeError(
            f"cannot describe {target.describe()} ({e}); install {what} of jax {jax.__version__}: "
            "pip install 'longformer-jax[aot]'"
        ) from e
    devices = list(topo.devices)
    if len(devices) != target.num_devices:
        raise RuntimeError(f"{target.describe()}: the compiler describes {len(devices)} devices, expected so many")
    return devices


def compiler_available(platform: str) -> bool:
    """Whether the compiler of a platform ("tpu" or "cuda") is installed (libtpu / the CUDA plugin)."""
    module = "libtpu" if platform == "tpu" else "jax_plugins.xla_cuda12"
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def start_jax() -> None:
    """Chooses JAX's platforms for this host before its backends start: the host's CPU where it has no GPU
    or TPU (and ``JAX_PLATFORMS`` is not set), so that the compilers of the ``aot`` extra are never probed
    for a device they cannot find; the plugins are registered with their start-up lines about a missing
    driver left out (``longformer_jax.startup``).

    Starts no backend (``jax.distributed.initialize()`` may follow). Call it before the first JAX
    computation (after setting ``XLA_FLAGS``)."""
    startup.choose_cpu_where_no_accelerator()
    if os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_platforms", "cpu")
    startup.register_plugins()


def target_mesh(target: Target, data: int = -1, fsdp: int = 1, sequence: int = 1) -> jax.sharding.Mesh:
    """A ("data", "fsdp", "sequence") mesh (`longformer_jax.sharding.make_mesh`) over the target's devices."""
    return sharding.make_mesh(data, fsdp, sequence, devices=target_devices(target))


__all__ = [
    "CHIPS",
    "MAX_GPUS_PER_HOST",
    "TPU_SLICES",
    "Chip",
    "Target",
    "compiler_available",
    "get_target",
    "start_jax",
    "gpu_target_config",
    "known_targets",
    "target_devices",
    "target_mesh",
]
