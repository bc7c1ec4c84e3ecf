"""`prefixlm bench train`, bench/convergence.py and bench/seed_validation.py on CPU (tiny shapes).

The GPU figures themselves come from the H200; these tests guard that the tools run end to end,
draw the spec's batches, count FLOPs as documented and write the fields the reports read.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefixlm.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
# Spec lengths shrunk so that a tiny model steps in milliseconds on CPU.
SMALL = ["--preset", "tiny", "--capacity", "512", "--max-prefix", "64", "--max-causal", "32",
         "--vocab", "512"]
RECORD_FIELDS = ("tokens_per_s", "tokens_per_s_per_gpu", "step_ms_median", "tflops_per_gpu",
                 "mfu", "peak_mem_gib", "vs_flex", "params", "warmup_s",
                 "graphs_compiled_during_timing")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _script(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_cli_on_cpu(tmp_path, capsys):
    """Guards `prefixlm bench train` end to end: both archs, a backend that trains (sdpa), one that
    cannot train on CPU (flex: forward only there) reported instead of aborting the run, fa3
    skipped with its reason, and the JSON fields."""
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "train", *SMALL, "--steps", "2", "--warmup", "1", "--no-compile",
                     "--backends", "sdpa,flex,fa3", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["capacity"] == 512 and data["meta"]["world_size"] == 1
    records = {(r["arch"], r["backend"]): r for r in data["records"]}
    assert set(records) == {(a, b) for a in ("transformer", "hrm") for b in ("sdpa", "flex", "fa3")}
    for arch in ("transformer", "hrm"):
        ok = records[arch, "sdpa"]
        assert ok["error"] is None
        for field in RECORD_FIELDS:
            assert field in ok, field
        assert ok["tokens_per_s"] > 0 and 0 < ok["mfu"] < 1 and ok["vs_flex"] is None
        assert ok["tokens_per_s"] == pytest.approx(ok["tokens_per_s_per_gpu"])
        assert "backward" in records[arch, "flex"]["error"]
        assert records[arch, "fa3"]["error"].startswith("skipped")
    # HRM runs 4x the transformer's block calls per forward (two H cycles of one H and three L
    # steps) on the tiny preset: its step costs more.
    hrm, transformer = records["hrm", "sdpa"], records["transformer", "sdpa"]
    assert hrm["step_ms_median"] > transformer["step_ms_median"]
    assert "| transformer | sdpa |" in capsys.readouterr().out


def test_bench_train_compiled_does_not_recompile_between_batches(tmp_path):
    """Guards the timed steps paying for recompiles: with torch.compile on (the default), batches
    of new compositions at the same capacity reuse the warm-up's graphs."""
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "train", *SMALL, "--steps", "2", "--warmup", "1",
                     "--backends", "sdpa", "--archs", "transformer", "--json", str(out)]) == 0
    record = json.loads(out.read_text())["records"][0]
    assert record["error"] is None and record["graphs_compiled_total"] > 0
    assert record["graphs_compiled_during_timing"] == 0


