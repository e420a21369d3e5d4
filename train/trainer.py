"""Train state, optimizer, the pure train/eval steps, and the two drivers that run them.

`train_step(state, batch, rng) -> (state, metrics)` is one optimizer step over a batch of
shape (A, B, L): A micro-batches of B examples, accumulated with a `lax.scan` inside the step.
Accumulating inside the step (rather than with `optax.MultiSteps`) keeps one compiled call per
optimizer step, keeps `state.step` equal to the optimizer step (so the LR schedule, checkpoints
and the data position all count the same unit, and a checkpoint never holds a half-accumulated
gradient), and only holds one micro-batch's activations at a time. The loss is the exact mean
over every masked token of the whole step (sum over micro-batches and devices, divided by the
total count), so A x B and 1 x (A*B) give the same update.

Drivers:
  * `MeshDriver` (default): `jax.jit` over a ("data", "fsdp") mesh; parameters and optimizer
    state laid out by `longformer_jax.sharding`'s rules; each host feeds its share of the global
    batch (`jax.make_array_from_process_local_data`);
  * `PmapDriver`: `jax.pmap` over the local devices, replicated state, `lax.psum` of gradients
    and token counts (a mean over tokens, not over devices).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longformer_jax import sharding as shd
from longformer_jax.losses import IGNORE_INDEX, cross_entropy_sums

Batch = dict[str, Any]
LN2 = math.log(2.0)


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # float32 parameters
    opt_state: Any
    rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step)

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


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
    parts.append(optax.adamw(schedule, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------------------------
# Steps


mlm_sums = cross_entropy_sums  # (summed loss, correct, counted tokens) over labels != -100


def _forward(model, params, mb: Batch, *, num_global_slots: int, deterministic: bool, rng=None):
    return model.apply(
        {"params": params},
        mb["input_ids"],
        attention_mask=mb["attention_mask"],
        global_attention_mask=mb["global_attention_mask"],
        deterministic=deterministic,
        num_global_slots=num_global_slots,
        rngs=None if deterministic else {"dropout": rng},
    )


def make_train_step(model, tx: optax.GradientTransformation, *, num_global_slots: int,
                    dropout: bool, schedule: Callable | None = None, axis_name: str | None = None):
    """The pure step `train_step(state, batch, rng) -> (state, metrics)`; batch arrays (A, B, L).

    `axis_name`: the pmap axis over which gradients and counts are summed (None under jit).
    """
    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        labels_AxBxL = batch["labels"]
        count = jnp.sum(labels_AxBxL != IGNORE_INDEX).astype(jnp.float32)
        if axis_name is not None:
            count = jax.lax.psum(count, axis_name)
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        denom = jnp.maximum(count, 1.0)

        def micro(carry, xs):
            grads_acc, loss_acc, correct_acc = carry
            mb, i = xs

            def loss_fn(params):
                out = _forward(model, params, mb, num_global_slots=num_global_slots,
                               deterministic=not dropout, rng=jax.random.fold_in(rng, i))
                loss_sum, correct, _ = mlm_sums(out.logits, mb["labels"])
                return loss_sum / denom, (loss_sum, correct)

            (_, (loss_sum, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            return (grads_acc, loss_acc + loss_sum, correct_acc + correct), None

        num_micro = labels_AxBxL.shape[0]
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, loss_sum, correct), _ = jax.lax.scan(micro, init, (batch, jnp.arange(num_micro)))
        if axis_name is not None:
            grads, loss_sum, correct = jax.lax.psum((grads, loss_sum, correct), axis_name)

        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_sum / denom,
            "accuracy": correct / denom,
            "grad_norm": grad_norm,
            "masked_tokens": count,
        }
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model, *, num_global_slots: int, axis_name: str | None = None):
    """`eval_step(params, batch) -> sums`: loss_sum, correct, count over a (B, L) batch.

    Sums (not means) so that the mean over many batches (and devices) is exact: see `finish_eval`.
    """
    def eval_step(params, batch: Batch):
        out = _forward(model, params, batch, num_global_slots=num_global_slots, deterministic=True)
        loss_sum, correct, count = mlm_sums(out.logits, batch["labels"])
        sums = {"loss_sum": loss_sum, "correct": correct, "count": count}
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        return sums

    return eval_step


def finish_eval(sums: list[dict[str, Any]]) -> dict[str, float]:
    """Means over every counted token of all eval batches: loss, accuracy, bpc = loss / ln 2."""
    tot = {k: float(sum(float(s[k]) for s in sums)) for k in ("loss_sum", "correct", "count")}
    n = max(tot["count"], 1.0)
    loss = tot["loss_sum"] / n
    return {"loss": loss, "accuracy": tot["correct"] / n, "bpc": loss / LN2, "masked_tokens": tot["count"]}


def step_rng(base_rng: jax.Array, step: int) -> jax.Array:
    return jax.random.fold_in(base_rng, step)


def stack_micro_batches(batches: list[Batch]) -> Batch:
    """A list of A host batches (B, L) -> one batch of (A, B, L) numpy arrays."""
    return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}


def pad_eval_batch(batch: Batch, batch_size: int) -> Batch:
    """Pads a short last eval batch to `batch_size` rows with copies of row 0 that count no loss."""
    n = np.asarray(batch["input_ids"]).shape[0]
    if n == batch_size:
        return {k: np.asarray(v) for k, v in batch.items()}
    idx = np.concatenate([np.arange(n), np.zeros(batch_size - n, np.int64)])
    out = {k: np.asarray(v)[idx] for k, v in batch.items()}
    out["labels"] = out["labels"].copy()
    out["labels"][n:] = IGNORE_INDEX
    return out


# ----------------------------------------------------------------------------------------------
# Drivers


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """A host array (identical on every process) -> a global jax.Array with `sharding`."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


