"""JAX started without the start-up lines of the ``aot`` extra's CUDA plugin on a host with no NVIDIA driver.

With the CUDA plugin installed (the ``aot`` extra: it compiles for GPU targets), every ``import jax``
on a host without NVIDIA's driver writes absl lines on stderr ("Could not find cuda drivers on your
machine, GPU will not be used"), whatever ``JAX_PLATFORMS`` says, before any setting can silence them.
This package imports JAX first thing through :func:`import_jax`, which leaves out exactly those lines
(every other line written meanwhile is written out), so programs and tests of this project start as
they did without the extra. Nothing here imports JAX at module level.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

# What the CUDA plugin's libraries print when they find no driver (absl logs, before absl is set up).
BENIGN_STARTUP_LINES = ("cudart_stub.cc", "All log messages before absl::InitializeLog() is called")


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


def import_jax():
    """``import jax`` (a no-op when it is imported already), without the CUDA plugin's driver lines."""
    if "jax" in sys.modules:
        return sys.modules["jax"]
    with stderr_without():
        import jax

    return jax


__all__ = ["BENIGN_STARTUP_LINES", "import_jax", "stderr_without"]
