"""PyTorch side of one benchmark case, run in its own process: ``python -m bench.torch_case '<case json>'``.

The ``transformers`` Longformer with the same config and inputs as the JAX side: ``fwd`` is
``LongformerModel`` in eval mode under ``torch.no_grad``; ``train`` is
``LongformerForTokenClassification`` in train mode (dropout on), ``loss.backward()`` and an AdamW
step; the masked-LM case (``task="mlm"``) trains ``LongformerForMaskedLM`` the same way, with its
standard full-vocabulary head and per-token labels (what users of ``transformers`` run).
``{"kind": "matmul"}`` measures ``torch.mm`` FLOP/s for reference.
"""

from __future__ import annotations

import gc
import json
import sys
import time

from bench import common


def _torch(case_or_spec: dict):
    import torch

    torch.set_num_threads(common.cpu_count())
    return torch


def matmul_flops(spec: dict) -> dict:
    torch = _torch(spec)
    dev = "cuda" if spec.get("device") == "gpu" else "cpu"
    dtype = getattr(torch, spec.get("dtype", "float32"))
    n = 4096
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)

    def run():
        torch.mm(a, b)
        if dev == "cuda":
            torch.cuda.synchronize()

    t = common.time_calls(run, 3)
    return {"kind": "matmul", "framework": "torch", "flops_per_s": 2.0 * n**3 / min(t)}


def _reps(case: dict, mode: str) -> int:
    r = case["reps"]
    return int(r[mode]) if isinstance(r, dict) else int(r)


def _measure(case: dict, mode: str, arrays: dict, rss: common.PeakRSS) -> dict:
    """Time ``mode`` of the case; memory above the state before the timed calls."""
    import torch
    import transformers

    dev = "cuda" if case.get("device") == "gpu" else "cpu"
    dtype = torch.bfloat16 if case.get("dtype") == "bfloat16" else torch.float32
    kw = common.model_kwargs(case)
    gm = arrays["global_attention_mask"] if case["globals"] else None
    torch.manual_seed(0)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    if mode == "fwd":
        cfg = transformers.LongformerConfig(**kw, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = transformers.LongformerModel(cfg, add_pooling_layer=False).to(dev, dtype).eval()

        def run():
            with torch.no_grad():
                model(arrays["input_ids"], attention_mask=arrays["attention_mask"], global_attention_mask=gm)
            sync()

    else:
        cfg = transformers.LongformerConfig(
            **kw,
            num_labels=common.NUM_LABELS,
            hidden_dropout_prob=common.DROPOUT,
            attention_probs_dropout_prob=common.DROPOUT,
        )
        head = (
            transformers.LongformerForMaskedLM
            if case.get("task") == "mlm"
            else transformers.LongformerForTokenClassification
        )
        model = head(cfg).to(dev, dtype).train()
        opt = torch.optim.AdamW(model.parameters(), lr=common.LEARNING_RATE, weight_decay=common.WEIGHT_DECAY)

        def run():
            out = model(
                arrays["input_ids"],
                attention_mask=arrays["attention_mask"],
                global_attention_mask=gm,
                labels=arrays["labels"],
            )
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()

    base = 0
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss.reset()  # the optimizer state (created on the first step) is part of the measured memory
    first = {}
    times = common.time_calls(
        run, _reps(case, mode), common.warmup_calls(case), after_first=lambda: first.update(b=rss.peak_bytes())
    )
    entry = {"times_s": times, "peak_rss_bytes": first["b"], "peak_rss_all_calls_bytes": rss.peak_bytes()}
    if dev == "cuda":
        entry["peak_device_bytes"] = torch.cuda.max_memory_allocated() - base
    return entry


def run_case(case: dict) -> dict:
    torch = _torch(case)
    import transformers

    transformers.logging.set_verbosity_error()
    dev = "cuda" if case.get("device") == "gpu" else "cpu"
    arrays = {k: torch.tensor(v, device=dev) for k, v in common.case_inputs(case).items()}
    rss = common.PeakRSS()
    result = {"case": case, "modes": {}}
    for mode in case["modes"]:
        result["modes"][mode] = _measure(case, mode, arrays, rss)
        gc.collect()
    return result


def main(argv=None) -> None:
    spec = json.loads((argv or sys.argv[1:])[0])
    t0 = time.perf_counter()
    if spec.get("kind") == "matmul":
        out = matmul_flops(spec)
    else:
        out = run_case(spec["case"])
    out["worker_s"] = time.perf_counter() - t0
    common.emit(out)


if __name__ == "__main__":
    main()