def test_bench_train_under_torchrun(tmp_path):
    """Guards the FSDP2 path (torchrun, gloo on CPU): every rank steps, rank 0 writes the JSON,
    and tokens/s over both ranks is twice the per-GPU figure."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "prefixlm", "bench", "train", *SMALL, "--steps", "2", "--warmup", "1",
           "--no-compile", "--backends", "sdpa", "--archs", "transformer", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())["records"][0]
    assert record["world_size"] == 2 and record["error"] is None
    assert record["tokens_per_s"] == pytest.approx(2 * record["tokens_per_s_per_gpu"])


def test_convergence_script_on_cpu(tmp_path):
    """Guards bench/convergence.py end to end: two runs from the same seed on the same batches,
    per-step losses in the JSON, the stated rule applied, the plot written when matplotlib is
    there. fp32 on CPU: sdpa and the reference agree far inside the bf16 tolerance."""
    convergence = _script("convergence")
    code = convergence.main(["--preset", "tiny", "--steps", "3", "--capacity", "512",
                             "--max-prefix", "64", "--max-causal", "32", "--vocab", "512",
                             "--backends", "sdpa,reference", "--no-compile",
                             "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "convergence_tiny_sdpa_vs_reference.json").read_text())
    assert [run["backend"] for run in data["runs"]] == ["sdpa", "reference"]
    assert all(len(run["loss"]) == 3 for run in data["runs"])
    result = data["comparison"]
    assert result["ok"] and result["max_windowed"] < 1e-5 and "window" in data["meta"]["rule"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "convergence_tiny_sdpa_vs_reference.png").stat().st_size > 0


def test_convergence_rule():
    """Guards the rule itself: bf16-sized noise passes; a 2% final gap or one diverging window
    fails; NaN fails."""
    compare = _script("convergence").compare
    base = [5.0 - 0.01 * i for i in range(50)]
    assert compare([x * (1 + 1e-3 * (-1) ** i) for i, x in enumerate(base)], base)["ok"]
    assert not compare([x * 1.02 for x in base], base)["ok"]
    spike = base[:20] + [x * 1.2 for x in base[20:30]] + base[30:]
    result = compare(spike, base)
    assert not result["ok"] and result["final_relative_diff"] == 0
    assert not compare(base[:-1] + [float("nan")], base)["ok"]


def test_seed_validation_on_cpu(tmp_path):
    """Guards bench/seed_validation.py end to end: a run crossing all-zero-causal batches, the
    deterministic rerun, the zero-causal K/V rows against the reference (sdpa, fp32, GQA), flex
    and fa3 skipped on CPU with their reasons."""
    out = tmp_path / "seed.json"
    code = _script("seed_validation").main([
        "--device", "cpu", "--backends", "sdpa,flex,fa3", "--capacity", "512", "--heads", "4",
        "--kv-heads", "2", "--head-dim", "32", "--max-prefix", "64", "--max-causal", "32",
        "--run-preset", "tiny", "--run-capacity", "512", "--run-steps", "4", "--vocab", "512",
        "--json", str(out)])
    assert code == 0
    results = {(r["check"], r["backend"]): r for r in json.loads(out.read_text())["results"]}
    for check in ("zero_causal_run", "deterministic", "zero_causal_kv_grad"):
        assert results[check, "sdpa"]["ok"] is True, results[check, "sdpa"]
        assert results[check, "flex"]["ok"] is None and results[check, "fa3"]["ok"] is None
    steps = results["zero_causal_run", "sdpa"]["steps"]
    assert [s["all_zero_causal"] for s in steps] == [False, True, False, True]
    assert all(s["supervised_tokens"] > 0 for s in steps)


@pytest.mark.gpu
@gpu
def test_gpu_tools_smoke(tmp_path):
    """Guards the CUDA paths of the tools (bf16 autocast, torch.compile, triton and flex training,
    peak memory) before the long H200 runs: a tiny preset, two steps."""
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "train", *SMALL, "--steps", "2", "--warmup", "1",
                     "--backends", "triton,flex", "--profile", "1", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert all(r["error"] is None and r["peak_mem_gib"] > 0 for r in records), records
    assert all(r["vs_flex"] > 0 for r in records)
    for r in records:  # the GPU timeline of the profiled step
        prof = r["profile"]
        assert 0 < prof["gpu_busy_ms"] <= prof["gpu_span_ms"] and prof["gpu_overlap_ms"] >= 0
    code = _script("seed_validation").main([
        "--backends", "triton", "--capacity", "4096", "--run-preset", "tiny",
        "--run-capacity", "4096", "--run-steps", "4", "--vocab", "512", "--compile",
        "--json", str(tmp_path / "seed.json")])
    assert code == 0
    assert _script("flex_first_steps").main(["--preset", "tiny", "--capacity", "4096",
                                             "--steps", "2"]) == 0


def test_bench_train_profile_on_cpu(tmp_path, capsys):
    """--profile N adds a per-category breakdown whose parts sum to the profiled total, with the
    attention and matmul operators both present, and prints it as a table."""
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "train", *SMALL, "--steps", "1", "--warmup", "0", "--no-compile",
                     "--backends", "sdpa", "--archs", "transformer", "--profile", "2",
                     "--json", str(out)]) == 0
    record = json.loads(out.read_text())["records"][0]
    prof = record["profile"]
    assert prof["steps"] == 2 and prof["ms_per_step"] > 0
    assert prof["categories"]["attention"] > 0 and prof["categories"]["matmul"] > 0
    assert sum(prof["categories"].values()) == pytest.approx(prof["ms_per_step"], rel=1e-3)
    assert len(prof["top"]) > 0
    printed = capsys.readouterr().out
    assert "profile: self CPU time of operators" in printed and "| transformer | sdpa |" in printed


def test_hf_baselines_train_the_same_task_from_the_same_weights():
    """Guards the transformers baselines of `bench train` measuring another task: from the same
    weights, the padded batch (SDPA with transformers' token_type_ids mask) and the packed batch
    (prefixlm's registered attention) give our model's loss on the same packed batch (fp32, CPU)."""
    from prefixlm.bench.spec import SpecLoader
    from prefixlm.bench.train import _hf_model, bench_config, padded_hf_batch
    from prefixlm.model import PrefixLM

    cfg = bench_config("tiny", 256, 97, False, "cpu", "hrm", "sdpa", ["model.layers=2"],
                       "/tmp/unused")
    batch = SpecLoader(256, 97, max_prefix=40, max_causal=20).batch(0)
    torch.manual_seed(cfg.seed)
    ours = PrefixLM(cfg.model, backend="sdpa")
    ours.bp_steps = None
    logits = ours(batch.inputs, batch.position_ids, batch.info)
    expected = torch.nn.functional.cross_entropy(logits, batch.labels, ignore_index=-100)
    padded = _hf_model(cfg, torch.device("cpu"), "hf_padded")(**padded_hf_batch(batch)).loss
    packed = _hf_model(cfg, torch.device("cpu"), "hf_packed")(
        input_ids=batch.inputs[None], position_ids=batch.position_ids[None],
        prefixlm_info=batch.info, labels=batch.labels[None], shift_labels=batch.labels[None],
        use_cache=False).loss
    torch.testing.assert_close(padded, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)
