"""Verification of a converted model against the PyTorch one (needs torch and transformers).

``verify_against_pytorch`` runs the ``transformers`` model of an HF directory and the Flax model on
the same random input (padding, a different number of global tokens per row) and returns the
largest absolute difference of their outputs. ``python -m convert.hf_to_flax --verify`` uses it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np

from longformer_jax.config import LongformerConfig
from longformer_jax.modeling import LongformerModel
from longformer_jax.pretrained import read_config_dict
from longformer_jax.tasks import TASKS, build_model


def _verify_inputs(config_dict: Mapping, task: str, seed: int, seq_len: int | None, num_global: int):
    rng = np.random.default_rng(seed)
    windows = config_dict.get("attention_window", 512)
    windows = list(windows) if isinstance(windows, (list, tuple)) else [windows]
    pad = int(config_dict.get("pad_token_id", 1))
    max_len = int(config_dict.get("max_position_embeddings", 514)) - pad - 1
    if seq_len is None:
        seq_len = min(max_len, 2 * max(windows) + 3)
    seq_len = max(2, min(seq_len, max_len))
    vocab = int(config_dict.get("vocab_size"))
    lo = min(5, vocab - 1)
    batch = 2
    ids = rng.integers(lo, vocab, size=(batch, seq_len)).astype(np.int64)
    attn = np.ones_like(ids)
    ids[1, -max(1, seq_len // 5) :] = pad  # second row padded at the end
    attn[1, -max(1, seq_len // 5) :] = 0
    glob = np.zeros_like(ids)
    glob[:, 0] = 1
    for row in range(batch):  # a different number of global tokens per row
        k = min(num_global - 1 + row, seq_len - 1)
        if k > 0:
            glob[row, rng.choice(np.arange(1, seq_len), size=k, replace=False)] = 1
    if task == "multiple-choice":
        ids, attn, glob = (np.stack([x, x[::-1]], axis=1) for x in (ids, attn, glob))
    return ids, attn, glob


def verify_against_pytorch(
    hf_dir: str | os.PathLike,
    config: LongformerConfig,
    params,
    task: str,
    *,
    seed: int = 0,
    seq_len: int | None = None,
    num_global: int = 3,
    log: Callable[[str], None] = print,
) -> float:
    """Runs the PyTorch model of ``hf_dir`` and the Flax model on the same random input; max abs diff.

    The input has padding and a few global tokens (a different number per row). Heads without a
    PyTorch class (document/sequential-sentence classification) compare the encoder output.
    """
    import torch
    import transformers

    hf_dir = Path(hf_dir)
    config_dict = read_config_dict(hf_dir)
    ids, attn, glob = _verify_inputs(config_dict, task, seed, seq_len, num_global)
    compare_task = task if TASKS[task].auto_class is not None else "base"
    auto = getattr(transformers, TASKS[compare_task].auto_class)
    pt_model = auto.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        pt_out = pt_model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(attn),
            global_attention_mask=torch.from_numpy(glob),
        )
    cfg32 = config.replace(dtype="float32")
    if compare_task == task:
        module, fparams = build_model(cfg32, task), params
    else:  # a head with no PyTorch class: compare the encoder
        fparams = params["longformer"]
        module = LongformerModel(cfg32, add_pooling_layer="pooler" in fparams)
    with jax.default_matmul_precision("highest"):
        fx_out = module.apply(
            {"params": fparams},
            ids.astype(np.int32),
            attention_mask=attn.astype(np.int32),
            global_attention_mask=glob.astype(np.int32),
            deterministic=True,
        )
    worst = 0.0
    for name in ("logits", "start_logits", "end_logits", "last_hidden_state"):
        a = getattr(pt_out, name, None)
        b = getattr(fx_out, name, None)
        if a is None or b is None:
            continue
        a = a.float().numpy()
        b = np.asarray(b, dtype=np.float32)
        if name == "last_hidden_state":  # pad positions are not compared (HF leaves them arbitrary)
            m = attn.reshape(attn.shape + (1,)).astype(bool)
            diff = float(np.max(np.abs(np.where(m, a - b, 0.0))))
        else:
            diff = float(np.max(np.abs(a - b)))
        log(f"verify {name} {tuple(a.shape)}: max abs diff PyTorch vs Flax = {diff:.3e}")
        worst = max(worst, diff)
    return worst
