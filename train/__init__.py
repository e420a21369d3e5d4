"""The training programs. Importing the package starts JAX through ``longformer_jax`` (``longformer_jax.startup``)."""

import longformer_jax  # noqa: F401
