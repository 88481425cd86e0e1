"""Where a training step's time goes (bertpre.perf.breakdown): kernel names sorted into what they
do, and a profiled step of bench's model on CPU."""

import pytest
import torch

from bertpre.perf.breakdown import OTHER, format_profile, kernel_category, own_time, profile_step, summarise

# kernel names as CUDA profiles of the training step show them (H100/H200, torch 2.x), and CPU operators
NAMES = {
    "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN": "matmul",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off":
        "matmul",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(T1::Params)": "matmul",
    "triton_tem_fused_addmm_0": "matmul",  # inductor's matmul template (max-autotune)
    "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128>>": "attention",
    "fmha_cutlassB_bf16_aligned_64x64_k64_dropout_sm80(PyTorchMemEffAttention::AttentionBackwardKernel)": "attention",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
    "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4>>": "optimizer and clipping",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>": "layer norm",
    "void at::native::(anonymous namespace)::fused_dropout_kernel_vec<c10::BFloat16, float, unsigned int, 1, 4, bool>":
        "dropout",
    "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, "
    "at::native::GeluType)::{lambda()#2}>": "gelu",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, at::native::"
    "(anonymous namespace)::LogSoftMaxForwardEpilogue>": "loss",
    "void at::native::(anonymous namespace)::embedding_backward_feature_kernel<float, float, long>": "embedding and indexing",
    "triton_per_fused_add_native_dropout_native_layer_norm_3": "compiled (fused)",
    "Memcpy HtoD (Pageable -> Device)": "copies",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float>>>": OTHER,
    "aten::addmm": "matmul",
    "## Call CompiledFxGraph fltiv4c7nubc65zw27ikgiwfjyutwmr5a2aj4jltltkqhmguger6 ##": "compiled (fused)",
    "aten::bmm": "attention",  # SDPA's math path on CPU (dropout inside attention): scores and values
    "aten::_softmax": "attention",
    "aten::_log_softmax_backward_data": "loss",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_fused_adamw_": "optimizer and clipping",
    "aten::native_layer_norm_backward": "layer norm",
    "aten::embedding_dense_backward": "embedding and indexing",
}


@pytest.mark.parametrize("name", NAMES)
def test_a_kernel_is_sorted_by_what_it_does(name):
    assert kernel_category(name) == NAMES[name]


def row(key, device_type, own_cpu=0.0, own_device=0.0):
    """One row of the profiler's averages, as torch gives it (microseconds)."""
    from types import SimpleNamespace

    return SimpleNamespace(key=key, device_type=device_type, self_cpu_time_total=own_cpu,
                           self_device_time_total=own_device)


def test_a_gpu_profile_counts_kernels_once_and_says_how_busy_the_device_was():
    """The CUDA branch, as a GPU run's averages give it (CI has no GPU): the kernels' time counts,
    the CPU operators that launched them (whose own device time repeats their kernels') do not."""
    from torch.autograd import DeviceType

    events = [row("aten::mm", DeviceType.CPU, own_cpu=900.0, own_device=6000.0),  # launched the gemm
              row("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN", DeviceType.CUDA, own_device=6000.0),
              row("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", DeviceType.CUDA,
                  own_device=2000.0),
              row("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>",
                  DeviceType.CUDA, own_device=1000.0),
              row("ProfilerStep#3", DeviceType.CPU, own_cpu=50.0)]
    own = own_time(events, on_device=True)
    assert sum(own.values()) == 9000.0 and "aten::mm" not in own
    # 2 steps in 10 ms of wall time: 4.5 ms of kernels a step, the GPU busy 90%
    result = summarise(own, steps=2, wall=0.010, on_device=True, matmul_flops=6e9)
    assert result["ms_per_step"] == {"matmul": 3.0, "attention": 1.0, "layer norm": 0.5}
    assert result["busy"] == 0.9 and result["matmul_tflops"] == 2.0  # 6 GFLOP in 3 ms
    assert result["what"] == "CUDA kernels' time" and "device busy 90%" in format_profile(result)
    cpu = own_time(events, on_device=False)  # on a CPU: operators' own time, no step marker
    assert cpu == {"aten::mm": 900.0} and "busy" not in summarise(cpu, steps=2, wall=0.01, on_device=False)


