"""XLA flags that this project's training runs with.

XLA:CPU's default *concurrency optimized* scheduler orders a program so that independent
operations can run at the same time, which keeps many more buffers alive at once. A training step
is a long chain of large matrix products that gains nothing from it: without it, the 2-layer
base-size step at 16384 tokens needs 3.1 GiB of XLA temporaries instead of 4.2 GiB (window 512),
at about the same speed. XLA reads this setting from ``XLA_FLAGS`` only
(``jax.jit(compiler_options=...)`` does not reach the CPU scheduler), so it has to be in the
environment before JAX starts its CPU backend: ``python -m train.pretrain`` calls
:func:`use_training_xla_flags` first and ``python -m bench.run`` starts its JAX workers with
:func:`training_xla_flags`; in your own program call the former before the first JAX computation,
or export the flags yourself. Flags already in ``XLA_FLAGS`` win.
"""

from __future__ import annotations

import os

TRAINING_XLA_FLAGS: tuple[str, ...] = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def training_xla_flags(current: str = "") -> str:
    """``current`` (an ``XLA_FLAGS`` value) with the training flags it does not set yet appended."""
    flags = current.split()
    names = {f.split("=", 1)[0] for f in flags}
    flags += [f for f in TRAINING_XLA_FLAGS if f.split("=", 1)[0] not in names]
    return " ".join(flags)


def use_training_xla_flags() -> str:
    """Put the training flags into ``os.environ["XLA_FLAGS"]``; returns the new value.

    Takes effect only if no JAX computation has run yet in this process (XLA reads the variable
    once, when the backend starts)."""
    value = training_xla_flags(os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = value
    return value
