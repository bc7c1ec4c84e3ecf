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
from prefixlm.model import PrefixLM, preset_config
from prefixlm.train.bench import (SpecLoader, block_matrix_params, draw_lengths, make_batch,
                                  step_flops, useful_pairs)

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


def test_draw_lengths_is_the_spec_generator():
    """Guards the bench drawing other batches than bench_spec.md's (order of draws, bounds,
    overflow rule): the spec's stated counts for T = 16384 and 65536, zero-causal fractions
    honoured, and the capacity check."""
    for capacity, counts in ((16384, (11, 15548)), (65536, (42, 63768))):
        prefix, causal = draw_lengths(capacity, 1)
        assert (len(prefix), sum(prefix) + sum(causal)) == counts
    assert all(c == 0 for c in draw_lengths(65536, 1, 1.0)[1])
    mixed = draw_lengths(65536, 1, 0.3)[1]
    assert 0 < sum(c == 0 for c in mixed) < len(mixed)
    with pytest.raises(ValueError, match="longest sample"):
        draw_lengths(2048, 1)


def test_make_batch_follows_the_loader_label_convention():
    """Guards labels shifted wrongly (leaking the predicted token, or dropping the one label of a
    zero-causal sample): labels = S[1:] from the last prefix row, positions restart per sample."""
    prefix, causal = [5, 3, 4], [2, 0, 3]
    batch = make_batch(prefix, causal, 24, 50, seed=0)
    assert int((batch.labels != -100).sum()) == sum(c + 1 for c in causal)
    at = 0
    for p, c in zip(prefix, causal):
        rows = slice(at, at + p + c)
        assert batch.position_ids[rows].tolist() == list(range(p + c))
        assert (batch.labels[at:at + p - 1] == -100).all()
        # Label of row i is the input of row i + 1 inside the sample (next-token prediction).
        assert batch.labels[at + p - 1:at + p + c - 1].tolist() == \
            batch.inputs[at + p:at + p + c].tolist()
        # The response copies the prefix shifted by one id.
        head = batch.inputs[at:at + p]
        assert batch.labels[at + p - 1].item() == (head[0].item() + 1) % 50
        at += p + c
    assert (batch.labels[at:] == -100).all() and batch.info.total == at
    loader = SpecLoader(512, 64, max_prefix=64, max_causal=32, all_zero_causal_every=2)
    batches = [next(iter(loader)) for _ in range(4)]
    assert [b.info.max_causal == 0 for b in batches] == [False, True, False, True]
    assert loader.state_dict() == {"position": 4}


def test_step_flops_formula():
    """Guards the documented FLOP count (one formula, `model.flops`, for the bench and the
    trainer's MFU): a transformer's is 6N + 3 x attention with N counted from the model's own
    weights (less the qkvg projection's never-read padding columns), and HRM counts its no-grad
    cycles forward only."""
    cfg = preset_config("tiny", vocab_size=300, kv_heads=2)
    model = PrefixLM(cfg)
    padding = model.blocks[0].attn.split[-1] * cfg.hidden
    assert padding > 0  # 128 + 2 * 64 + 4 columns: the padding is exercised
    assert block_matrix_params(cfg) == sum(p.numel() for p in model.blocks[0].parameters()
                                           if p.dim() > 1) - padding
    info = make_batch([40, 20], [10, 0], 128, 300, seed=0).info
    pairs, tokens = useful_pairs(info), info.total
    assert pairs == 40 * 40 + 10 * 40 + 10 * 11 // 2 + 20 * 20
    # Independently: 6 x (matmul weights actually in the model) per token + 3 x attention.
    weights = model.lm_head.weight.numel() - padding * cfg.layers + sum(
        p.numel() for b in model.blocks for p in b.parameters() if p.dim() > 1)
    expected = 6 * weights * tokens + 3 * 4 * cfg.heads * cfg.head_dim * pairs * cfg.layers
    assert step_flops(cfg, tokens, pairs) == pytest.approx(expected, rel=1e-12)
    assert model.flops_per_token(pairs / tokens) * tokens == pytest.approx(expected, rel=1e-12)

    hrm = preset_config("tiny", vocab_size=300, arch="hrm", H_cycles=2, L_cycles=3)
    per_call = 2 * tokens * block_matrix_params(hrm) + 4 * hrm.heads * hrm.head_dim * pairs
    calls = 1 + 3 * 1   # hrm_layers = (1, 1): one H block, three L steps per cycle
    head = 2 * tokens * 300 * hrm.hidden
    assert step_flops(hrm, tokens, pairs) == pytest.approx(3 * head + (3 + 1) * calls * per_call)


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


def test_gpu_timeline_union_of_kernel_intervals():
    """Guards the idle/overlap figures of `--profile`: kernels on two streams side by side count
    once as busy time, gaps between them are idle, touching intervals leave no gap."""
    from prefixlm.train.step_profile import busy_and_span

    assert busy_and_span([]) == (0.0, 0.0)
    # [0, 10) and [5, 12) overlap (busy 12), gap [12, 20), [20, 25) and [25, 30) touch.
    intervals = [(20.0, 25.0), (0.0, 10.0), (25.0, 30.0), (5.0, 12.0), (6.0, 7.0)]
    assert busy_and_span(intervals) == (22.0, 30.0)
    assert busy_and_span([(3.0, 4.0)]) == (1.0, 1.0)


def test_idle_gaps_name_the_kernels_around_them():
    """The gap list of `--profile`: a gap is bounded by the kernel that ended last (not the one
    that started last) and the next to start; overlaps and short gaps are no gaps."""
    from prefixlm.train.step_profile import idle_gaps

    assert idle_gaps([]) == []
    kernels = [(0.0, 10.0, "long"), (2.0, 4.0, "short"), (30.0, 31.0, "next"),
               (31.0, 40.0, "touching"), (41.0, 42.0, "close"), (50.0, 51.0, "after")]
    assert idle_gaps(kernels) == [(20.0, "long", "next"), (1.0, "touching", "close"),
                                  (8.0, "close", "after")]
    assert idle_gaps(kernels, min_gap=5.0) == [(20.0, "long", "next"), (8.0, "close", "after")]


def test_annotation_ranges_are_not_kernel_time():
    """The optimizer's record_function range shows up as a CUDA event spanning its kernels;
    counted as a kernel it doubled the optimizer's time in every profile before this guard."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from prefixlm.train.step_profile import is_kernel

    assert is_kernel(SimpleNamespace(device_type=DeviceType.CUDA, is_user_annotation=False))
    assert not is_kernel(SimpleNamespace(device_type=DeviceType.CUDA, is_user_annotation=True))
    assert not is_kernel(SimpleNamespace(device_type=DeviceType.CPU, is_user_annotation=False))


def test_profile_categories_of_real_kernel_names():
    """Names as they appear in H200 profiles; attention must win over the "cutlass" in fmha names."""
    from prefixlm.train.step_profile import classify

    assert classify("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT") == "matmul"
    assert classify("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    for name in ("_bwd_dkdv_kernel", "_fwd_kernel", "fmha_cutlassF_bf16_aligned_64x64_rf_sm80",
                 "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3",
                 "triton_tem_fused_flex_attention_0", "prefixlm::attention"):
        assert classify(name) == "attention", name
    assert classify("triton_poi_fused_add_mul_silu_0") == "elementwise/norm/loss (fused)"
    assert classify("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "communication"
    assert classify("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == \
        "optimizer"
    assert classify("something_new") == "other"


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
