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
