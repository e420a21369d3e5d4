"""Compile-only sizing (train.aot, longformer_jax.targets): tiny models compiled for a 4-chip v5e and an H100.

The compilers come from the ``aot`` extra (libtpu, the CUDA plugin): tests that compile skip, naming
what is missing, where they are not importable.
"""

import json

import pytest

from longformer_jax import flops, targets
from train import finetune, pretrain

TINY = [
    *("--model", "hidden_size=64", "--model", "num_hidden_layers=2", "--model", "num_attention_heads=4"),
    *("--model", "intermediate_size=128", "--model", "attention_window=16", "--model", "vocab_size=512"),
    *("--preset", "demo", "--seq-len", "128", "--batch-size", "8", "--grad-accum-steps", "2", "--max-steps", "100"),
]
needs_tpu = pytest.mark.skipif(not targets.compiler_available("tpu"), reason="libtpu is not installed (the aot extra)")


def _run(program, argv, tmp_path_factory):
    """(exit status, JSON report or None, stdout, stderr) of `program.main(argv + --report FILE)`."""
    report = tmp_path_factory.mktemp("aot") / "report.json"
    rc = program.main([*argv, "--compile-only", "--report", str(report)])
    return rc, (json.loads(report.read_text()) if report.is_file() else None)


def test_targets_table():
    t = targets.get_target("v5e-8")
    assert (t.topology, t.num_devices, t.platform, t.memory_bytes) == ("v5e:2x4", 8, "tpu", 16 * targets.GiB)
    assert targets.get_target("v5p-8").num_devices == 4  # v5p counts TensorCores, two per chip
    assert targets.get_target("v5e:4x4").num_devices == 16  # any topology name of a known generation
    h = targets.get_target("h100x8")
    assert (h.platform, h.num_devices, h.topology) == ("cuda", 8, "1x1x8")
    assert "device_memory_size: 84942979072" in targets.gpu_target_config("h100")
    assert "collective_memory_granularity" not in targets.gpu_target_config("h100")
    with pytest.raises(ValueError, match=r"'v9-8' is not known; choose one of v4-8, .*h100"):
        targets.get_target("v9-8")
    with pytest.raises(ValueError, match="1 to 8"):
        targets.get_target("h100x16")


def test_compile_flags_need_a_target(capsys):
    assert pretrain.main(["--preset", "demo", "--compile-only"]) == 1
    assert "--compile-only needs --target NAME" in capsys.readouterr().err


@pytest.fixture(scope="module")
def v5e(tmp_path_factory):
    """The tiny pretraining run compiled for a v5e-4 with --fit (blocked, then splash where it compiles)."""
    if not targets.compiler_available("tpu"):
        pytest.skip("libtpu is not installed (the aot extra)")
    return _run(pretrain, [*TINY, "--target", "v5e-4", "--fit"], tmp_path_factory)


@pytest.fixture(scope="module")
def h100(tmp_path_factory):
    if not targets.compiler_available("cuda"):
        pytest.skip("the CUDA plugin is not installed (the aot extra)")
    return _run(pretrain, [*TINY, "--target", "h100", "--model", "attention_implementation=auto"], tmp_path_factory)


@pytest.mark.slow
def test_v5e_report(v5e):
    rc, r = v5e
    assert rc == 0 and r["fits"]
    assert (r["target"], r["num_devices"], r["device_memory_bytes"]) == ("v5e-4", 4, 16 * targets.GiB)
    b = r["per_device_bytes"]
    assert b["total"] == b["arguments"] + b["outputs"] - b["alias"] + b["temp"] > 0
    assert r["headroom_bytes"] == r["device_memory_bytes"] - r["peak_per_device_bytes"]
    # 16 rows of 128 tokens, 2 layers of window 16, a global slot per block, the LM head at the masked tokens
    cfg = pretrain.config_lib.parse_args(TINY)
    config, slots = pretrain.aot.model_config(cfg), cfg.seq_len // cfg.block_size
    head = cfg.mlm_probability * 128
    expected = flops.model_flops_per_step(config, rows=16, length=128, globals_=slots, head_tokens_per_row=head)
    assert r["model_flops_per_step"] == pytest.approx(expected)
    assert r["step_time_lower_bound_s"] == pytest.approx(expected / (4 * 197e12))
    assert r["run_time_lower_bound_days"] == pytest.approx(r["step_time_lower_bound_s"] * 100 / 86400)
    assert r["xla_flops_per_device"] > 0  # TPU's cost model reports them
    assert r["attention_implementation"] == "blocked" and r["kernel_calls"] == 0
    assert r["compile_seconds"] > 0


