"""Orbax checkpoints of a training run: train state, data-iterator position and run metadata.

A checkpoint step directory holds three items:
  state/  the TrainState (step, params, optimizer state, base RNG) as sharded arrays;
  data/   each process's data-iterator state as `process_{i}-of-{n}.json` (the iterator's
          `get_state()`, snapshotted when the save starts, so later batches cannot leak in);
  meta/   JSON: the config fingerprint, the step, the consumed-example count.
Saves are asynchronous (the step loop keeps running while arrays are written); Orbax only
makes a step visible once every item is complete, so `latest_step()` is always restorable.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from etils import epath


def _process_index_count() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


class DataStateHandler(ocp.CheckpointHandler):
    """Per-process JSON files with each host's data-iterator state."""

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        i, n = _process_index_count()
        (directory / f"process_{i}-of-{n}.json").write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> Any:
        i, n = _process_index_count()
        path = directory / f"process_{i}-of-{n}.json"
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir())
            raise ValueError(
                f"{path} is missing: the checkpoint was written by a different number of processes "
                f"(found {found}); resume with the same number of hosts ({n} now).")
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path) -> Any:
        return None

    def structure(self, directory: epath.Path) -> Any:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass

    @classmethod
    def typestr(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def to_jsonable(data_state: Any) -> Any:
    """grain DatasetIterator states are dicts; DataLoader states are bytes: store both as JSON."""
    if isinstance(data_state, bytes):
        return {"__bytes__": data_state.decode()}
    return data_state


def from_jsonable(data_state: Any) -> Any:
    if isinstance(data_state, dict) and set(data_state) == {"__bytes__"}:
        return data_state["__bytes__"].encode()
    return data_state


class Checkpointer:
    """CheckpointManager over `directory` keeping the last `keep` steps."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": DataStateHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: Any, meta: dict[str, Any]) -> bool:
        """Starts an (async) save of `state` at `step`; returns False when that step exists."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=DataStateSave(to_jsonable(data_state)),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any, dict[str, Any]]:
        """(state, data_state, meta) of `step`; `abstract_state` gives shapes, dtypes, shardings."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=DataStateRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], from_jsonable(out["data"]), dict(out["meta"])

    def read_meta(self, step: int) -> dict[str, Any]:
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
