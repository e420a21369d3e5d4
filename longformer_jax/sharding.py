"""Device mesh and parameter partition rules: the one home of how an array is laid out on devices.

Two tables decide how every parameter (and optimizer-state) array is laid out (as MaxText does):

* `PARAM_RULES`: parameter path (regex, searched in the "/"-joined path) -> logical axis names
  of the trailing dimensions, e.g. a query kernel is ("embed", "heads");
* `LOGICAL_RULES`: logical axis name -> mesh axis (or axes, or None = replicated).

The mesh has three axes: "data" (pure data parallelism), "fsdp" (data parallelism whose
parameters and optimizer state are sharded) and "sequence" (one document's tokens split over
devices: `longformer_jax.sequence_parallel`). A dimension is sharded only if its size divides by
the mesh axis size; otherwise it is replicated, so any model runs on any mesh. The same rules
apply to the optimizer state: its paths end with the parameter paths (".../mu/<param path>").
Parameters never split over "sequence": every device of a sequence group holds the same ones.
Input batches are split over ("data", "fsdp") along their batch dimension and over "sequence"
along their token dimension (`batch_spec`); the activations follow the inputs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

SEQUENCE_AXIS = "sequence"  # the mesh axis one document's tokens are split over
MESH_AXES = ("data", "fsdp", SEQUENCE_AXIS)
BATCH_AXES = ("data", "fsdp")  # the mesh axes the batch (rows of examples) is split over

# Parameter path regex -> logical axes of the trailing dims (first match wins). Paths are the
# Flax params paths (HF state-dict names, see longformer_jax.state_dict); a stacked encoder
# (scan_layers=True) has one extra leading "layers" dim, added automatically.
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"word_embeddings/embedding$", ("vocab", "embed")),
    (r"position_embeddings/embedding$", ("positions", "embed")),
    (r"token_type_embeddings/embedding$", ("token_types", "embed")),
    (r"attention/self/(query|key|value)(_global)?/kernel$", ("embed", "heads")),
    (r"attention/self/(query|key|value)(_global)?/bias$", ("heads",)),
    (r"attention/output/dense/kernel$", ("heads", "embed")),
    (r"intermediate/dense/kernel$", ("embed", "mlp")),
    (r"intermediate/dense/bias$", ("mlp",)),
    (r"output/dense/kernel$", ("mlp", "embed")),
    (r"(pooler|lm_head)/dense/kernel$", ("embed", "embed_out")),
    (r"lm_head/bias$", ("vocab",)),
    (r"/kernel$", ("embed", "out")),  # task heads: shard the input dim
    (r"(scale|bias)$", ("norm",)),
)

# Logical axis -> mesh axes. "embed" carries FSDP: every embedding table and dense kernel has
# one dimension of size hidden_size, so all large arrays shard over fsdp (when divisible).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", "fsdp"),
    ("vocab", None),
    ("positions", None),
    ("token_types", None),
    ("heads", None),
    ("mlp", None),
    ("embed_out", None),
    ("out", None),
    ("norm", None),
    ("layers", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, sequence: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "sequence") mesh over `devices` (default: all); data=-1 takes the remaining devices.

    "sequence" is the innermost axis, so the neighbours that exchange a document's halo rows are
    neighbouring devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    for name, size in (("fsdp", fsdp), ("sequence", sequence)):
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
            raise ValueError(f"mesh {name}={size!r} must be an integer (pass devices=... by keyword).")
        if size < 1 or n % size:
            raise ValueError(
                f"mesh {name}={size} does not divide the {n} devices; pick {name} among {divisors} (--mesh {name}=N)."
            )
    if data == -1:
        if n % (fsdp * sequence):
            raise ValueError(
                f"mesh fsdp={fsdp} x sequence={sequence} = {fsdp * sequence} does not divide the {n} "
                "devices; make the product a divisor of the device count."
            )
        data = n // (fsdp * sequence)
    if data < 1 or data * fsdp * sequence != n:
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x sequence={sequence} = {data * fsdp * sequence} "
            f"devices, but {n} are present; use data=-1 (all remaining devices: --mesh data=-1) "
            f"or make the product {n}."
        )
    arr = np.asarray(devices, dtype=object).reshape(data, fsdp, sequence)
    return Mesh(arr, MESH_AXES)


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=2,fsdp=1,sequence=4"` -> {"data": 2, "fsdp": 1, "sequence": 4} (axes left out: data -1, others 1)."""
    sizes = {"data": -1, "fsdp": 1, SEQUENCE_AXIS: 1}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in sizes or not value.strip().lstrip("-").isdigit():
            raise ValueError(
                f"--mesh {text!r}: expected AXIS=SIZE items separated by commas, axes among "
                f"{', '.join(sizes)} (e.g. --mesh data=2,fsdp=1,sequence=4; data=-1 takes the "
                "remaining devices)."
            )
        sizes[name] = int(value)
    return sizes


