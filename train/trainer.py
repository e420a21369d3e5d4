"""Train state, optimizer, the pure train/eval steps, and the two drivers that run them.

`train_step(state, batch, rng) -> (state, metrics)` is one optimizer step over a batch of
shape (A, B, L): A micro-batches of B examples, accumulated with a `lax.scan` inside the step.
What the step minimises is an `Objective` (`train.objectives`): masked-LM for pretraining, a
task loss for fine-tuning; the step itself does not know which.
Accumulating inside the step (rather than with `optax.MultiSteps`) keeps one compiled call per
optimizer step, keeps `state.step` equal to the optimizer step (so the LR schedule, checkpoints
and the data position all count the same unit, and a checkpoint never holds a half-accumulated
gradient), and only holds one micro-batch's activations at a time. The loss is the exact mean
over everything the objective counts in the whole step (sum over micro-batches and devices,
divided by the total count), so A x B and 1 x (A*B) give the same update. Dropout keys are
`fold_in(key, step)` (then the device and the micro-batch), so one key serves a whole run and a
resumed run draws the same masks.

Drivers share one way to build a state (`Driver.init_state`, also the restore target of
`abstract_state`) and differ in where it lives:
  * `MeshDriver` (default): `jax.jit` over a ("data", "fsdp", "sequence") mesh; parameters and
    optimizer state laid out by `longformer_jax.sharding`'s rules; batch rows split over data x
    fsdp and, with a "sequence" axis, every row's tokens over it (one document over several devices:
    `longformer_jax.sequence_parallel`; the loss stays the exact mean over the step); each host
    feeds its share of the global batch (`jax.make_array_from_process_local_data`);
  * `PmapDriver`: `jax.pmap` over the local devices, replicated state, `lax.psum` of gradients
    and token counts (a mean over tokens, not over devices).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longformer_jax import sequence_parallel
from longformer_jax import sharding as shd
from train.objectives import Objective

Batch = dict[str, Any]


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # float32 parameters
    opt_state: Any

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


# ----------------------------------------------------------------------------------------------
# Optimizer


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: kernels and embeddings; never biases or LayerNorm scales.

    This is the HF Trainer's rule (no decay on `*bias` and LayerNorm weights) in Flax names:
    LayerNorm weights are `scale`, every bias is `bias` (`lm_head/bias` included).
    """

    def is_decayed(kp, _):
        return shd.path_str(kp).rsplit("/", 1)[-1] in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def lr_schedule(peak_lr: float, max_steps: int, warmup_steps: int) -> Callable[[Any], jax.Array]:
    """HF `get_linear_schedule_with_warmup`: 0 -> peak over warmup, then linear to 0 at max_steps."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = step / max(1, warmup_steps)
        decay = jnp.maximum(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))
        return peak_lr * jnp.where(step < warmup_steps, warm, decay)

    return schedule


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW (decoupled decay, masked) after global-norm clipping, with the linear schedule."""
    schedule = lr_schedule(cfg.learning_rate, cfg.max_steps, cfg.warmup_steps)
    parts = []
    if cfg.clip_norm is not None and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.adam_beta1,
            b2=cfg.adam_beta2,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------------------------
# Steps


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    objective: Objective,
    *,
    dropout: bool,
    schedule: Callable | None = None,
    axis_name: str | None = None,
):
    """The pure step `train_step(state, batch, rng) -> (state, metrics)`; batch arrays (A, B, ...).

    `rng`: the run's dropout key (the step folds in `state.step`). `axis_name`: the pmap axis
    over which gradients, sums and counts are summed (None under jit).
    """

    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        count = objective.count(batch)
        if axis_name is not None:
            count = jax.lax.psum(count, axis_name)
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        denom = jnp.maximum(count, 1.0)

        def micro(carry, xs):
            grads_acc, sums_acc = carry
            mb, i = xs

            def loss_fn(params):
                loss_sum, metric_sums = objective.sums(model, params, mb, jax.random.fold_in(rng, i), not dropout)
                return loss_sum / denom, {"loss": loss_sum, **metric_sums}

            (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

        num_micro = jax.tree.leaves(batch)[0].shape[0]
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, {k: jnp.zeros((), jnp.float32) for k in ("loss", *objective.metrics)})
        (grads, sums), _ = jax.lax.scan(micro, init, (batch, jnp.arange(num_micro)))
        if axis_name is not None:
            grads, sums = jax.lax.psum((grads, sums), axis_name)

        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: v / denom for k, v in sums.items()}
        metrics.update(grad_norm=grad_norm, count=count)
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model, objective: Objective, *, axis_name: str | None = None):
    """`eval_step(params, batch) -> sums`: the loss, metric sums and count of a (B, ...) batch.

    Sums (not means) so that the mean over many batches (and devices) is exact: see `finish_eval`.
    """

    def eval_step(params, batch: Batch):
        loss_sum, metric_sums = objective.sums(model, params, batch, None, True)
        sums = {"loss": loss_sum, **metric_sums, "count": objective.count(batch)}
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        return sums

    return eval_step


