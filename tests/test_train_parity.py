"""Training parity with PyTorch: 20 AdamW steps of our train_step vs a plain torch loop.

Same initial weights (a random transformers LongformerForMaskedLM converted to Flax), the same
masked batches (our LM head at the masked slots only, PyTorch's at every position), dropout
off, the seed recipe's optimizer (lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 off
biases and LayerNorm, 10% warmup then linear decay, clipping at 1.0) scaled to 20 steps.
Per-step losses agree to 1e-4 relative.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import longformer_jax as lj  # noqa: E402
from train import config as config_lib  # noqa: E402
from train import trainer  # noqa: E402
from train.masking import MaskingSpec, mask_tokens  # noqa: E402
from train.objectives import mlm_objective  # noqa: E402

L, B, BLOCK, STEPS, VOCAB = 64, 4, 16, 20, 96
SPEC = MaskingSpec(mask_id=4, special_ids=np.arange(5), random_ids=np.arange(5, VOCAB))


def tiny_hf_config():
    return transformers.LongformerConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        attention_window=8,
        max_position_embeddings=L + 2,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        sep_token_id=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def masked_batches(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Blocks-layout-like batches: block starts global, some interior/trailing padding, 15% MLM
    (``train.masking``: per-token ``labels`` and the slots ``masked_positions`` / ``masked_labels``)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(5, VOCAB, size=(B, L)).astype(np.int32)
        am = np.ones((B, L), np.int32)
        gm = np.zeros((B, L), np.int32)
        ids[:, ::BLOCK] = 2
        ids[:, 0] = 0
        gm[:, ::BLOCK] = 1
        for r in range(B):  # padding at the end of some blocks and of the row
            cut = int(rng.integers(BLOCK // 2, BLOCK))
            blk = int(rng.integers(0, L // BLOCK))
            ids[r, blk * BLOCK + cut : (blk + 1) * BLOCK] = 1
        ids[1, L - 20 :] = 1
        ids[1, L - 16] = 1
        am = (ids != 1).astype(np.int32)
        gm = gm * am
        # fairseq's RoBERTa masking with its slots: our LM head runs at the masked slots only, PyTorch's
        # at every position over the per-token labels (the same math).
        out.append(mask_tokens({"input_ids": ids, "attention_mask": am, "global_attention_mask": gm}, rng, SPEC))
    return out


def recipe_config(**kw) -> config_lib.TrainConfig:
    # The seed recipe's optimizer, scaled to STEPS steps; a tiny model.
    return config_lib.preset(
        "seed-recipe",
        max_steps=STEPS,
        batch_size=B,
        grad_accum_steps=1,
        seq_len=L,
        block_size=BLOCK,
        dropout=False,
        dtype="float32",
        remat=False,
        init=None,
        **kw,
    )


def torch_losses(hf_model, batches) -> list[float]:
    from transformers import get_linear_schedule_with_warmup

    cfg = recipe_config()
    decay_names = hf_decay_parameter_names(hf_model)
    groups = [
        {
            "params": [p for n, p in hf_model.named_parameters() if n in decay_names],
            "weight_decay": cfg.weight_decay,
        },
        {"params": [p for n, p in hf_model.named_parameters() if n not in decay_names], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    sched = get_linear_schedule_with_warmup(opt, cfg.warmup_steps, cfg.max_steps)
    hf_model.train()  # dropout probabilities are 0
    losses = []
    for b in batches:
        t = {
            k: torch.from_numpy(b[k].astype(np.int64))
            for k in ("input_ids", "attention_mask", "global_attention_mask", "labels")
        }
        out = hf_model(**t)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), cfg.clip_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    return losses


def hf_decay_parameter_names(hf_model) -> set[str]:
    """The HF Trainer's rule: no decay on LayerNorm weights and on any `bias`."""
    from transformers.trainer_pt_utils import get_parameter_names

    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return set(get_parameter_names(hf_model, [torch.nn.LayerNorm], forbidden))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    hf_model = transformers.LongformerForMaskedLM(tiny_hf_config()).float()
    sd = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
    lj_cfg = lj.LongformerConfig.from_dict(tiny_hf_config().to_dict())
    params = lj.params_from_state_dict(sd, lj_cfg, "masked-lm")
    return hf_model, lj.LongformerForMaskedLM(lj_cfg), params


def test_decay_mask_matches_hf_trainer(setup):
    hf_model, _, params = setup
    hf_decay = hf_decay_parameter_names(hf_model)
    mask = trainer.decay_mask(params)
    flat = {"/".join(str(getattr(k, "key", k)) for k in kp): v for kp, v in jax.tree_util.tree_leaves_with_path(mask)}
    sd_names = {n for n, _ in hf_model.named_parameters()}
    ours = set()
    for path, decayed in flat.items():
        if decayed:
            head, leaf = path.rsplit("/", 1)
            name = head.replace("/", ".").replace("layer_", "layer.") + ".weight"
            ours.add(name)
    assert ours <= sd_names
    # lm_head.decoder.weight is the word-embedding table itself (tied): decayed on both sides.
    assert ours == hf_decay - {"lm_head.decoder.weight"}
    assert not flat["lm_head/bias"] and not flat["longformer/embeddings/LayerNorm/scale"]


def test_schedule_matches_hf():
    from transformers import get_linear_schedule_with_warmup

    for steps, warm in [(20, 2), (50_000, 5000), (7, 0)]:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1e-4)
        sched = get_linear_schedule_with_warmup(opt, warm, steps)
        ours = trainer.lr_schedule(1e-4, steps, warm)
        for s in sorted({0, 1, max(warm - 1, 0), warm, warm + 1, steps // 2, steps - 1, steps}):
            while sched.last_epoch < s:
                opt.step()
                sched.step()
            assert math.isclose(float(ours(s)), opt.param_groups[0]["lr"], rel_tol=1e-5, abs_tol=1e-12), (
                steps,
                s,
            )
    assert recipe_config().warmup_steps == 2
    assert config_lib.preset("seed-recipe").warmup_steps == 5000


@pytest.mark.slow
def test_twenty_steps_match_pytorch(setup):
    hf_model, model, params = setup
    batches = masked_batches(STEPS)
    with jax.default_matmul_precision("highest"):
        cfg = recipe_config()
        tx, schedule = trainer.make_optimizer(cfg)
        drv = trainer.MeshDriver(
            model,
            tx,
            mlm_objective(L // BLOCK),
            dropout=False,
            schedule=schedule,
            devices=jax.devices()[:1],
        )
        state = drv.create_state(params)
        ours = []
        for i, b in enumerate(batches):
            state, m = drv.train(state, trainer.stack_micro_batches([b]), jax.random.PRNGKey(i))
            ours.append(float(m["loss"]))
    theirs = torch_losses(hf_model, batches)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert ours[-1] < ours[0]
