"""`bertpre gpu-check`: the GPU acceptance run, here in miniature on CPU (every stage the GPU runs,
with tiny models), so that on a GPU only the GPU can fail; and the compiled Lightning step."""

import json

import pytest
from conftest import ROOT, SAMPLE, fake_gpus

from bertpre.cli import main


def error_line(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["gpu-check", *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_options_get_one_line(tmp_path, capsys):
    assert error_line(capsys, "--output", str(tmp_path / "a"), "--steps", "7") == \
        "bertpre gpu-check: error: --steps must be an even number of at least 4, got 7"
    assert error_line(capsys, "--output", str(tmp_path / "b"), "--input", str(tmp_path / "missing.txt")) == \
        f"bertpre gpu-check: error: --input {tmp_path / 'missing.txt'}: not found"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert error_line(capsys, "--output", str(busy)) == \
        f"bertpre gpu-check: error: --output {busy} exists and is not empty (use --overwrite to replace it)"
    assert (busy / "notes.txt").read_text() == "mine"
    assert error_line(capsys, "--output", str(busy / "check"), "--input", str(busy)) == \
        f"bertpre gpu-check: error: --output {busy / 'check'} lies inside the input {busy}; write the output elsewhere"
    assert "--compile-mode: invalid choice: 'fastest'" in error_line(capsys, "--output", str(tmp_path / "c"),
                                                                     "--compile-mode", "fastest")


def test_the_compiled_stage_trains_with_the_chosen_compile_mode(tmp_path, monkeypatch):
    import subprocess

    from bertpre.perf.gpucheck import Check, GpuCheckOptions

    commands = []
    monkeypatch.setattr(Check, "bertpre", lambda self, *args, **kw: commands.append(args) or
                        subprocess.CompletedProcess(args, 1, "", "stopped here"))
    for mode in (None, "max-autotune-no-cudagraphs"):
        check = Check(GpuCheckOptions.miniature_options(tmp_path, compile_mode=mode))
        assert check.stage_compiled()["compile_mode"] == (mode or "default")
    assert "--model.compile_mode" not in commands[0]
    assert commands[1][commands[1].index("--model.compile_mode") + 1] == "max-autotune-no-cudagraphs"


def test_the_environment_stage_reports_the_gpu_and_whether_it_computes_bf16(tmp_path, monkeypatch):
    """The CUDA branch of the environment stage (CI has no GPU: torch's answers faked): a T4 holds bf16
    tensors but computes them emulated, which the stage reports as no bf16; an H100 computes them."""
    import torch

    from bertpre.perf.gpucheck import Check, GpuCheckOptions
    from bertpre.training.precision import resolve_device

    for capability, name, bf16 in (((7, 5), "Tesla T4", False), ((9, 0), "NVIDIA H100 80GB HBM3", True)):
        fake_gpus(monkeypatch, gpus=1, capability=capability, name=name)
        info = Check(GpuCheckOptions(tmp_path / "check")).stage_environment()
        assert (info["device"], info["gpu"], info["capability"], info["bf16"], info["memory_gb"]) == \
            ("cuda", name, f"{capability[0]}.{capability[1]}", bf16, 80.0)
        assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:0") == torch.device("cuda:0")


def test_the_math_attention_candidate_computes_what_sdpa_computes():
    """The written-out attention the attention stage times against SDPA's kernels: the same output
    without dropout, with and without a padding mask; with dropout, another one."""
    import torch

    from bertpre.perf.gpucheck_kernels import math_attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 8, 4, dtype=torch.float64, generator=generator) for _ in range(3))
    mask = torch.ones(3, 1, 1, 8, dtype=torch.bool)
    mask[0, ..., 5:] = False
    for m in (None, mask):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
        assert torch.allclose(math_attention(q, k, v, m, 0.0), expected, atol=1e-12)
    assert not torch.allclose(math_attention(q, k, v, mask, 0.5), expected)


def test_the_large_stage_stops_at_the_first_batch_that_runs_out_of_memory(monkeypatch):
    """What only a GPU reaches (CI has none): a size whose model or step raises CUDA's
    out-of-memory error ends the search, reported as not fitting; the largest that ran is kept."""
    import torch

    import bertpre.perf.gpucheck_kernels as kernels
    from bertpre.model.bert import BertConfig

    built = []

    def build(framework, options, device, config=None):
        built.append(options.batch_size)
        if options.batch_size >= 512:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return None, lambda: None

    monkeypatch.setattr(kernels, "_build", build)
    monkeypatch.setattr(kernels, "time_ms", lambda step, device, repeats: 10.0)
    config = BertConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    result = kernels.largest_batch(torch.device("cpu"), config, "bert-large", (128, 256, 512, 768), 128, repeats=1)
    assert built == [128, 256, 512] and result["largest_batch"] == 256 and result["ok"]
    assert [r["fits"] for r in result["rows"]] == [True, True, False]
    assert result["rows"][1]["tokens_per_sec"] == 256 * 128 * 100  # 10 ms a step