def make_predict_step(model, objective: Objective, *, axis_name: str | None = None):
    """`predict_step(params, batch) -> (sums, outputs)`: the sums of `eval_step` (count included) and the
    objective's per-row outputs (`Objective.predict`) of a (B, ...) batch, from one forward pass."""
    if objective.predict is None:
        raise ValueError("this objective has no `predict` (per-row outputs); give Objective(predict=...).")

    def predict_step(params, batch: Batch):
        sums, outputs = objective.predict(model, params, batch)
        sums = {**sums, "count": objective.count(batch)}
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        return sums, outputs

    return predict_step


def finish_eval(sums: list[dict[str, Any]], objective: Objective | None = None) -> dict[str, float]:
    """Means over everything counted in all eval batches (loss and metrics), the count, and the
    objective's derived numbers (e.g. bpc)."""
    if not sums:
        return {}
    tot = {k: float(sum(float(s[k]) for s in sums)) for k in sums[0]}
    count = tot.pop("count")
    means = {k: tot[k] / max(count, 1.0) for k in ("loss", *sorted(set(tot) - {"loss"}))}
    if objective is not None:
        means.update(objective.derived(means))
    return {**means, "count": count}


def stack_micro_batches(batches: list[Batch]) -> Batch:
    """A list of A host batches (B, L) -> one batch of (A, B, L) numpy arrays."""
    return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}


# ----------------------------------------------------------------------------------------------
# Drivers


def _put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """A host array (identical on every process) -> a global jax.Array with `sharding`."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _given(params: Any) -> Any:
    return params


class Driver:
    """What both drivers share: the one path that builds a TrainState, and its restore target.

    A state is `TrainState.create(make_params(*inputs), tx)`, built on the devices where the
    driver keeps it: `make_params` is `lj.init_params(model, key)` for fresh parameters (made
    directly in place, never whole on one host) or the identity for given host parameters.
    A driver made with `objective=None` only builds and restores states (an export).
    """

    name = "driver"

    def __init__(
        self,
        model,
        tx: optax.GradientTransformation,
        objective: Objective | None,
        *,
        dropout: bool,
        schedule: Callable | None = None,
    ):
        self.model, self.tx, self.objective = model, tx, objective
        self._step_kw = dict(dropout=dropout, schedule=schedule)

    # --- where a state lives (per driver) ---
    def _state_shardings(self, shapes: TrainState) -> Any:
        raise NotImplementedError

    def _put_inputs(self, inputs: tuple) -> tuple:
        return inputs

    def place(self, state: TrainState) -> TrainState:
        """A state built or restored with the shardings of `abstract_state` -> the driver's layout."""
        return state

    # --- the one state-building path ---
    def _new_state(self, make_params: Callable, *inputs) -> TrainState:
        return TrainState.create(make_params(*inputs), self.tx)

    def abstract_state(self, make_params: Callable, *inputs) -> TrainState:
        """ShapeDtypeStructs (with shardings) of the state `init_state` builds: the restore target."""
        shapes = jax.eval_shape(functools.partial(self._new_state, make_params), *inputs)
        shardings = self._state_shardings(shapes)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    def init_state(self, make_params: Callable, *inputs) -> TrainState:
        """`TrainState.create(make_params(*inputs), tx)`, built directly with its final layout."""
        shardings = jax.tree.map(lambda s: s.sharding, self.abstract_state(make_params, *inputs))
        build = jax.jit(functools.partial(self._new_state, make_params), out_shardings=shardings)
        return self.place(build(*self._put_inputs(inputs)))

    def create_state(self, params: Any) -> TrainState:
        """A state from given parameters (host or device arrays)."""
        return self.init_state(_given, params)