def path_str(keypath: Sequence[Any]) -> str:
    """'/'-joined names of a jax.tree_util key path."""
    parts = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of an array at `path` with `ndim` dims (None = no rule)."""
    if ndim == 0:
        return ()
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, path):
            if len(axes) == ndim:
                return tuple(axes)
            if len(axes) < ndim:  # stacked layers (scan) or other leading dims
                return ("layers",) * (ndim - len(axes)) + tuple(axes)
            break
    return (None,) * ndim


def _mesh_axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in names]))


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES
) -> P:
    """PartitionSpec for logical `axes`; a dim not divisible by its mesh axes is replicated."""
    table = dict(rules)
    spec, used = [], set()
    for name, size in zip(axes, shape, strict=True):
        mesh_axes = table.get(name) if name is not None else None
        if mesh_axes is not None:
            names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            names = tuple(a for a in names if a in mesh.shape and a not in used)
            n = _mesh_axis_size(mesh, names) if names else 1
            if names and n > 1 and size % n == 0:
                used.update(names)
                spec.append(names[0] if len(names) == 1 else names)
                continue
        spec.append(None)
    return P(*spec)


def partition_spec(path: str, shape: Sequence[int], mesh: Mesh) -> P:
    return logical_to_spec(logical_axes(path, len(shape)), shape, mesh)


def tree_partition_specs(tree: Any, mesh: Mesh) -> Any:
    """PartitionSpecs for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: partition_spec(path_str(kp), np.shape(x), mesh), tree)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of `tree` from the partition rules."""
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), tree_partition_specs(tree, mesh), is_leaf=lambda x: isinstance(x, P)
    )


def batch_spec(ndim: int, batch_dim: int = 0, token_dim: int | None = None) -> P:
    """Spec of a batch array: dim `batch_dim` over ("data", "fsdp"), dim `token_dim` (if any) over
    "sequence", the rest replicated."""
    spec: list[Any] = [None] * ndim
    spec[batch_dim] = BATCH_AXES
    if token_dim is not None:
        spec[token_dim] = SEQUENCE_AXIS
    return P(*spec)


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0, token_dim: int | None = None) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim, batch_dim, token_dim))


def check_batch_divisible(
    global_batch: int, num_devices: int, what: str = "batch_size", devices: str = "devices"
) -> None:
    """A ValueError naming the fix unless `global_batch` rows split evenly over `num_devices` (`devices`
    names them in the message, e.g. "data x fsdp devices" when a sequence axis splits the tokens)."""
    if global_batch % num_devices:
        ok = [b for b in range(num_devices, 4 * num_devices + 1, num_devices)]
        raise ValueError(
            f"{what}={global_batch} is not divisible by the {num_devices} {devices}; each device needs "
            f"the same number of examples: use a multiple of {num_devices} (e.g. {ok[:3]}) "
            "or run on fewer devices."
        )
