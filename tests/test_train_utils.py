"""Config presets and CLI, checkpoint manager, metrics and plot; helpers for the other train tests."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import checkpoint as ckpt_lib
from train import config as config_lib
from train import metrics as metrics_lib
from train import trainer
from train.objectives import mlm_objective

ROOT = Path(__file__).resolve().parents[1]

# A tiny model and data layout for end-to-end runs of the CLI (seconds per step on 2 cores).
TINY = [
    "--model",
    "hidden_size=32",
    "num_hidden_layers=2",
    "num_attention_heads=4",
    "intermediate_size=64",
    "attention_window=8",
    "--seq-len",
    "64",
    "--block-size",
    "16",
    "--tokenizer-vocab-size",
    "300",
    "--min-doc-tokens",
    "50",
    "--eval-docs",
    "1",
    "--eval-batches",
    "1",
    "--log-every",
    "1",
    "--no-progress-bar",
]


def env_with_root(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def write_corpus(path: Path, n_docs: int = 12, words: int = 400, seed: int = 0) -> Path:
    """Synthetic English-like documents (sentences of common words) as JSON lines."""
    rng = np.random.default_rng(seed)
    vocab = (
        "the a an of to in and is was for on with as by at from that this it be are were has have "
        "model data long document attention window token block global local layer train step "
        "value key query weight sequence text word sentence paper result time first second new"
    ).split()
    docs = []
    for _ in range(n_docs):
        sents, n = [], 0
        while n < words:
            k = int(rng.integers(6, 16))
            sents.append(" ".join(rng.choice(vocab, k)).capitalize() + ".")
            n += k
        docs.append(json.dumps({"text": " ".join(sents)}))
    path.write_text("\n".join(docs) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# config


def test_seed_recipe_preset_is_the_spec():
    c = config_lib.preset("seed-recipe")
    assert (c.learning_rate, c.adam_beta1, c.adam_beta2, c.adam_eps, c.weight_decay) == (
        1e-4,
        0.9,
        0.999,
        1e-8,
        0.01,
    )
    assert (c.warmup_fraction, c.max_steps, c.batch_size, c.grad_accum_steps) == (0.1, 50_000, 16, 8)
    assert c.global_batch_size == 128 and c.warmup_steps == 5000
    assert (c.seed, c.seq_len, c.mlm_probability, c.clip_norm) == (42, 4096, 0.15, 1.0)
    assert (c.layout, c.block_size, c.num_global_slots, c.min_doc_tokens) == ("blocks", 128, 32, 1024)
    assert c.data == "data/c4" and c.eval_docs == 1000  # C4 prepared by train.prepare_data (docs/pretraining.md)
    assert c.init == "kiddothe2b/longformer-base-4096"
    c.validate()
    d = config_lib.preset("demo")
    d.validate()
    assert d.data == "builtin:python-docs" and d.init is None and d.model["hidden_size"] <= 256
    assert c.model["attention_window"] == 128 and c.model["layer_norm_eps"] == 1e-5


def test_cli_flags_set_and_presets(capsys):
    c = config_lib.parse_args(
        [
            "--preset",
            "seed-recipe",
            "--max-steps",
            "20",
            "--set",
            "learning_rate=3e-4",
            "--no-dropout",
            "--tokenizer",
            "tok/dir",
            "--init",
            "none",
            "--seed",
            "7",
            "--save-every",
            "5",
            "--eval-every",
            "4",
            "--output-dir",
            "x",
            "--data",
            "d.txt",
        ]
    )
    assert (c.max_steps, c.learning_rate, c.dropout, c.tokenizer, c.init, c.seed) == (
        20,
        3e-4,
        False,
        "tok/dir",
        None,
        7,
    )
    assert (c.save_every, c.eval_every, c.output_dir, c.data, c.preset) == (5, 4, "x", "d.txt", "seed-recipe")
    assert c.batch_size == 16  # untouched preset value
    assert c.model == {}  # another init than the preset's: the preset's model does not apply
    with pytest.raises(ValueError, match="unknown setting 'learning_rat'"):
        config_lib.parse_args(["--set", "learning_rat=1"])
    with pytest.raises(SystemExit):
        config_lib.parse_args(["--max-steps", "many"])
    assert "--max-steps 'many': expected a value of type int" in capsys.readouterr().err
    with pytest.raises(ValueError, match="seq_len=500 is not a multiple of block_size=32"):
        config_lib.parse_args(["--seq-len", "500"])
    with pytest.raises(ValueError, match="preset='nope' is unknown"):
        config_lib.preset("nope")


def test_model_settings_are_one_mapping_over_the_preset():
    c = config_lib.parse_args(
        [
            "--model",
            "hidden_size=64",
            "intermediate_size=96",
            "--set",
            "model.attention_window=[4,8]",
            "--model",
            "hidden_dropout_prob=0",
            "--seq-len",
            "128",
            "--block-size",
            "32",
        ]
    )
    assert c.model == {
        **config_lib.DEMO_MODEL,
        "hidden_size": 64,
        "intermediate_size": 96,
        "attention_window": [4, 8],
        "hidden_dropout_prob": 0.0,
    }
    assert isinstance(c.model["hidden_dropout_prob"], float)
    assert c.model_options()["attention_window"] == [4, 8] and c.model_options()["dtype"] == "float32"
    assert config_lib.preset("demo", model={"hidden_size": 64}).model["num_hidden_layers"] == 2
    # The old per-field spellings name their replacement; bad fields and values name the problem.
    with pytest.raises(ValueError, match=r"hidden_size is a model field: use --model hidden_size="):
        config_lib.parse_args(["--set", "hidden_size=64"])
    with pytest.raises(SystemExit):
        config_lib.parse_args(["--hidden-size", "64"])
    for argv, match in [
        (["--model", "hidden=3"], "model.hidden is not a LongformerConfig field"),
        (["--model", "dtype=bfloat16"], "use --dtype instead"),
        (["--set", "model.pad_token_id=3"], "comes from the tokenizer"),
        (["--model", "hidden_size"], "expected KEY=VALUE"),
        (["--model", "layer_norm_eps=small"], "expected a number"),
        (["--model", "hidden_size=30"], "--model: LongformerConfig: hidden_size=30 is not divisible"),
        (["--model", "attention_window=48"], "not a multiple of the model's attention window 48"),
    ]:
        with pytest.raises(ValueError, match=match):
            config_lib.parse_args(argv)


def test_config_json_round_trip_and_fingerprint(tmp_path):
    c = config_lib.preset("demo", max_steps=7)
    c.save(tmp_path / "c.json")
    back = config_lib.TrainConfig.load(tmp_path / "c.json")
    assert back == c
    assert back.fingerprint() == c.fingerprint()
    resumable = c.replace(save_every=3, output_dir="elsewhere", driver="pmap", dtype="bfloat16", mesh_fsdp=2)
    assert resumable.fingerprint() == c.fingerprint() and resumable.differences(c) == {}
    assert c.replace(learning_rate=1.0).fingerprint() != c.fingerprint()
    # Every setting counts unless it is listed as resumable, the model's fields one by one.
    names = {f.name for f in dataclasses.fields(config_lib.TrainConfig)}
    assert set(config_lib.TrainConfig.RESUMABLE_CHANGES) < names
    assert {"seed", "data", "init", "layout", "scan_layers", "max_steps"} <= set(c.fingerprint_fields())
    wider = c.replace(model={**c.model, "hidden_size": 256})
    assert wider.differences(c) == {"model.hidden_size": (128, 256)}
    dropped = c.replace(model={k: v for k, v in c.model.items() if k != "layer_norm_eps"})
    assert dropped.differences(c) == {"model.layer_norm_eps": (1e-5, None)}


# ----------------------------------------------------------------------------------------------
# optimizer pieces


def test_decay_mask_names():
    params = {
        "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
        "LayerNorm": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
        "emb": {"embedding": jnp.ones((3, 2))},
        "lm_head": {"bias": jnp.ones(3)},
    }
    m = trainer.decay_mask(params)
    assert m == {
        "dense": {"kernel": True, "bias": False},
        "LayerNorm": {"scale": False, "bias": False},
        "emb": {"embedding": True},
        "lm_head": {"bias": False},
    }


def test_mlm_sums_and_finish_eval_are_exact_over_batches():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    labels = jnp.asarray([[1, -100, 3, -100, 0], [-100, -100, -100, -100, 6]])
    obj = mlm_objective(0)

    class Fixed:  # a "model" whose logits are given: the objective's own arithmetic is checked
        def apply(self, variables, input_ids, **kw):
            assert kw["num_global_slots"] == 0 and kw["deterministic"] and kw["rngs"] is None
            return type("Out", (), {"logits": logits})

    loss_sum, sums = obj.sums(
        Fixed(),
        {},
        {"input_ids": None, "attention_mask": None, "global_attention_mask": None, "labels": labels},
        None,
        True,
    )
    lp = jax.nn.log_softmax(logits)
    ref = -(lp[0, 0, 1] + lp[0, 2, 3] + lp[0, 4, 0] + lp[1, 4, 6])
    np.testing.assert_allclose(loss_sum, ref, rtol=1e-6)
    correct = sum(int(jnp.argmax(logits[r, c]) == labels[r, c]) for r, c in [(0, 0), (0, 2), (0, 4), (1, 4)])
    assert float(sums["accuracy"]) == correct and obj.metrics == ("accuracy",)
    assert float(obj.count({"labels": labels})) == 4.0
    res = trainer.finish_eval(
        [{"loss": 3.0, "accuracy": 1.0, "count": 2.0}, {"loss": 1.0, "accuracy": 1.0, "count": 6.0}], obj
    )
    assert res == {"loss": 0.5, "accuracy": 0.25, "bpc": 0.5 / np.log(2), "count": 8.0}
    assert trainer.finish_eval([]) == {}


def test_mlm_objective_uses_the_masked_slots():
    """With masked_positions in the batch, the model is asked for the slots only and the loss, accuracy and
    count are over masked_labels; the numbers equal those of the same labels per token."""
    from train.masking import masked_slots

    rng = np.random.default_rng(1)
    logits_full = jnp.asarray(rng.normal(size=(2, 6, 7)), jnp.float32)
    labels = np.asarray([[1, -100, 3, -100, 0, -100], [-100, -100, -100, -100, 6, -100]])
    positions, slot_labels = masked_slots(labels, 4)
    obj = mlm_objective(2)

    class Slots:  # returns the full logits gathered at the slots it is asked for
        def apply(self, variables, input_ids, **kw):
            pos = np.asarray(kw["masked_positions"])
            assert kw["num_global_slots"] == 2 and pos.shape == (2, 4)
            return type("Out", (), {"logits": jnp.take_along_axis(logits_full, jnp.maximum(pos, 0)[..., None], 1)})

    class Full:
        def apply(self, variables, input_ids, **kw):
            assert "masked_positions" not in kw
            return type("Out", (), {"logits": logits_full})

    common = {"input_ids": None, "attention_mask": None, "global_attention_mask": None, "labels": labels}
    sliced = {**common, "masked_positions": positions, "masked_labels": slot_labels}
    loss_s, sums_s = obj.sums(Slots(), {}, sliced, None, True)
    loss_f, sums_f = obj.sums(Full(), {}, common, None, True)
    np.testing.assert_allclose(loss_s, loss_f, rtol=1e-6)
    assert float(sums_s["accuracy"]) == float(sums_f["accuracy"])
    assert float(obj.count(sliced)) == float(obj.count(common)) == 4.0
    # The count is the masked labels' (an evaluation filler row has -100 in every slot).
    assert float(obj.count({**sliced, "masked_labels": np.full_like(slot_labels, -100)})) == 0.0


# ----------------------------------------------------------------------------------------------
# checkpoints, metrics


def test_checkpointer_keeps_last_k_and_restores_data_state(tmp_path):
    ck = ckpt_lib.Checkpointer(tmp_path / "ck", keep=2)
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(0)}
    for s in (1, 2, 3):
        ck.save(s, {**state, "step": jnp.int32(s)}, {"next_index": s * 8}, {"fingerprint": "f", "step": s})
    assert ck.save(3, state, {}, {}) is False  # an existing step is never overwritten
    ck.wait()
    assert ck.all_steps() == [2, 3] and ck.latest_step() == 3
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    st, data_state, meta = ck.restore(3, abstract)
    assert int(st["step"]) == 3 and data_state == {"next_index": 24} and meta["fingerprint"] == "f"
    np.testing.assert_array_equal(st["w"], state["w"])
    ck.close()
    assert (tmp_path / "ck" / "3" / "data" / "process_0-of-1.json").exists()
    assert ckpt_lib.from_jsonable(ckpt_lib.to_jsonable(b"abc")) == b"abc"


def test_metrics_jsonl_tensorboard_and_plot(tmp_path):
    log = metrics_lib.MetricsLogger(tmp_path)
    for s in range(1, 6):
        log.write("train", s, {"loss": 5.0 / s, "accuracy": 0.1 * s, "lr": 1e-3, "note": "x"})
    log.write("eval", 5, {"loss": 1.5, "accuracy": 0.4, "bpc": 1.5 / np.log(2)})
    log.close()
    recs = metrics_lib.read_metrics(tmp_path)
    assert len(recs) == 6 and recs[0]["split"] == "train" and "note" not in recs[0]
    assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())
    assert metrics_lib.main([str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert metrics_lib.main([str(tmp_path / "nope")]) == 2


def test_plot_title_is_the_command_and_its_summary_not_the_directory(tmp_path):
    run = tmp_path / "demo2"
    log = metrics_lib.MetricsLogger(run, tensorboard=False)
    log.write("eval", 0, {"loss": 7.6732, "accuracy": 0.0, "bpc": 7.6732 / np.log(2)})
    log.write("eval", 3000, {"loss": 2.91, "accuracy": 0.49, "bpc": 2.91 / np.log(2)})
    log.close()
    (run / "config.json").write_text(json.dumps({"preset": "demo"}))
    evals = [r for r in metrics_lib.read_metrics(run) if r["split"] == "eval"]
    title = metrics_lib.run_title(run, evals)
    assert title == (
        "make demo: python -m train.pretrain --preset demo\n"
        "eval loss 7.6732 -> 2.9100 (bpc 11.070 -> 4.198, accuracy 0.000 -> 0.490)"
    )
    assert "demo2" not in title
    (run / "config.json").write_text(json.dumps({"preset": "hat", "task": "multiple-choice"}))
    assert metrics_lib.run_title(run, []) == "python -m train.finetune --preset hat --task multiple-choice"