def test_a_profiled_cpu_step_accounts_its_time_by_category():
    from bertpre.data.masking import default_max_predictions
    from bertpre.model.bert import BertConfig
    from bertpre.perf.bench import BenchOptions, _build
    from bertpre.training.throughput import model_flops_per_token

    options = BenchOptions(preset="bert-mini", batch_size=8, seq_length=64, vocab_size=2048)
    step = _build("bertpre", options, torch.device("cpu"))[1]
    config = BertConfig.from_preset("bert-mini", vocab_size=2048)
    matmul = model_flops_per_token(config, 64, default_max_predictions(64) / 64, attention=False) * 8 * 64
    result = profile_step(step, torch.device("cpu"), steps=2, warmup=1, matmul_flops=matmul)
    ms = result["ms_per_step"]
    # the step's parts are all there: the products of the weights, attention, LayerNorm, AdamW
    for part in ("matmul", "attention", "layer norm", "optimizer and clipping", "loss"):
        assert ms.get(part, 0) > 0, (part, ms)
    assert abs(sum(result["share"].values()) - 1) < 1e-3
    assert abs(sum(ms.values()) - result["profiled_ms_per_step"]) < 0.01 * result["profiled_ms_per_step"] + 0.01
    # operators' own time never counts a nested operator twice: it fits in the wall time of the steps
    assert result["profiled_ms_per_step"] <= 1.05 * result["wall_ms_per_step"]
    assert list(ms.values()) == sorted(ms.values(), reverse=True)
    top = [row["ms_per_step"] for row in result["top"]]
    assert top == sorted(top, reverse=True) and result["top"][0]["category"] in ms
    assert "busy" not in result  # a GPU's, against its host
    tflops = matmul / (ms["matmul"] / 1000) / 1e12  # the step's products of weights over their time
    assert result["matmul_tflops"] == pytest.approx(tflops, rel=0.01)
    assert "matmul" in format_profile(result)


def test_bench_profile_adds_the_breakdown_of_each_preset_to_its_results(tmp_path, monkeypatch, capsys):
    """`bertpre bench --profile`: after the timing (replaced here: the slow run times it for real),
    bertpre's step profiled at the preset's sizes, printed and written with the results."""
    import json

    import bertpre.perf.bench as bench
    from bertpre.cli import main
    from bertpre.data.masking import default_max_predictions

    monkeypatch.setattr(bench, "run_bench", lambda options: {"preset": options.preset})
    monkeypatch.setattr(bench, "format_result", lambda result: f"timed {result['preset']}")
    out = tmp_path / "bench.json"
    main(["bench", "--presets", "bert-tiny", "--batch-size", "4", "--seq-length", "32", "--vocab-size", "1000",
          "--device", "cpu", "--profile", "--output", str(out)])
    [result] = json.loads(out.read_text())
    ours, theirs = result["profile"]["bertpre"], result["profile"]["transformers"]
    assert ours["preset"] == "bert-tiny" and ours["batch_size"] == 4 and not ours["compiled"]
    for profile in (ours, theirs):
        assert profile["ms_per_step"]["matmul"] > 0 and profile["steps"] == 5
    # transformers' MLM head runs at every position, bertpre's at the prediction slots
    head = 6 * (128 * 128 + 128 * 1000)  # per position evaluated: the transform and the decoder
    positions = 4 * 32 - 4 * default_max_predictions(32)  # evaluated by transformers alone
    assert theirs["matmul_flops"] - ours["matmul_flops"] == pytest.approx(head * positions)
    printed = capsys.readouterr().out
    assert printed.index("timed bert-tiny") < printed.index("bertpre, profiled: CPU operators' own time") \
        < printed.index("transformers, profiled:")
