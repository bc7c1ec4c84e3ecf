"""Where a step's time goes: kernel categories, the GPU timeline, idle gaps (`bench.profile`)."""


def test_gpu_timeline_union_of_kernel_intervals():
    """Guards the idle/overlap figures of `--profile`: kernels on two streams side by side count
    once as busy time, gaps between them are idle, touching intervals leave no gap."""
    from prefixlm.bench.profile import busy_and_span

    assert busy_and_span([]) == (0.0, 0.0)
    # [0, 10) and [5, 12) overlap (busy 12), gap [12, 20), [20, 25) and [25, 30) touch.
    intervals = [(20.0, 25.0), (0.0, 10.0), (25.0, 30.0), (5.0, 12.0), (6.0, 7.0)]
    assert busy_and_span(intervals) == (22.0, 30.0)
    assert busy_and_span([(3.0, 4.0)]) == (1.0, 1.0)


def test_idle_gaps_name_the_kernels_around_them():
    """The gap list of `--profile`: a gap is bounded by the kernel that ended last (not the one
    that started last) and the next to start; overlaps and short gaps are no gaps."""
    from prefixlm.bench.profile import idle_gaps

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

    from prefixlm.bench.profile import is_kernel

    assert is_kernel(SimpleNamespace(device_type=DeviceType.CUDA, is_user_annotation=False))
    assert not is_kernel(SimpleNamespace(device_type=DeviceType.CUDA, is_user_annotation=True))
    assert not is_kernel(SimpleNamespace(device_type=DeviceType.CPU, is_user_annotation=False))


def test_profile_categories_of_real_kernel_names():
    """Names as they appear in H200 profiles; attention must win over the "cutlass" in fmha names."""
    from prefixlm.bench.profile import classify

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
