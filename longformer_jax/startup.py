"""JAX started on a CPU-only host as it was before the ``aot`` extra: on the CPU, without the plugins' noise.

The ``aot`` extra installs libtpu and the CUDA plugin (they compile for TPU and GPU targets). On a host
without a GPU or TPU, JAX would then probe both at start-up: a traceback ("Unable to load CUDA") and
libtpu's complaints on stderr, before it falls back to the CPU; and every ``import jax`` writes the CUDA
plugin's absl lines ("Could not find cuda drivers on your machine"), whatever ``JAX_PLATFORMS`` says.
This package imports JAX first thing through :func:`import_jax`, which, where such a plugin is installed,
the host shows no accelerator device file and ``JAX_PLATFORMS`` is unset, sets ``JAX_PLATFORMS=cpu``
(inherited by subprocesses), and leaves out exactly the driver lines (every other line written meanwhile
is written out). Nothing here imports JAX at module level.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import sys
import tempfile

# What the CUDA plugin's libraries print when they find no driver (absl logs, before absl is set up).
BENIGN_STARTUP_LINES = ("cudart_stub.cc", "All log messages before absl::InitializeLog() is called")
# Device files of an accelerator on this host: NVIDIA and AMD GPUs, TPUs (v4: accel, v5e and later: vfio).
ACCELERATOR_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")
# What makes JAX probe for accelerators when it starts: libtpu, or PJRT plugins (the CUDA plugin).
ACCELERATOR_PACKAGES = ("libtpu", "jax_plugins")


def host_has_accelerator() -> bool:
    """Whether this host shows the device file of a GPU or TPU."""
    return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def choose_cpu_where_no_accelerator() -> None:
    """``JAX_PLATFORMS=cpu`` when it is unset, accelerator plugins are installed and the host has no GPU or TPU."""
    if os.environ.get("JAX_PLATFORMS") or host_has_accelerator():
        return
    if any(_installed(m) for m in ACCELERATOR_PACKAGES):
        os.environ["JAX_PLATFORMS"] = "cpu"


@contextlib.contextmanager
def stderr_without(benign: tuple[str, ...] = BENIGN_STARTUP_LINES):
    """Within the block, what is written on file descriptor 2 (by C++ libraries too) is held back; at its
    end every line except the `benign` ones is written out."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no file descriptor 2 (an embedded interpreter): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines()
            kept = [line for line in lines if not any(b in line for b in benign)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")


def register_plugins() -> None:
    """JAX's discovery of its PJRT plugins (the CUDA plugin's ``initialize``, which loads its libraries and
    writes the driver lines), run now, inside the filter, rather than when the backends start.

    Starts no backend, so ``jax.distributed.initialize()`` may still follow. Uses JAX's own discovery
    function (``jax._src.xla_bridge``); where a JAX release lacks it, nothing is done (the lines then come
    when the backends start)."""
    if not _installed("jax_plugins"):
        return
    from jax._src import xla_bridge

    discover = getattr(xla_bridge, "_discover_and_register_pjrt_plugins", None)
    started = getattr(xla_bridge, "backends_are_initialized", lambda: True)
    if discover is None or started():
        return
    with stderr_without():
        discover()


def import_jax():
    """``import jax`` and its plugins' registration, without the CUDA plugin's driver lines (where JAX was
    imported already, only the registration, if its backends have not started)."""
    if "jax" not in sys.modules:
        choose_cpu_where_no_accelerator()
        with stderr_without():
            import jax  # noqa: F401
    register_plugins()
    return sys.modules["jax"]


__all__ = [
    "ACCELERATOR_DEVICE_FILES",
    "BENIGN_STARTUP_LINES",
    "choose_cpu_where_no_accelerator",
    "host_has_accelerator",
    "import_jax",
    "register_plugins",
    "stderr_without",
]