@pytest.mark.slow  # about 4 minutes on 2 cores (three compiles)
def test_the_gpu_check_passes_in_miniature_on_cpu(tmp_path, capsys):
    books = [str(SAMPLE / "carroll-alice.txt"), str(SAMPLE / "austen-persuasion.txt")]
    out = tmp_path / "check"
    main(["gpu-check", "--miniature", "--output", str(out), "--input", *books, "--corpus", *books,
          "--recipe-minutes", "0.2"])
    printed = capsys.readouterr().out
    results = json.loads((out / "gpu_check.json").read_text())
    failed = {k: v.get("error") for k, v in results["stages"].items() if not v.get("ok")}
    assert results["ok"] and not failed, failed
    assert set(results["stages"]) == {"environment", "prepare", "eager", "compiled", "resume", "fp16", "bench",
                                      "bench-compiled", "attention", "profile", "profile-compiled", "large", "recipe"}
    stages = results["stages"]
    for name in ("profile", "profile-compiled"):
        assert stages[name]["ms_per_step"]["matmul"] > 0 and abs(sum(stages[name]["share"].values()) - 1) < 1e-3
    assert stages["profile-compiled"]["ms_per_step"]["compiled (fused)"] > 0 and stages["profile"]["matmul_tflops"] > 0
    assert "compiled (fused)" not in stages["profile"]["ms_per_step"]
    assert stages["profile"]["transformers"]["framework"] == "transformers" and "transformers" not in \
        stages["profile-compiled"]
    for name in ("eager", "compiled"):
        assert stages[name]["loss_finite"] and stages[name]["loss_falling"] and stages[name]["tokens_per_sec"] > 0
    assert stages["compiled"]["graph_breaks"] == 0 and stages["compiled"]["unexpected_recompiles"] == 0
    assert stages["compiled"]["compile_mode"] == "default"
    assert stages["resume"]["max_relative_loss_difference"] == 0.0, "a CPU resume is exact"
    assert stages["large"]["largest_batch"] == 8 and stages["bench"]["speedup"] > 0
    assert all(isinstance(stages["attention"]["ms"][f"{m}, math compiled"], float) for m in ("no mask", "padding mask"))
    assert stages["recipe"]["val_mlm_accuracy"] is not None
    assert (out / "gpu_check.txt").read_text().splitlines()[1].startswith("stage")
    assert "recipe" in printed and "resume" in printed


@pytest.mark.slow  # 30-60 s: compiles on CPU (inductor)
def test_the_lightning_step_compiles_without_graph_breaks_or_shape_recompiles(sample_prepared, tmp_path):
    """The training step as `bertpre train` runs it, compiled: bf16 autocast, two accumulated
    micro-batches, activation checkpointing, a validation in the middle and at the end. One graph
    per grad mode (training, validation) and per attention-mask form (a padded batch, one without
    padding): at most 4 graphs, no graph break, and nothing else makes dynamo compile again."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    main(["train", "--config", str(ROOT / "configs" / "bert-tiny.yaml"), "--data.path", str(sample_prepared),
          "--trainer.default_root_dir", str(tmp_path / "run"), "--model.compile", "true",
          "--model.activation_checkpointing", "true", "--trainer.precision", "bf16-mixed",
          "--trainer.accumulate_grad_batches", "2", "--trainer.max_steps", "8", "--trainer.val_check_interval", "8",
          "--trainer.limit_val_batches", "3", "--data.batch_size", "8", "--trainer.enable_progress_bar", "false",
          "--model.config.hidden_size", "32", "--model.config.num_heads", "2", "--model.config.intermediate_size",
          "64", "--trainer.num_sanity_val_steps", "2"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert 1 <= counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


def test_a_compiled_model_gets_every_batch_padded_to_the_full_length(sample_prepared):
    """Batches padded to their longest pair (rounded up to 8) vary in length, and each new length
    recompiles a compiled model; compiled, every batch is padded to the prepared length."""
    from bertpre.data.datamodule import PretrainDataModule
    from bertpre.lightning_cli import connect
    from bertpre.model.bert import BertConfig
    from bertpre.training.pretraining import PretrainModule

    config = BertConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    full = PretrainDataModule(str(sample_prepared)).prepare().max_seq_length
    for compile in (False, True):
        data = PretrainDataModule(str(sample_prepared), batch_size=1)  # single pairs: short ones come up
        connect(PretrainModule(config, compile=compile), data)
        data.setup("fit")
        lengths = {batch["input_ids"].shape[1] for _, batch in zip(range(60), data.train_dataloader())}
        if compile:
            assert data.pad_to_multiple_of == full and lengths == {full}, lengths
        else:
            assert data.pad_to_multiple_of == 8 and len(lengths) > 1, lengths


def test_without_a_gpu_the_full_size_check_is_refused_before_it_writes(tmp_path, capsys, monkeypatch):
    """Full size, gpu-check trains bert-base and bert-large: hours on a CPU, so it says so at once."""
    from bertpre.perf.gpucheck import Check

    def started(self):
        raise AssertionError("a full-size check started without a GPU")

    monkeypatch.setattr(Check, "run", started)
    fake_gpus(monkeypatch, gpus=0, cuda=None)
    err = error_line(capsys, "--output", str(tmp_path / "check"))
    assert err.startswith("bertpre gpu-check: error: no GPU to check: torch ") and err.endswith(
        "is a CPU-only build (install a build of torch for your GPU); --miniature runs every stage with tiny "
        "models on a CPU")
    assert not (tmp_path / "check").exists()