class MeshDriver(Driver):
    """`jax.jit` over a ("data", "fsdp", "sequence") mesh with the partition rules of longformer_jax.sharding.

    The steps are traced and run under `jax.set_mesh(mesh)`, so that an attention kernel (one custom
    call XLA cannot split) runs on each device's rows of the batch (`longformer_jax.kernels`), and a
    "sequence" axis of more than one device splits every row's tokens (`longformer_jax.sequence_parallel`):
    batch arrays are laid out with their token dimension (the one after the rows) over it."""

    name = "mesh"

    def __init__(
        self,
        model,
        tx,
        objective: Objective,
        *,
        dropout: bool,
        schedule=None,
        mesh_data: int = -1,
        mesh_fsdp: int = 1,
        mesh_sequence: int = 1,
        devices=None,
    ):
        super().__init__(model, tx, objective, dropout=dropout, schedule=schedule)
        self.mesh = shd.make_mesh(mesh_data, mesh_fsdp, mesh_sequence, devices=devices)
        self.num_devices = self.mesh.size
        self.sequence_devices = self.mesh.shape[shd.SEQUENCE_AXIS]
        self.batch_devices = self.num_devices // self.sequence_devices  # data x fsdp: the rows split over them
        if jax.process_count() > 1 and jax.local_device_count() % self.sequence_devices:
            raise ValueError(
                f"mesh sequence={self.sequence_devices} spans several hosts ({jax.local_device_count()} "
                "devices each); every host feeds whole rows, so the sequence axis must divide a host's "
                "devices: use a smaller --mesh sequence=N."
            )
        self.replicated = NamedSharding(self.mesh, P())
        self._train_step = make_train_step(model, tx, objective, **self._step_kw)
        self._eval_step = make_eval_step(model, objective)
        self._shardings = None
        self._jit_train = None
        self._jit_eval = None
        self._jit_predict = None

    # --- state ---
    def _state_shardings(self, shapes: TrainState) -> Any:
        if self._shardings is None:
            self._shardings = shd.tree_shardings(shapes, self.mesh)
        return self._shardings

    def _put_inputs(self, inputs: tuple) -> tuple:
        """Host inputs -> global arrays laid out by the rules (parameters sharded, keys replicated)."""
        return jax.tree.map(_put_global, jax.device_get(inputs), shd.tree_shardings(inputs, self.mesh))

    def for_save(self, state: TrainState) -> TrainState:
        return state

    def host_params(self, state: TrainState) -> Any:
        """Full parameters as numpy (gathers shards; on several hosts every host gets them)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(state.params, tiled=True)
        return jax.device_get(state.params)

    # --- steps ---
    def put_batch(self, host_batch: Batch, batch_dim: int) -> Batch:
        """Host-local rows -> global arrays; dim `batch_dim` is the per-process share of the batch.

        With a "sequence" axis, the dimension after the rows (the tokens) is split over it where it
        divides; the rest of an array is replicated (the jitted step lays it out as it needs)."""
        out = {}
        for k, v in host_batch.items():
            v = np.asarray(v)
            global_shape = list(v.shape)
            global_shape[batch_dim] *= jax.process_count()
            sharding = self.batch_sharding(v.shape, batch_dim)
            out[k] = jax.make_array_from_process_local_data(sharding, v, tuple(global_shape))
        return out

    def batch_sharding(self, shape: tuple[int, ...], batch_dim: int) -> NamedSharding:
        """The layout of a batch array: rows (dim `batch_dim`) over data x fsdp and, with a "sequence" axis,
        the dimension after them over it where it divides."""
        split = (
            self.sequence_devices > 1
            and len(shape) > batch_dim + 1
            and shape[batch_dim + 1] % self.sequence_devices == 0
        )
        return shd.batch_sharding(self.mesh, len(shape), batch_dim, batch_dim + 1 if split else None)

    def jit_train(self, batch_shardings: Batch):
        """The jitted train step for batches laid out as `batch_shardings` (trace and call it under the mesh)."""
        if self._jit_train is None:  # batch arrays of any rank (labels per token, per row, ...)
            self._jit_train = jax.jit(
                self._train_step,
                in_shardings=(self._shardings, batch_shardings, self.replicated),
                out_shardings=(self._shardings, self.replicated),
                donate_argnums=(0,),
            )
        return self._jit_train

    def jit_eval(self, batch_shardings: Batch):
        """The jitted eval step (`make_eval_step`) for batches laid out as `batch_shardings`."""
        if self._jit_eval is None:
            self._jit_eval = jax.jit(
                self._eval_step,
                in_shardings=(self._shardings.params, batch_shardings),
                out_shardings=self.replicated,
            )
        return self._jit_eval

    def train(self, state: TrainState, host_batch_AxBxL: Batch, rng: jax.Array):
        batch = self.put_batch(host_batch_AxBxL, batch_dim=1)
        step = self.jit_train(jax.tree.map(lambda x: x.sharding, batch))
        rng = _put_global(jax.device_get(rng), self.replicated)  # the same key on every process
        with jax.set_mesh(self.mesh):  # the model's kernels see the mesh (longformer_jax.kernels)
            return step(state, batch, rng)

    def put_params(self, host_params: Any) -> Any:
        """Host parameters -> global arrays laid out by the partition rules (as a state's)."""
        host_params = jax.device_get(host_params)
        return jax.tree.map(_put_global, host_params, shd.tree_shardings(host_params, self.mesh))

    def predict(self, params: Any, host_batch_BxL: Batch) -> tuple[dict[str, Any], dict[str, Any]]:
        """(sums, per-row outputs) of `make_predict_step` on the host; `params` as `put_params` lays them out.
        The outputs are gathered whole on every process."""
        batch = self.put_batch(host_batch_BxL, batch_dim=0)
        return jax.device_get(self.jit_predict()(params, batch))

    def jit_predict(self):
        """The jitted `make_predict_step` (inputs laid out as given; outputs gathered on every device)."""
        if self._jit_predict is None:
            self._jit_predict = jax.jit(
                make_predict_step(self.model, self.objective), out_shardings=(self.replicated, self.replicated)
            )
        return self._jit_predict

    def evaluate(self, state: TrainState, host_batch_BxL: Batch):
        batch = self.put_batch(host_batch_BxL, batch_dim=0)
        step = self.jit_eval(jax.tree.map(lambda x: x.sharding, batch))
        with jax.set_mesh(self.mesh):
            return step(state.params, batch)


class PmapDriver(Driver):
    """`jax.pmap` data parallelism over the local devices: replicated state, psum of gradients."""

    name = "pmap"
    axis = "devices"

    def __init__(self, model, tx, objective: Objective, *, dropout: bool, schedule=None, devices=None, **_unused):
        super().__init__(model, tx, objective, dropout=dropout, schedule=schedule)
        self.devices = list(jax.local_devices() if devices is None else devices)
        self.num_local = len(self.devices)
        self.num_devices = self.batch_devices = self.num_local * jax.process_count()
        step = make_train_step(model, tx, objective, axis_name=self.axis, **self._step_kw)
        ev = make_eval_step(model, objective, axis_name=self.axis)
        self._p_train = jax.pmap(
            step, axis_name=self.axis, in_axes=(0, 0, None), devices=self.devices, donate_argnums=(0,)
        )
        self._p_eval = jax.pmap(ev, axis_name=self.axis, devices=self.devices)
        self._p_predict = None

    # --- state: built (or restored) on the first device, then one copy per device ---
    def _state_shardings(self, shapes: TrainState) -> Any:
        return jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(self.devices[0]), shapes)

    def place(self, state: TrainState) -> TrainState:
        """Host or single-device tree -> arrays with a leading axis of one copy per local device."""
        mesh = jax.sharding.Mesh(np.asarray(self.devices, dtype=object), (self.axis,))
        sharding = NamedSharding(mesh, P(self.axis))

        def rep(x):
            x = np.asarray(x)
            bufs = [jax.device_put(x[None], d) for d in self.devices]
            return jax.make_array_from_single_device_arrays((self.num_local, *x.shape), sharding, bufs)

        return jax.tree.map(rep, jax.device_get(state))

    def for_save(self, state: TrainState) -> TrainState:
        return jax.tree.map(lambda x: x[0], state)

    def host_params(self, state: TrainState) -> Any:
        return jax.device_get(jax.tree.map(lambda x: x[0], state.params))

    # --- steps ---
    def _split(self, host_batch: Batch, batch_dim: int) -> Batch:
        out = {}
        for k, v in host_batch.items():
            v = np.asarray(v)
            b = v.shape[batch_dim]
            shape = v.shape[:batch_dim] + (self.num_local, b // self.num_local) + v.shape[batch_dim + 1 :]
            out[k] = np.moveaxis(v.reshape(shape), batch_dim, 0)
        return out

    def train(self, state: TrainState, host_batch_AxBxL: Batch, rng: jax.Array):
        state, metrics = self._p_train(state, self._split(host_batch_AxBxL, 1), rng)
        return state, jax.tree.map(lambda x: x[0], metrics)

    def evaluate(self, state: TrainState, host_batch_BxL: Batch):
        sums = self._p_eval(state.params, self._split(host_batch_BxL, 0))
        return jax.tree.map(lambda x: x[0], sums)

    def put_params(self, host_params: Any) -> Any:
        """Host parameters -> one copy per local device (as a state's)."""
        return self.place(host_params)

    def predict(self, params: Any, host_batch_BxL: Batch) -> tuple[dict[str, Any], dict[str, Any]]:
        """(sums, per-row outputs) of `make_predict_step` on the host, rows in the order of the batch."""
        if self._p_predict is None:
            self._p_predict = jax.pmap(
                make_predict_step(self.model, self.objective, axis_name=self.axis),
                axis_name=self.axis,
                devices=self.devices,
            )
        sums, outputs = jax.device_get(self._p_predict(params, self._split(host_batch_BxL, 0)))
        return jax.tree.map(lambda x: x[0], sums), jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), outputs)


