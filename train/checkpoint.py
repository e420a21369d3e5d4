"""How a run is resumed: Orbax checkpoints of the train state, data position and metadata,
the check that a run directory belongs to this run, and `restore_or_init`.

A checkpoint step directory holds three items:
  state/  the TrainState (step, params, optimizer state) as sharded arrays;
  data/   each process's data-iterator state as `process_{i}-of-{n}.json` (the iterator's
          `get_state()`, snapshotted when the save starts, so later batches cannot leak in); a
          state that every process holds alike (the pretraining pipeline's global example count)
          restores into any number of processes;
  meta/   JSON: the config fingerprint, the step, the consumed-example count.
Saves are asynchronous (the step loop keeps running while arrays are written); Orbax only
makes a step visible once every item is complete, so `latest_step()` is always restorable.

Resuming (`restore_or_init`): the latest complete step is restored into the layout the driver
would build a new state with (`Driver.abstract_state`), and the data iterator is set to the
position saved with it; with no checkpoint, the driver builds a new state. Steps are
deterministic functions of the state, the step number and the data position, so a resumed run
continues bitwise as the uninterrupted one. `check_resumable` refuses a run directory whose
saved settings differ (`TrainConfig.fingerprint_fields`) before anything is restored, and
`check_data` one whose checkpoints were trained on other prepared data (the manifest's
fingerprint, saved in the run's config.json as `data_fingerprint`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from train.config import TrainConfig


def _process_index_count() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


class DataStateHandler(ocp.CheckpointHandler):
    """Per-process JSON files with each host's data-iterator state."""

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        i, n = _process_index_count()
        (directory / f"process_{i}-of-{n}.json").write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> Any:
        i, n = _process_index_count()
        path = directory / f"process_{i}-of-{n}.json"
        if path.exists():
            return json.loads(path.read_text())
        # Written by another number of processes: usable when every process saved the same state.
        saved = sorted(p.name for p in directory.iterdir() if p.name.startswith("process_"))
        states = {p: json.loads((directory / p).read_text()) for p in saved}
        if states and all(v == states[saved[0]] for v in states.values()):
            return states[saved[0]]
        raise ValueError(
            f"{path} is missing: the checkpoint was written by a different number of processes "
            f"(found {saved}) with a data position per process; resume with the same number of hosts ({n} now)."
        )

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

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True, read_only: bool = False):
        """`read_only`: only read steps (an export), never create, clean up or delete anything."""
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,  # a reader leaves a save in progress alone
        )
        self.read_only = read_only
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
        if self.read_only:
            raise ValueError(f"{self.directory} was opened read-only; open a Checkpointer without read_only to save.")
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

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """The train state of `step` alone (any number of processes may read it)."""
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return out["state"]

    def read_meta(self, step: int) -> dict[str, Any]:
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


DATA_FINGERPRINT = "data_fingerprint"  # config.json key: the prepared data's manifest fingerprint


def _has_checkpoints(out: Path) -> bool:
    ckpt_dir = out / "checkpoints"
    return ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


def check_data(run_dir: str | Path, fingerprint: str, data_dir: str | Path) -> None:
    """A `ValueError` naming the fix when `run_dir` holds checkpoints trained on other prepared data
    than `data_dir` (whose manifest fingerprint is `fingerprint`): another corpus, tokenizer or layout."""
    out = Path(run_dir)
    if not _has_checkpoints(out) or not (out / "config.json").exists():
        return
    saved = json.loads((out / "config.json").read_text()).get(DATA_FINGERPRINT)
    if saved is not None and saved != fingerprint:
        raise ValueError(
            f"--output-dir {out} holds checkpoints trained on other data (manifest fingerprint {saved}) than "
            f"{data_dir} (fingerprint {fingerprint}: another corpus, tokenizer or layout). Resume with the data "
            "the run was trained on, pick another --output-dir, or pass --overwrite to start over."
        )


def check_resumable(cfg: TrainConfig, run_dir: str | Path) -> None:
    """A `ValueError` naming the fix when `run_dir` holds checkpoints that `cfg` cannot resume:
    ones without the run's `config.json`, or of a run whose fingerprinted settings differ (the saved
    settings are read as `cfg`'s own class, so a `TrainConfig` subclass compares all its fields)."""
    out = Path(run_dir)
    ckpt_dir = out / "checkpoints"
    if not _has_checkpoints(out):
        return
    if not (out / "config.json").exists():
        raise ValueError(
            f"--output-dir {out} holds checkpoints ({ckpt_dir}) but no config.json, so they cannot be "
            "matched to this run: pick another --output-dir, or pass --overwrite to delete them and "
            "start over."
        )
    diff = cfg.differences(type(cfg).load(out / "config.json"))
    if diff:
        shown = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"--output-dir {out} holds checkpoints of a different run ({shown}). Pick another "
            "--output-dir, rerun with the saved settings to resume, or pass --overwrite to delete "
            "those checkpoints and start over."
        )


def remove_run_files(run_dir: str | Path, names: Iterable[str]) -> None:
    """Deletes the files and folders `names` of a run directory (what --overwrite starts over from)."""
    for name in names:
        p = Path(run_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def restore_or_init(
    ckpt: Checkpointer, driver, make_params: Callable, *inputs, data_iterator: Any = None
) -> tuple[Any, int | None]:
    """The state to train from, and the step it was restored from (None for a new state).

    `driver` is a `train.trainer.Driver`; a new state is `driver.init_state(make_params, *inputs)`
    (`make_params(*inputs)` gives the parameters: fresh ones from a key, or given ones). The latest
    complete checkpoint, if any, is restored into that state's layout instead, and
    `data_iterator` (anything with `set_state`) continues where the checkpoint left it.
    """
    step = ckpt.latest_step()
    if step is None:
        return driver.init_state(make_params, *inputs), None
    state, data_state, _ = ckpt.restore(step, driver.abstract_state(make_params, *inputs))
    if data_iterator is not None and data_state is not None:
        data_iterator.set_state(data_state)
    return driver.place(state), step