class MeshDriver:
    """`jax.jit` over a ("data", "fsdp") mesh with the partition rules of longformer_jax.sharding."""

    name = "mesh"

    def __init__(self, model, tx, *, num_global_slots: int, dropout: bool, schedule=None,
                 mesh_data: int = -1, mesh_fsdp: int = 1, devices=None):
        self.model, self.tx = model, tx
        self.mesh = shd.make_mesh(mesh_data, mesh_fsdp, devices)
        self.num_devices = self.mesh.size
        self.replicated = NamedSharding(self.mesh, P())
        self._train_step = make_train_step(model, tx, num_global_slots=num_global_slots,
                                           dropout=dropout, schedule=schedule)
        self._eval_step = make_eval_step(model, num_global_slots=num_global_slots)
        self._state_shardings = None
        self._jit_train = None
        self._jit_eval = None

    # --- state ---
    def state_shardings(self, abstract_state: Any) -> Any:
        if self._state_shardings is None:
            self._state_shardings = shd.tree_shardings(abstract_state, self.mesh)
        return self._state_shardings

    def abstract_state(self, params_shapes: Any, rng: jax.Array) -> Any:
        """ShapeDtypeStructs (with shardings) of the TrainState, for restore targets."""
        shapes = jax.eval_shape(lambda p, r: TrainState.create(p, self.tx, r), params_shapes, rng)
        shardings = self.state_shardings(shapes)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)

    def create_state(self, params: Any, rng: jax.Array) -> TrainState:
        """TrainState from host params (numpy or jax), laid out by the rules; optimizer state
        is created on the devices with its final sharding."""
        p_shapes = _abstract(params)
        shardings = self.state_shardings(
            jax.eval_shape(lambda p, r: TrainState.create(p, self.tx, r), p_shapes, rng))
        params = jax.tree.map(_put_global, jax.device_get(params), shardings.params)
        rng = _put_global(jax.device_get(rng), self.replicated)
        create = jax.jit(lambda p, r: TrainState.create(p, self.tx, r), out_shardings=shardings)
        return create(params, rng)

    def init_state(self, init_fn: Callable[[jax.Array], Any], param_rng: jax.Array,
                   rng: jax.Array) -> TrainState:
        """TrainState of fresh parameters `init_fn(param_rng)`, created directly sharded."""
        shapes = jax.eval_shape(lambda k, r: TrainState.create(init_fn(k), self.tx, r), param_rng, rng)
        shardings = self.state_shardings(shapes)
        make = jax.jit(lambda k, r: TrainState.create(init_fn(k), self.tx, r), out_shardings=shardings)
        return make(_put_global(jax.device_get(param_rng), self.replicated),
                    _put_global(jax.device_get(rng), self.replicated))

    def restored(self, state: TrainState) -> TrainState:
        return state  # Orbax restores straight into the target shardings

    def for_save(self, state: TrainState) -> TrainState:
        return state

    def host_params(self, state: TrainState) -> Any:
        """Full parameters as numpy (gathers shards; on several hosts every host gets them)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(state.params, tiled=True)
        return jax.device_get(state.params)

    # --- steps ---
    def _batch_sharding(self, ndim: int, batch_dim: int) -> NamedSharding:
        return shd.batch_sharding(self.mesh, ndim, batch_dim)

    def put_batch(self, host_batch: Batch, batch_dim: int) -> Batch:
        """Host-local rows -> global arrays; dim `batch_dim` is the per-process share of the batch."""
        out = {}
        for k, v in host_batch.items():
            v = np.asarray(v)
            global_shape = list(v.shape)
            global_shape[batch_dim] *= jax.process_count()
            out[k] = jax.make_array_from_process_local_data(
                self._batch_sharding(v.ndim, batch_dim), v, tuple(global_shape))
        return out

    def train(self, state: TrainState, host_batch_AxBxL: Batch, rng: jax.Array):
        if self._jit_train is None:
            self._jit_train = jax.jit(
                self._train_step,
                in_shardings=(self._state_shardings, self._batch_sharding(3, 1), self.replicated),
                out_shardings=(self._state_shardings, self.replicated),
                donate_argnums=(0,),
            )
        batch = self.put_batch(host_batch_AxBxL, batch_dim=1)
        rng = _put_global(jax.device_get(rng), self.replicated)  # the same key on every process
        return self._jit_train(state, batch, rng)

    def evaluate(self, state: TrainState, host_batch_BxL: Batch):
        if self._jit_eval is None:
            self._jit_eval = jax.jit(
                self._eval_step,
                in_shardings=(self._state_shardings.params, self._batch_sharding(2, 0)),
                out_shardings=self.replicated,
            )
        return self._jit_eval(state.params, self.put_batch(host_batch_BxL, batch_dim=0))


class PmapDriver:
    """`jax.pmap` data parallelism over the local devices: replicated state, psum of gradients."""

    name = "pmap"
    axis = "batch"

    def __init__(self, model, tx, *, num_global_slots: int, dropout: bool, schedule=None,
                 devices=None, **_unused):
        self.model, self.tx = model, tx
        self.devices = list(jax.local_devices() if devices is None else devices)
        self.num_local = len(self.devices)
        self.num_devices = self.num_local * jax.process_count()
        step = make_train_step(model, tx, num_global_slots=num_global_slots, dropout=dropout,
                               schedule=schedule, axis_name=self.axis)
        ev = make_eval_step(model, num_global_slots=num_global_slots, axis_name=self.axis)
        self._p_train = jax.pmap(step, axis_name=self.axis, in_axes=(0, 0, None),
                                 devices=self.devices, donate_argnums=(0,))
        self._p_eval = jax.pmap(ev, axis_name=self.axis, devices=self.devices)

    def _replicate(self, tree: Any) -> Any:
        """Host tree -> arrays with a leading axis of one copy per local device."""
        mesh = jax.sharding.Mesh(np.asarray(self.devices, dtype=object), (self.axis,))
        sharding = NamedSharding(mesh, P(self.axis))

        def rep(x):
            x = np.asarray(x)
            bufs = [jax.device_put(x[None], d) for d in self.devices]
            return jax.make_array_from_single_device_arrays((self.num_local, *x.shape), sharding, bufs)

        return jax.tree.map(rep, tree)

    def abstract_state(self, params_shapes: Any, rng: jax.Array) -> Any:
        shapes = jax.eval_shape(lambda p, r: TrainState.create(p, self.tx, r), params_shapes, rng)
        sh = jax.sharding.SingleDeviceSharding(self.devices[0])
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes)

    def create_state(self, params: Any, rng: jax.Array) -> TrainState:
        state = jax.jit(lambda p, r: TrainState.create(p, self.tx, r))(jax.device_get(params), rng)
        return self._replicate(jax.device_get(state))

    def init_state(self, init_fn, param_rng, rng) -> TrainState:
        state = jax.jit(lambda k, r: TrainState.create(init_fn(k), self.tx, r))(param_rng, rng)
        return self._replicate(jax.device_get(state))

    def restored(self, state: TrainState) -> TrainState:
        return self._replicate(jax.device_get(state))

    def for_save(self, state: TrainState) -> TrainState:
        return jax.tree.map(lambda x: x[0], state)

    def host_params(self, state: TrainState) -> Any:
        return jax.device_get(jax.tree.map(lambda x: x[0], state.params))

    def _split(self, host_batch: Batch, batch_dim: int) -> Batch:
        out = {}
        for k, v in host_batch.items():
            v = np.asarray(v)
            b = v.shape[batch_dim]
            shape = v.shape[:batch_dim] + (self.num_local, b // self.num_local) + v.shape[batch_dim + 1:]
            out[k] = np.moveaxis(v.reshape(shape), batch_dim, 0)
        return out

    def train(self, state: TrainState, host_batch_AxBxL: Batch, rng: jax.Array):
        state, metrics = self._p_train(state, self._split(host_batch_AxBxL, 1), rng)
        return state, jax.tree.map(lambda x: x[0], metrics)

    def evaluate(self, state: TrainState, host_batch_BxL: Batch):
        sums = self._p_eval(state.params, self._split(host_batch_BxL, 0))
        return jax.tree.map(lambda x: x[0], sums)


def make_driver(cfg, model, tx, schedule=None, devices=None):
    kw = dict(num_global_slots=cfg.num_global_slots, dropout=cfg.dropout, schedule=schedule, devices=devices)
    if cfg.driver == "pmap":
        drv = PmapDriver(model, tx, **kw)
    else:
        drv = MeshDriver(model, tx, mesh_data=cfg.mesh_data, mesh_fsdp=cfg.mesh_fsdp, **kw)
    shd.check_batch_divisible(cfg.batch_size, drv.num_devices, "batch_size")
    return drv


__all__ = [
    "TrainState", "decay_mask", "lr_schedule", "make_optimizer", "mlm_sums", "make_train_step",
    "make_eval_step", "finish_eval", "step_rng", "stack_micro_batches", "pad_eval_batch",
    "MeshDriver", "PmapDriver", "make_driver",
]