def check_batch_split(cfg, num_devices: int) -> None:
    """A ValueError naming the fix unless `cfg.batch_size` rows split evenly over the devices that hold
    rows: all `num_devices`, or with a "sequence" axis of n devices the num_devices / n groups."""
    n = cfg.mesh_sequence if cfg.driver == "mesh" else 1
    if n == 1:
        shd.check_batch_divisible(cfg.batch_size, num_devices, "batch_size")
    else:
        shd.check_batch_divisible(
            cfg.batch_size,
            max(1, num_devices // n),
            "batch_size",
            f"data x fsdp devices (the {n} devices of the sequence axis share each row)",
        )


def make_driver(cfg, model, tx, objective: Objective, schedule=None, devices=None) -> Driver:
    """The driver `cfg.driver` names, checked against the batch size (and the sequence length, with a
    sequence axis: every layer's window, times its dilation, times the axis must divide it)."""
    kw = dict(dropout=cfg.dropout, schedule=schedule, devices=devices)
    if cfg.driver == "pmap":
        drv = PmapDriver(model, tx, objective, **kw)
    else:
        drv = MeshDriver(
            model,
            tx,
            objective,
            mesh_data=cfg.mesh_data,
            mesh_fsdp=cfg.mesh_fsdp,
            mesh_sequence=cfg.mesh_sequence,
            **kw,
        )
        if drv.sequence_devices > 1:
            mc = model.config
            for window, dilation in dict.fromkeys(zip(mc.attention_windows, mc.attention_dilations, strict=True)):
                sequence_parallel.check_sequence_split(
                    cfg.seq_len, window, drv.sequence_devices, mc.attention_implementation, dilation
                )
    check_batch_split(cfg, drv.num_devices)
    return drv


__all__ = [
    "Driver",
    "MeshDriver",
    "PmapDriver",
    "TrainState",
    "check_batch_split",
    "decay_mask",
    "finish_eval",
    "lr_schedule",
    "make_driver",
    "make_eval_step",
    "make_optimizer",
    "make_predict_step",
    "make_train_step",
    "stack_micro_batches",
]
