"""The precision bertpre picks when a config leaves trainer.precision unset."""

from conftest import fake_gpus

from bertpre.training.precision import auto_precision, cpu_flags

ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n"
OLD_XEON = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd bf16 sve\n"


def test_cpu_flags_are_read_from_cpuinfo():
    assert "avx512_bf16" in cpu_flags(ZEN4) and "amx_bf16" in cpu_flags(SAPPHIRE_RAPIDS)
    assert "bf16" in cpu_flags(GRAVITON) and cpu_flags("") == set()


def test_bf16_only_where_the_hardware_computes_it():
    assert auto_precision(False, flags=cpu_flags(ZEN4))[0] == "bf16-mixed"
    assert auto_precision(False, flags=cpu_flags(SAPPHIRE_RAPIDS))[0] == "bf16-mixed"
    precision, why = auto_precision(False, flags=cpu_flags(OLD_XEON))
    assert precision == "32-true" and "no AVX512-BF16 or AMX" in why
    assert auto_precision(False, flags=cpu_flags(GRAVITON))[0] == "32-true"  # no x86 bf16 kernels assumed
    assert auto_precision(True, cuda_bf16=True)[0] == "bf16-mixed"
    assert auto_precision(True, cuda_bf16=False)[0] == "16-mixed"


def test_an_unset_precision_is_chosen_printed_and_used(sample_prepared, tmp_path, capsys):
    from conftest import ROOT

    from bertpre.cli import main
    from bertpre.training.precision import resolve_precision

    main(["train", "--config", str(ROOT / "configs" / "bert-tiny.yaml"), "--data.path", str(sample_prepared),
          "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "2", "--trainer.precision",
          "null", "--trainer.accelerator", "cpu", "--trainer.limit_val_batches", "0",
          "--trainer.enable_progress_bar", "false"])
    expected, why = resolve_precision("cpu")
    assert f"precision {expected} (trainer.precision unset: {why})" in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    config = (tmp_path / "run" / "logs" / "version_0" / "config.yaml").read_text()
    assert "precision: null" in config  # the config records what was asked; the run used `expected`


def test_the_cuda_branch_of_the_choice_runs_on_cpu(monkeypatch):
    """CI has no GPU: the CUDA branch runs here with torch's CUDA queries answered as a GPU would."""
    import torch

    from bertpre.training.precision import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto")[0] == "bf16-mixed" and resolve_precision("gpu")[0] == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("cuda")[0] == "16-mixed"
    assert resolve_precision("cpu")[0] in ("bf16-mixed", "32-true")  # asked for the CPU: never a GPU precision


def test_a_gpu_that_only_emulates_bf16_gets_fp16_and_a_warning_when_bf16_is_asked_for(monkeypatch):
    """A V100 or T4 can hold bf16 tensors, which torch.cuda.is_bf16_supported() counts as support by
    default; it computes them emulated. bertpre's choice takes fp16 there, and warns when asked for bf16."""
    from bertpre.training.precision import emulated_bf16_warning, resolve_precision

    fake_gpus(monkeypatch, gpus=1, capability=(7, 5), name="Tesla T4")
    assert resolve_precision("auto") == ("16-mixed", "the GPU has no bf16: fp16 with loss scaling")
    assert emulated_bf16_warning("cuda", "bf16-mixed") == (
        "warning: trainer.precision bf16-mixed on Tesla T4 (compute capability 7.5), which has no native bf16 "
        "(8.0 on): bf16 is emulated there, many times slower; 16-mixed (fp16 with loss scaling) is this GPU's "
        "mixed precision")
    assert emulated_bf16_warning("cuda", "16-mixed") is None
    fake_gpus(monkeypatch, gpus=1, capability=(9, 0))
    assert resolve_precision("gpu")[0] == "bf16-mixed" and emulated_bf16_warning("cuda", "bf16-mixed") is None


def test_bf16_asked_for_on_a_cpu_that_only_emulates_it_is_warned_about(sample_prepared, tmp_path, capsys,
                                                                        monkeypatch):
    from conftest import ROOT

    from bertpre.cli import main
    from bertpre.training import precision as hardware

    assert hardware.emulated_bf16_warning("cpu", "bf16-mixed", cpu_flags(ZEN4)) is None
    assert hardware.emulated_bf16_warning("cpu", "32-true", cpu_flags(OLD_XEON)) is None
    fake_gpus(monkeypatch, gpus=1, capability=(8, 0), name="NVIDIA A100-SXM4-80GB")
    assert hardware.emulated_bf16_warning("cuda", "bf16-mixed", set()) is None
    monkeypatch.undo()
    assert hardware.emulated_bf16_warning("cpu", "bf16", set(), option="--precision").startswith(
        "warning: --precision bf16 on a CPU without AVX512-BF16 or AMX")  # bertpre bench's option
    for cpuinfo, warned in ((OLD_XEON, True), (SAPPHIRE_RAPIDS, False)):
        monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None, text=cpuinfo: cpu_flags(text))
        run = tmp_path / f"run-{warned}"
        main(["train", "--config", str(ROOT / "configs" / "bert-tiny.yaml"), "--data.path", str(sample_prepared),
              "--trainer.default_root_dir", str(run), "--trainer.max_steps", "1", "--trainer.precision",
              "bf16-mixed", "--trainer.accelerator", "cpu", "--trainer.limit_val_batches", "0",
              "--data.batch_size", "4", "--trainer.enable_progress_bar", "false"])
        out = capsys.readouterr().out
        assert ("warning: trainer.precision bf16-mixed on a CPU without AVX512-BF16 or AMX" in out) == warned, out
        assert (run / "checkpoints" / "last.ckpt").is_file()


def test_a_missing_gpu_is_explained_by_what_to_check(monkeypatch):
    from bertpre.training.precision import missing_cuda

    fake_gpus(monkeypatch, gpus=0, cuda=None)
    assert "is a CPU-only build (install a build of torch for your GPU)" in missing_cuda()
    fake_gpus(monkeypatch, gpus=0, visible="")
    assert missing_cuda() == "CUDA_VISIBLE_DEVICES='' hides every GPU"
    fake_gpus(monkeypatch, gpus=0, visible="-1")
    assert missing_cuda("cuda:0") == "CUDA_VISIBLE_DEVICES='-1' hides every GPU"
    fake_gpus(monkeypatch, gpus=0)
    assert "(CUDA 12.8) finds no GPU (is one visible, with a driver for CUDA 12.8?)" in missing_cuda()
    fake_gpus(monkeypatch, gpus=0, cuda=None, hip="6.4")
    assert "(ROCm 6.4) finds no GPU" in missing_cuda()
    fake_gpus(monkeypatch, gpus=1)
    assert missing_cuda() is None and missing_cuda("cuda:0") is None
    assert missing_cuda("cuda:1") == "torch sees 1 GPU (cuda:0)"
    fake_gpus(monkeypatch, gpus=2)
    assert missing_cuda("cuda:1") is None and missing_cuda("cuda:3") == "torch sees 2 GPUs (cuda:0, cuda:1)"
