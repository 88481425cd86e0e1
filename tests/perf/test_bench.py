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
    # fp32 runs: the rate their matrix products get, TF32 where bertpre sets it (CUDA runs), else fp32
    assert gpu_peak("NVIDIA H200", "32-true", "highest") == (67e12, "H200 dense fp32 datasheet peak")
    assert gpu_peak("NVIDIA H200", "32-true", "high") == (494.7e12, "H200 dense TF32 datasheet peak")
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "32", "medium")[0] == 312e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "bf16-mixed", "highest")[0] == 312e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert gpu_peak("NVIDIA H100 PCIe", "32-true")[0] == 378e12
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
    monkeypatch.setattr(throughput, "_CPU_PEAKS", {})  # a peak timed by an earlier test in this process
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


def test_a_cpu_run_times_its_peak_once_between_windows_and_a_short_run_never(monkeypatch):
    """Timing a CPU's matmul peak costs seconds: a run too short to log a window must not pay for
    it, a longer one pays once per process (a second run reuses it), and the timing lies between
    two windows, in neither."""
    from types import SimpleNamespace

    import torch

    from bertpre.training import throughput

    clock = [0.0]
    timed = []

    def time_matmul(size, dtype):  # a slow product: 100 s on the run's clock
        timed.append(size)
        clock[0] += 100.0
        return 0.5

    monkeypatch.delenv(throughput.PEAK_ENV, raising=False)
    monkeypatch.setattr(throughput, "_CPU_PEAKS", {}, raising=False)
    monkeypatch.setattr(throughput, "time_matmul", time_matmul)
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock[0])
    logged = []
    module = SimpleNamespace(device=torch.device("cpu"), config=BertConfig(vocab_size=100, hidden_size=8, num_layers=1,
                             num_heads=2, intermediate_size=16),
                             log=lambda name, value, **kw: logged.append((name, float(value))))
    trainer = SimpleNamespace(world_size=1, precision="32-true")
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8, dtype=torch.long)}

    def run(steps):
        logger = throughput.ThroughputLogger(window=2)
        logger.on_train_start(trainer, module)
        for i in range(steps):
            logger.on_train_batch_start(trainer, module, batch, i)
            clock[0] += 1.0  # each step takes a second
            logger.on_train_batch_end(trainer, module, None, batch, i)
        return logger

    run(3)  # the first window is not logged: nothing to measure against
    assert timed == [] and logged == []
    logger = run(6)  # windows 2 and 3 are logged
    assert timed and logger.peak == pytest.approx(2 * timed[-1] ** 3 / 0.5)
    assert [v for n, v in logged if n == "perf/tokens_per_sec"] == [16.0, 16.0], \
        "the peak's timing (100 s a product) fell inside a window"
    assert [n for n, _ in logged].count("perf/mfu") == 2
    count = len(timed)
    assert run(4).peak == logger.peak and len(timed) == count, "a second run in the process timed the peak again"