@pytest.mark.slow
def test_v5e_fit_choice_compiles_and_fits(v5e):
    _, r = v5e
    rec = r["recommended"]
    assert rec["fits"] and rec["total_bytes"] <= r["fit_limit_bytes"] == int(0.9 * r["usable_memory_bytes"])
    assert all(row["fits"] == (row["total_bytes"] <= r["fit_limit_bytes"]) for row in r["fit"] if "error" not in row)
    assert rec["batch_size"] * rec["grad_accum_steps"] == 16  # the global batch is kept
    assert f"--batch-size {rec['batch_size']} --grad-accum-steps {rec['grad_accum_steps']}" in rec["flags"]
    rows = {row["implementation"]: row for row in r["fit"]}
    assert rows["blocked"]["kernel_calls"] == 0
    assert rows["splash"]["kernel_calls"] > 0  # compiled for the TPU: Mosaic kernels in the program


@pytest.mark.slow
def test_h100_report(h100):
    rc, r = h100
    assert rc == 0 and r["fits"] and r["num_devices"] == 1
    assert r["device_memory_bytes"] == targets.CHIPS["h100"].memory_bytes
    assert r["xla_flops_per_device"] is None  # the CUDA plugin has no cost model: the model's count is used
    assert r["step_time_lower_bound_s"] == pytest.approx(r["model_flops_per_step"] / 989.4e12)
    # auto on a GPU target: the Triton kernels (the demo trains without dropout), whatever the host's backend
    assert r["attention_implementation"] == "pallas-gpu" and r["kernel_calls"] > 0


@pytest.mark.slow
@needs_tpu
def test_overflow_exits_1_with_one_error_line(tmp_path_factory, capsys):
    # 40M-token vocabulary: 10 GiB of float32 embeddings and twice that of Adam moments on one 16 GiB chip
    rc, r = _run(pretrain, [*TINY, "--model", "vocab_size=40000000", "--target", "v5e-1"], tmp_path_factory)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 1 and not r["fits"] and len(err) == 1
    assert "v5e-1: the step needs" in err[0] and "over by" in err[0] and "--remat" in err[0]


@pytest.mark.slow
@needs_tpu
def test_finetune_compile_only(tmp_path_factory):
    init = tmp_path_factory.mktemp("init")
    config = dict(
        model_type="longformer", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, attention_window=16, max_position_embeddings=258, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, type_vocab_size=1,
    )  # fmt: skip
    (init / "config.json").write_text(json.dumps(config))
    argv = ["--preset", "hat-ecthr", "--init", str(init), "--seq-len", "256", "--batch-size", "4", "--target", "v5e-4"]
    rc, r = _run(finetune, argv, tmp_path_factory)
    assert rc == 0 and r["fits"] and r["settings"]["seq_len"] == 256
    assert r["settings"]["dtype"] == "bfloat16" and r["settings"]["remat"]  # the preset's
    assert r["eval_per_device_bytes"]["total"] > 0


@pytest.mark.slow
@needs_tpu
def test_sequence_axis_compiles_for_the_target(tmp_path_factory):
    argv = [*TINY, "--seq-len", "512", "--model", "max_position_embeddings=600", "--batch-size", "1"]
    rc, r = _run(pretrain, [*argv, "--mesh", "data=1,sequence=4", "--target", "v5p-8"], tmp_path_factory)
    assert rc == 0 and r["fits"] and r["num_devices"] == 4 and r["settings"]["mesh"]["sequence"] == 4
    assert r["per_device_bytes"]["temp"] > 0 and r["eval_per_device_bytes"]["total"] > 0
