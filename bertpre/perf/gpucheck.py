"""``bertpre gpu-check``: the GPU path in one command, for a machine you are about to spend GPU
time on. On one GPU it takes a few minutes:

1. ``prepare``: the bundled sample (or ``--input``) -> a prepared folder at ``--seq-length``;
2. ``eager`` and ``compiled``: ``bertpre train`` with the shipped config of ``--preset``
   (configs/<preset>.yaml: its precision, optimizer, clipping and masking) for ``--steps`` steps,
   without and with ``model.compile``: tokens/s, MFU and peak memory (timed between device syncs,
   after the first window, which holds warm-up and compilation), the loss finite and falling;
   the compiled run also counts graph breaks and recompiles;
3. ``resume``: the eager run again, killed (SIGKILL) once its mid-run checkpoint exists, then
   resumed with ``--ckpt_path last``: its losses against the uninterrupted run's;
4. ``fp16``: a few steps in 16-mixed (a GradScaler) with ``nonfinite: skip``;
5. ``bench`` (and ``bench-compiled``): ``bertpre bench`` against transformers'
   ``BertForPreTraining`` (sdpa) on the same batch and optimizer;
6. ``attention``: the attention kernels SDPA picks with and without a padding mask, and the q/k/v
   projections as one product against three, timed; ``profile`` (and ``profile-compiled``):
   bench's step under torch.profiler, its kernel time by category (matrix products, attention,
   LayerNorm, dropout, optimizer, ...), the device's busy share and the matrix products' TFLOP/s;
7. ``large``: ``--large-preset`` at growing batch sizes until memory runs out;
8. ``recipe`` (with ``--corpus``): configs/bert-mini-cpu.yaml's recipe for ``--recipe-minutes``.

Every stage runs even when an earlier one fails; ``gpu_check.json`` in the output folder is
rewritten after each stage, and a table is printed at the end. The exit status is 0 when every
stage passed. ``--miniature`` runs the same stages with tiny models and few steps, on a CPU
too: the project's tests run it, so that on a GPU only the GPU can fail.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from bertpre.errors import UserError
from bertpre.outputs import atomic_write, check_apart, check_replaceable
from bertpre.perf.gpucheck_results import (
    format_table,
    last_line,
    mean_of_quarter,
    read_metrics,
    read_metrics_versions,
    series,
    throughput,
)
from bertpre.training.precision import cuda_bf16_native, missing_cuda

ROOT = Path(__file__).resolve().parents[2]  # the repository: configs/ and data_prep/sample
# a model small enough for a CPU, for --miniature: every other setting is the shipped config's
MINIATURE_MODEL = ["--model.config.hidden_size", "64", "--model.config.num_layers", "2",
                   "--model.config.num_heads", "2", "--model.config.intermediate_size", "128"]
MINIATURE_LARGE = {"hidden_size": 64, "num_layers": 3, "num_heads": 2, "intermediate_size": 128}
# relative difference between a resumed run's losses and the uninterrupted run's: exact on CPU;
# on a GPU, atomics in backward kernels make two runs of the same step differ in the last bits, and
# in bf16 (8 bits of mantissa) such differences grow over the steps after the resume
RESUME_TOLERANCE = {"cpu": 1e-4, "cuda": 0.02}


@dataclass
class GpuCheckOptions:
    output: Path
    inputs: list[str] = field(default_factory=lambda: [str(ROOT / "data_prep" / "sample")])
    preset: str = "bert-base"
    large_preset: str = "bert-large"
    batch_size: int = 256
    large_batch_sizes: tuple[int, ...] = (128, 256, 512, 768, 1024)
    seq_length: int = 128
    vocab_size: int = 30522
    steps: int = 200
    fp16_steps: int = 30
    bench_steps: int = 10
    num_workers: int = 8
    corpus: list[str] | None = None  # text for the recipe stage
    recipe_minutes: float = 5.0
    compile_mode: str | None = None  # the compiled stage's model.compile_mode (None: torch's default)
    stages: tuple[str, ...] = ()  # empty: all
    miniature: bool = False
    overwrite: bool = False

    @classmethod
    def miniature_options(cls, output: Path, **overrides) -> GpuCheckOptions:
        """The same stages, small enough for a CPU in about a minute each."""
        values = dict(output=output, batch_size=8, large_batch_sizes=(4, 8), vocab_size=1024, steps=20,
                      fp16_steps=4, bench_steps=2, num_workers=0, recipe_minutes=0.3, miniature=True)
        values.update(overrides)
        return cls(**values)


STAGES = ("environment", "prepare", "eager", "compiled", "resume", "fp16", "bench", "bench-compiled", "attention",
          "profile", "profile-compiled", "large", "recipe")


class Check:
    """Runs the stages, keeps their results, writes them after each stage."""

    def __init__(self, options: GpuCheckOptions) -> None:
        self.o = options
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        given = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}
        self.results: dict = {"options": given, "stages": {}}
        self.work = options.output
        self.data = self.work / "data"
        self.config = ROOT / "configs" / f"{options.preset}.yaml"

    # --- running --------------------------------------------------------------------------
    def run(self) -> dict:
        wanted = self.o.stages or STAGES
        for name in STAGES:
            if name not in wanted or (name == "recipe" and not self.o.corpus):
                continue
            print(f"gpu-check: {name} ...", flush=True)
            start = time.perf_counter()
            try:
                result = getattr(self, "stage_" + name.replace("-", "_"))()
            except Exception as e:  # a failed stage is reported; the others still run
                result = {"ok": False, "error": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc()[-4000:]}
            result["seconds"] = round(time.perf_counter() - start, 1)
            self.results["stages"][name] = result
            print(f"gpu-check: {name} {'passed' if result.get('ok') else 'FAILED'} in {result['seconds']} s"
                  + ("" if result.get("ok") else f": {result.get('error', result.get('why', ''))}"), flush=True)
            self.write()
        self.results["ok"] = all(r.get("ok") for r in self.results["stages"].values())
        self.write()
        if (self.work / "runs").is_dir():
            self.keep_metrics()
        return self.results

    def write(self) -> None:
        text = json.dumps(self.results, indent=1, default=str)
        atomic_write(self.work / "gpu_check.json", lambda f: f.write(text.encode()))

    def keep_metrics(self) -> None:
        """Every run's metrics.csv beside the logs (logs/RUN-version_N.csv), for a look afterwards."""
        (self.work / "logs").mkdir(exist_ok=True)
        for path in (self.work / "runs").glob("*/logs/version_*/metrics.csv"):
            run = path.parents[2].name
            (self.work / "logs" / f"{run}-{path.parent.name}.csv").write_bytes(path.read_bytes())

    def bertpre(self, *args: str, env: dict | None = None, log: str | None = None,
                timeout: float | None = None) -> subprocess.CompletedProcess:
        """A ``bertpre`` command in a fresh process, as a user runs it; its output goes to logs/."""
        command = [sys.executable, "-c", "from bertpre.cli import main; main()", *args]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})},
                              timeout=timeout)
        if log:
            (self.work / "logs").mkdir(exist_ok=True)
            (self.work / "logs" / f"{log}.log").write_text(f"$ bertpre {' '.join(args)}\n{done.stdout}\n{done.stderr}")
        return done

    # --- stages ---------------------------------------------------------------------------
    def stage_environment(self) -> dict:
        info = {"ok": True, "python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda, "device": self.device.type}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            info.update(gpu=props.name, memory_gb=round(props.total_memory / 2**30, 1),
                        capability=f"{props.major}.{props.minor}", bf16=cuda_bf16_native())
        for package in ("lightning", "transformers", "tokenizers", "datasets"):
            try:
                info[package] = __import__(package).__version__
            except Exception as e:  # reported, not fatal: the stages that need it will say so
                info[package] = f"missing ({type(e).__name__})"
        if self.o.miniature:
            info["miniature"] = True
        return info

    def stage_prepare(self) -> dict:
        vocab = str(self.o.vocab_size)
        done = self.bertpre("prepare", "--input", *self.o.inputs, "--output", str(self.data), "--vocab-size", vocab,
                            "--max-seq-length", str(self.o.seq_length), "--overwrite", log="prepare")
        if done.returncode:
            return {"ok": False, "error": last_line(done)}
        splits = json.loads((self.data / "prepare.json").read_text())["splits"]
        return {"ok": True, "splits": splits}

    def train_args(self, run: str, steps: int, *extra: str) -> list[str]:
        """``bertpre train`` with the shipped config, this check's data, steps and run folder; a checkpoint
        at the middle and the end of the run, a loss logged every 10 steps."""
        overlay = self.work / "checkpoints.yaml"
        overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": max(1, steps // 2), "save_last": True, "save_top_k": -1}}]}}))
        args = ["train", "--config", str(self.config), "--config", str(overlay), "--data.path", str(self.data),
                "--trainer.default_root_dir", str(self.work / "runs" / run), "--trainer.max_steps", str(steps),
                "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", "4",
                "--trainer.log_every_n_steps", "10" if steps >= 40 else "2", "--trainer.enable_progress_bar", "false",
                "--data.batch_size", str(self.o.batch_size), "--data.num_workers", str(self.o.num_workers),
                "--overwrite", "true"]
        if self.o.miniature:
            args += MINIATURE_MODEL + ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
        return args + list(extra)

    def _training_result(self, run: str, done: subprocess.CompletedProcess, steps: int) -> dict:
        if done.returncode:
            return {"ok": False, "error": last_line(done)}
        metrics = read_metrics(self.work / "runs" / run)
        losses = series(metrics, "train/loss")
        result = {"steps": steps, "loss_first": losses[0][1] if losses else None,
                  "loss_last": losses[-1][1] if losses else None, **throughput(metrics)}
        finite = bool(losses) and all(math.isfinite(v) for _, v in losses)
        falling = bool(losses) and mean_of_quarter(losses, last=False) > mean_of_quarter(losses, last=True)
        result.update(loss_finite=finite, loss_falling=falling, ok=finite and falling and f"trained {steps} steps"
                      in done.stdout)
        val = {k: v[-1][1] for k in ("val/mlm_accuracy", "val/mlm_context_gain") if (v := series(metrics, k))}
        result.update(val)
        return result

    def stage_eager(self) -> dict:
        done = self.bertpre(*self.train_args("eager", self.o.steps, "--model.compile", "false"), log="eager")
        return self._training_result("eager", done, self.o.steps)

    def stage_compiled(self) -> dict:
        env = {"TORCH_LOGS": "recompiles,graph_breaks"}
        mode = ["--model.compile_mode", self.o.compile_mode] if self.o.compile_mode else []
        done = self.bertpre(*self.train_args("compiled", self.o.steps, "--model.compile", "true", *mode), env=env,
                            log="compiled")
        result = self._training_result("compiled", done, self.o.steps)
        result["compile_mode"] = self.o.compile_mode or "default"
        result["graph_breaks"] = done.stderr.count("Graph break")
        # one graph per (grad mode: training / validation) x (a padding mask or none) is by design: each
        # is compiled once; any other guard failure (a shape, a dtype) is a recompile the step should not need
        reasons = re.findall(r"\[__recompiles\]\s+- \d+/\d+: (.*)", done.stderr)  # each failed guard
        result["recompiles"] = done.stderr.count("Recompiling function")
        result["unexpected_recompiles"] = sum(not ("attention_mask" in r or "grad_mode" in r) for r in reasons)
        eager = self.results["stages"].get("eager", {})
        if eager.get("tokens_per_sec") and result.get("tokens_per_sec"):
            result["speedup_over_eager"] = round(result["tokens_per_sec"] / eager["tokens_per_sec"], 3)
        return result

    def stage_resume(self) -> dict:
        steps, run = self.o.steps, "killed"
        directory = self.work / "runs" / run / "checkpoints"
        args = self.train_args(run, steps, "--model.compile", "false")
        process = subprocess.Popen([sys.executable, "-c", "from bertpre.cli import main; main()", *args],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        middle = f"step={steps // 2}"
        while process.poll() is None and not any(middle in p.name for p in directory.glob("*.ckpt")):
            time.sleep(0.05)
        if process.poll() is not None:
            return {"ok": False, "error": f"the run ended (status {process.returncode}) before it was killed"}
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_at = max((int(p.stem.split("step=")[1]) for p in directory.glob("*step=*.ckpt")), default=0)
        done = self.bertpre(*args, "--ckpt_path", "last", log="resumed")
        if done.returncode:
            return {"ok": False, "error": last_line(done)}
        reference = dict(series(read_metrics(self.work / "runs" / "eager"), "train/loss"))
        versions = [series(rows, "train/loss") for rows in read_metrics_versions(self.work / "runs" / run)]
        if len(versions) < 2:
            return {"ok": False, "error": f"expected the killed and the resumed run's logs, found {len(versions)}"}
        before = [(s, v, reference[s]) for s, v in versions[0] if s in reference]  # the killed process's
        pairs = [(s, v, reference[s]) for s, v in versions[-1] if s in reference]  # the resumed process's
        if not pairs:
            return {"ok": False, "error": "no loss of the resumed run to compare (did the eager stage run?)"}
        worst = max(abs(v - r) / abs(r) for _, v, r in pairs)
        tolerance = RESUME_TOLERANCE[self.device.type]
        return {"ok": worst <= tolerance and f"trained {steps} steps" in done.stdout, "killed_at_step": killed_at,
                "compared_steps": len(pairs), "max_relative_loss_difference": worst, "tolerance": tolerance,
                # two runs of the same steps without any resume: the noise floor of this device
                "before_kill_max_relative_difference": max((abs(v - r) / abs(r) for _, v, r in before), default=None),
                "losses": [[s, round(v, 5), round(r, 5)] for s, v, r in pairs],
                "losses_before_kill": [[s, round(v, 5), round(r, 5)] for s, v, r in before]}

    def stage_fp16(self) -> dict:
        steps = self.o.fp16_steps
        extra = ["--model.nonfinite", "skip", "--model.compile", "false"]
        if self.device.type == "cuda":
            extra += ["--trainer.precision", "16-mixed"]
        else:  # Lightning turns 16-mixed into bf16 on a CPU: a GradScaler plugin instead, as on CUDA
            overlay = self.work / "fp16.yaml"
            overlay.write_text(yaml.safe_dump({"trainer": {"precision": None, "plugins": [
                {"class_path": "lightning.pytorch.plugins.precision.MixedPrecision",
                 "init_args": {"precision": "16-mixed", "device": "cpu"}}]}}))
            extra += ["--config", str(overlay)]
        done = self.bertpre(*self.train_args("fp16", steps, *extra), log="fp16")
        if done.returncode:
            return {"ok": False, "error": last_line(done)}
        losses = series(read_metrics(self.work / "runs" / "fp16"), "train/loss")
        finite = bool(losses) and all(math.isfinite(v) for _, v in losses)
        return {"ok": finite and f"trained {steps} steps" in done.stdout, "steps": steps, "loss_finite": finite,
                "skipped_lines": done.stdout.count("batch skipped")}

    def bench_options(self, compile: bool):
        """``bertpre bench``'s options for the preset's step as this check times it: bf16, its batch."""
        from bertpre.perf.bench import BenchOptions

        return BenchOptions(preset="bert-tiny" if self.o.miniature else self.o.preset,
                            batch_size=self.o.batch_size, seq_length=self.o.seq_length,
                            vocab_size=self.o.vocab_size, steps=self.o.bench_steps, warmup=3,
                            precision="bf16", compile=compile)

    def _bench(self, compile: bool) -> dict:
        from bertpre.perf.bench import run_bench

        result = run_bench(self.bench_options(compile))
        return {"ok": True, "speedup": result["speedup"], **result["frameworks"], "machine": result["machine"]}

    def stage_bench(self) -> dict:
        return self._bench(compile=False)

    def stage_bench_compiled(self) -> dict:
        return self._bench(compile=True)

    def stage_profile(self) -> dict:
        return self._profile(compile=False)

    def stage_profile_compiled(self) -> dict:
        return self._profile(compile=True)

    def _profile(self, compile: bool) -> dict:
        """bertpre's step profiled; eager, transformers' too (compiled, it would cost another compile)."""
        from bertpre.perf.breakdown import step_profile

        steps = 3 if self.o.miniature else 5
        result = {"ok": True, **step_profile(self.device, self.bench_options(compile), steps)}
        if not compile:
            result["transformers"] = step_profile(self.device, self.bench_options(compile), steps, "transformers")
        return result

    def stage_attention(self) -> dict:
        from bertpre.model.bert import BertConfig
        from bertpre.perf.gpucheck_kernels import attention_timings

        config = BertConfig.from_preset(self.o.preset)
        heads, size = (2, 32) if self.o.miniature else (config.num_heads, config.hidden_size // config.num_heads)
        return attention_timings(self.device, self.o.batch_size, heads, self.o.seq_length, size)

    def stage_large(self) -> dict:
        from bertpre.model.bert import BertConfig
        from bertpre.perf.gpucheck_kernels import largest_batch

        config = BertConfig.from_preset(self.o.large_preset, vocab_size=self.o.vocab_size)
        if self.o.miniature:
            config = BertConfig(vocab_size=self.o.vocab_size, **MINIATURE_LARGE)
        return largest_batch(self.device, config, self.o.large_preset, self.o.large_batch_sizes, self.o.seq_length,
                             repeats=3 if self.o.miniature else 5)

    def stage_recipe(self) -> dict:
        data = self.work / "recipe-data"
        done = self.bertpre("prepare", "--input", *self.o.corpus, "--output", str(data), "--vocab-size",
                            "1024" if self.o.miniature else "8192", "--max-seq-length", "64", "--overwrite",
                            log="recipe-prepare")
        if done.returncode:
            return {"ok": False, "error": last_line(done)}
        minutes = self.o.recipe_minutes
        seconds = max(1, round(60 * minutes))
        args = ["train", "--config", str(ROOT / "configs" / "bert-mini-cpu.yaml"), "--data.path", str(data),
                "--trainer.default_root_dir", str(self.work / "runs" / "recipe"),
                "--trainer.max_time", f"00:00:{seconds // 60:02d}:{seconds % 60:02d}",
                "--trainer.enable_progress_bar", "false", "--data.num_workers", str(self.o.num_workers),
                "--overwrite", "true"]
        if self.device.type == "cuda":  # the config is written for a CPU
            args += ["--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed"]
        if self.o.miniature:
            args += MINIATURE_MODEL + ["--trainer.val_check_interval", "10", "--trainer.limit_val_batches", "2"]
        else:
            args += ["--trainer.val_check_interval", "2000"]
        done = self.bertpre(*args, log="recipe")
        if done.returncode:
            return {"ok": False, "error": last_line(done)}
        metrics = read_metrics(self.work / "runs" / "recipe")
        curve = [(s, v) for s, v in series(metrics, "val/mlm_accuracy")]
        gains = dict(series(metrics, "val/mlm_context_gain"))
        steps = max((s for s, _ in series(metrics, "train/loss")), default=0) + 1
        return {"ok": bool(curve), "minutes": minutes, "steps": steps, **throughput(metrics),
                "val_curve": [[s, round(v, 4), round(gains.get(s, float("nan")), 4)] for s, v in curve],
                "val_mlm_accuracy": curve[-1][1] if curve else None,
                "val_mlm_context_gain": gains.get(curve[-1][0]) if curve else None}


# --- helpers ------------------------------------------------------------------------------------
def run_gpu_check(options: GpuCheckOptions) -> dict:
    if not (ROOT / "configs").is_dir():
        raise UserError(f"configs/ not found beside the bertpre package ({ROOT}): run gpu-check from a checkout "
                        "of the repository")
    if options.steps < 4 or options.steps % 2:
        raise UserError(f"--steps must be an even number of at least 4, got {options.steps}")
    for path in [*options.inputs, *(options.corpus or [])]:
        if not Path(path).exists():
            raise UserError(f"{'--input' if path in options.inputs else '--corpus'} {path}: not found")
    unknown = [s for s in options.stages if s not in STAGES]
    if unknown:
        raise UserError(f"--stages: unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    check_apart(options.output, [*options.inputs, *(options.corpus or [])])
    check_replaceable(options.output, options.overwrite, "folder")
    why = None if options.miniature else missing_cuda()
    if why:  # the full-size stages train bert-base and bert-large: hours on a CPU
        raise UserError(f"no GPU to check: {why}; --miniature runs every stage with tiny models on a CPU")
    options.output.mkdir(parents=True, exist_ok=True)
    check = Check(options)
    results = check.run()
    (options.output / "gpu_check.txt").write_text(format_table(results) + "\n")
    return results
