"""The benchmark's bookkeeping: model FLOPs and the report rebuilt from a results file."""

import json
import os

import numpy as np
import pytest

from bench import common
from bench import run as bench_run


def case(**kw):
    return dict(dict(length=4096, window=512, globals=0, layers=2, batch=1), **kw)


def test_forward_flops_of_the_band():
    E, F, L, w = 768, 3072, 4096, 256
    per_layer = 2 * L * E * E * 4 + 2 * L * E * F * 2 + 2 * 2 * L * (2 * w + 1) * E
    assert common.forward_flops(case()) == 2 * per_layer
    assert common.step_flops(case(), "train") == 3 * common.forward_flops(dict(case(), mode="train"))


def test_global_flops_count_the_cheaper_exact_formulation():
    E, H, L, G = 768, 12, 4096, 32
    extra = common.forward_flops(case(globals=G)) - common.forward_flops(case())
    shared = 2 * G * E * E + 2 * 2 * L * G * E  # query_global, global columns of every query
    folded = 2 * 2 * H * G * E * L + 2 * 2 * H * G * E * (E // H)
    projected = 2 * L * E * E * 2 + 2 * 2 * G * L * E
    assert folded < projected
    assert extra == 2 * (shared + folded)
    # with many globals the projection is the cheaper one
    many = common.forward_flops(case(globals=512)) - common.forward_flops(case())
    assert many == 2 * (2 * 512 * E * E + 2 * 2 * L * 512 * E + 2 * L * E * E * 2 + 2 * 2 * 512 * L * E)


def test_report_is_rebuilt_from_results_json(tmp_path):
    src = os.path.join(bench_run.REPO, "bench", "results.json")
    bench_run.main(["--render", src, "--out", str(tmp_path)])
    md = (tmp_path / "results.md").read_text()
    raw = json.load(open(src))
    assert "| target | measured | met |" in md
    assert f"`{raw['command']}`" in md
    assert (tmp_path / "results.png").stat().st_size > 10_000


@pytest.mark.slow
def test_accelerator_bench_smoke(tmp_path):
    """bench.accelerator end to end at tiny sizes: the blocked path, a kernel (interpreted) and transformers."""
    from bench import accelerator

    out = tmp_path / "results_accelerator.md"
    rc = accelerator.main(["--smoke", "--implementations", "blocked,pallas-gpu", "--in-process", "--out", str(out)])
    raw = json.load(open(tmp_path / "results_accelerator.json"))
    errors = [r["result"].get("error") for r in raw["results"] if "error" in r["result"]]
    assert rc == 0 and not errors, errors
    rows = {r["impl"]: r for r in raw["rows"]}
    assert list(rows) == ["blocked", "pallas-gpu", "transformers"]
    for name in ("blocked", "pallas-gpu"):
        assert rows[name]["tokens_per_s"] > 0 and rows[name]["attention_tflops_per_s"] > 0
        assert rows[name]["vs_transformers"] == rows[name]["tokens_per_s"] / rows["transformers"]["tokens_per_s"]
    kernel = next(r["result"] for r in raw["results"] if r["impl"] == "pallas-gpu")
    assert kernel["interpret"] and kernel["routed_layers"] >= 1  # the model traced its band through the kernel
    text = out.read_text()
    assert "| pallas-gpu (interpreted) |" in text and "| transformers (float32) |" in text
    assert "goals apply to the full case only" in text
    # the FLOP count of the full case: the encoder's (bench.common) plus the MLM head, x3
    full = dict(accelerator.FULL, smoke=False)
    E, V, L, B = 768, 50265, 4096, 8
    enc = common.forward_flops(dict(length=L, batch=B, globals=32, window=128, layers=12))
    assert accelerator.step_flops(full) == 3 * (enc + 2 * B * L * (E * E + E * V))
    assert accelerator.attention_flops(full) == 3.5 * 4 * B * 12 * L * (129 + 32) * 64


def test_accelerator_bench_refuses_a_missing_device(capsys):
    from bench import accelerator

    assert accelerator.main(["--device", "gpu", "--out", "/nonexistent/x.md"]) == 2
    assert "error: --device gpu asked for, but JAX's backend is 'cpu'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the masked-LM case
TINY_MLM = dict(
    task="mlm",
    length=256,
    block=64,
    window=32,
    globals=4,
    layers=1,
    batch=2,
    modes=["train"],
    reps={"train": 1, "warmup": 1},
    vocab_size=300,
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=64,
    dtype="float32",
    device="cpu",
    block_size=None,
)


def test_mlm_case_is_the_seed_layout_masked_by_train_masking():
    case = dict(TINY_MLM, length=512, block=128)
    x = common.mlm_inputs(case)
    ids, am, gm, labels = x["input_ids"], x["attention_mask"], x["global_attention_mask"], x["labels"]
    assert ids.shape == (2, 512) and x["masked_positions"].shape == (2, 77)  # K = max_masked(512, 0.15)
    np.testing.assert_array_equal(np.nonzero(gm[0])[0], [0, 128, 256, 384])  # global on every block start
    assert (ids[:, 0] == 0).all() and (ids[:, 128::128] == 2).all()  # <s>, then </s> at each block start
    per_block = am.reshape(2, 4, 128).sum(-1)
    assert per_block.max() <= 127 and per_block.min() >= 64 and (am.reshape(2, 4, 128)[..., -1] == 0).all()
    labelled = labels != -100
    assert not (labelled & ((am == 0) | (gm == 1))).any()  # never padding, never a block start
    assert abs(labelled.sum() / ((am == 1) & (gm == 0)).sum() - 0.15) < 0.03
    for r in range(2):  # the slots JAX takes are the labels PyTorch takes
        used = x["masked_positions"][r][x["masked_positions"][r] >= 0]
        np.testing.assert_array_equal(used, np.nonzero(labelled[r])[0])
        np.testing.assert_array_equal(x["masked_labels"][r][: len(used)], labels[r][used])
    assert common.masked_tokens(case) == labelled.sum()
    # The model FLOPs: the encoder, then the LM head (dense, decoder) at the masked tokens only.
    E, V, n = 32, 300, int(labelled.sum())
    enc = common.forward_flops(dict(case, task=None, mode="fwd"))
    assert common.forward_flops(dict(case, masked_tokens=n)) == enc + 2 * n * (E * E + E * V)


@pytest.mark.slow  # both workers' masked-LM step, compiled and run (tiny sizes)
def test_mlm_case_runs_on_both_sides():
    """The workers' masked-LM step end to end at tiny sizes (JAX: masked slots; PyTorch: per-token labels)."""
    pytest.importorskip("torch")
    from bench import jax_case, torch_case

    for worker in (jax_case, torch_case):
        res = worker.run_case(dict(TINY_MLM, framework=worker.__name__.split(".")[-1].split("_")[0]))
        m = res["modes"]["train"]
        assert len(m["times_s"]) == 1 and m["times_s"][0] > 0 and m["peak_rss_bytes"] >= 0


def test_mlm_report_and_targets(tmp_path):
    case = dict(TINY_MLM, length=4096, block=128, window=128, globals=32, masked_tokens=540)

    def result(ms, mib):
        return {
            "modes": {
                "train": {
                    "times_s": [ms / 1e3] * 2,
                    "peak_rss_bytes": mib * 2**20,
                    "compile_s": 2.0,
                    "xla_memory": None,
                }
            }
        }

    raw = {
        "command": "python -m bench.run --cases mlm",
        "args": {"cases": "mlm", "cases_given": True, "malloc": "tuned", "peak_flops": None},
        "machine": {"device": "cpu", "date": "today", "cpus": 2, "jax": "x", "torch": "y", "transformers": "z"},
        "plan": {"layers": 2, "batch": 1, "dtype": "float32", "device": "cpu", "groups": ["mlm"]},
        "matmul": {"flops_per_s": 2e11, "by_shape": {"4096x4096x4096": 2e11}},
        "cases": [
            {"spec": dict(case, framework="jax"), "result": result(1000, 600)},
            {"spec": dict(case, framework="torch"), "result": result(2000, 1500)},
        ],
    }
    json.dump(raw, open(tmp_path / "in.json", "w"))
    bench_run.main(["--render", str(tmp_path / "in.json"), "--out", str(tmp_path)])
    md = (tmp_path / "results-mlm.md").read_text()
    assert "MLM train step (`LongformerForMaskedLM`, AdamW) at 4096 tokens" in md and "| **2.00x** |" in md
    assert "seed's layout: JAX/PyTorch tokens/s | 2.00x (goal >= 1.5x) | yes |" in md
    assert "| 600 MiB vs 1,500 MiB = 0.40 (goal <= 0.5) | yes |" in md
    assert "| window | globals | tokens |" not in md and not (tmp_path / "results.md").exists()
    assert bench_run.results_stem({"cases": "main,mlm", "cases_given": True}) == "results"
    assert bench_run.results_stem({"cases": "main", "cases_given": False}) == "results"  # --quick
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--cases", "mlm,nope"])
    p = bench_run.plan(bench_run.parse_args(["--cases", "mlm"]))
    assert [c["framework"] for c in p["cases"]] == ["jax", "torch"] and not p["compile_cases"]
    assert p["cases"][0]["masked_tokens"] == common.masked_tokens(p["cases"][0]) > 0
