import pytest

from bertpre.model.bert import BertConfig
from bertpre.perf.bench import BenchOptions, format_result, run_bench
from bertpre.training.throughput import model_flops_per_token


@pytest.mark.slow  # minutes of the default suite's five; runs in CI's slow line
def test_bench_times_both_frameworks_and_reports_ratio_memory_and_mfu():
    result = run_bench(BenchOptions("bert-tiny", batch_size=4, seq_length=32, vocab_size=3000, steps=2, warmup=1))
    ours, theirs = result["frameworks"]["bertpre"], result["frameworks"]["transformers"]
    for r in (ours, theirs):
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_memory_mb"] > 50
    assert result["speedup"] == round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2)
    text = format_result(result)
    assert "speedup" in text and "cores" in text and "transformers" in text


def test_model_flops_per_token_matches_the_formula():
    c = BertConfig.from_preset("bert-base", vocab_size=30522)
    flops = model_flops_per_token(c, 128)
    encoder = 6 * 12 * (4 * 768**2 + 2 * 768 * 3072)
    assert flops == encoder + 12 * 12 * 128 * 768 + 6 * 0.15 * (768**2 + 768 * 30522)
    assert abs(flops / 1e6 - 545.4) < 0.1  # 510 encoder + 14 attention + 22 MLM head MFLOP per token


def test_mfu_peaks_name_the_exact_gpu_part_or_take_an_override(monkeypatch):
    import torch

    from bertpre.training.throughput import PEAK_ENV, gpu_peak, peak_flops

    assert gpu_peak("NVIDIA H100 80GB HBM3", "bf16-mixed")[0] == 989e12  # SXM
    assert gpu_peak("NVIDIA H100 PCIe", "bf16-mixed")[0] == 756e12
    assert gpu_peak("NVIDIA H100 NVL", "bf16-mixed")[0] == 835e12
    assert gpu_peak("NVIDIA H200", "32-true")[0] == 67e12
    peak, why = gpu_peak("NVIDIA B300", "bf16-mixed")
    assert peak is None and PEAK_ENV in why
    assert peak_flops(torch.device("cpu"), "32", override_tflops=2.5)[0] == 2.5e12
    monkeypatch.setenv(PEAK_ENV, "1.5")
    assert peak_flops(torch.device("cpu"), "bf16-mixed") == (1.5e12, "1.5 TFLOP/s given")


def test_the_cpu_peak_measurement_is_bounded_for_a_dtype_the_cpu_only_emulates(monkeypatch):
    """A product the CPU computes fast grows the matrix to 2048 and takes the best of 8 timings; one
    it only emulates (bf16 without AVX512-BF16; simulated here at 0.3 s for 256 x 256) stays at 256
    and stops repeating once a second is spent, where timing 2048 x 2048 products took minutes before a run
    could start. Timings are simulated: seconds proportional to size^3."""
    import torch

    from bertpre.training import throughput

    timed = []

    def fake(per_256):
        def time_matmul(size, dtype):
            timed.append(size)
            return per_256 * (size / 256) ** 3
        return time_matmul

    monkeypatch.setattr(throughput, "time_matmul", fake(1e-4))  # fast: 2048 takes 0.05 s
    peak, size = throughput.measured_cpu_peak(torch.float32)
    assert size == 2048 and timed == [256, 512, 1024, 2048] + [2048] * 8
    assert peak == pytest.approx(2 * 2048**3 / 0.0512)
    timed.clear()
    monkeypatch.setattr(throughput, "time_matmul", fake(0.3))  # emulated
    peak, size = throughput.measured_cpu_peak(torch.bfloat16)
    assert size == 256 and timed == [256] * 5, "the first product, then repeats until a second is spent"
    assert peak == pytest.approx(2 * 256**3 / 0.3)
    why = throughput.peak_flops(torch.device("cpu"), "bf16-mixed")[1]
    assert why == "best timed torch.bfloat16 256x256 matmul on this CPU"


def test_the_cuda_branch_of_the_peak_reads_the_device_name(monkeypatch):
    import torch

    from bertpre.training.throughput import peak_flops

    monkeypatch.delenv("BERTPRE_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda"), "bf16-mixed")[0] == 756e12
    assert peak_flops(torch.device("cuda"), "32-true")[0] == 51e12
