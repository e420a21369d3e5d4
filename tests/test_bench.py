"""The benchmark's bookkeeping: model FLOPs and the report rebuilt from a results file."""

import json
import os

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
