"""The performance commands' arguments: ``bertpre bench`` (bertpre.perf.bench) and ``bertpre
gpu-check`` (bertpre.perf.gpucheck). bertpre.cli dispatches to them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def bench_parser() -> argparse.ArgumentParser:
    from bertpre.model.bert import PRESETS

    p = argparse.ArgumentParser(
        prog="bertpre bench",
        description="Time bertpre's training step and transformers' BertForPreTraining (sdpa) on the same "
                    "config, batch and optimizer, alternating, and print the speed-up, peak memory and MFU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--presets", nargs="+", default=["bert-tiny", "bert-mini", "bert-small"], choices=list(PRESETS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--steps", type=int, default=5, help="timed steps per framework")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per framework first")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", default="32", choices=["32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense peak in TFLOP/s for MFU (default: the datasheet figure of a known "
                        "GPU part, a measured matmul peak on CPU)")
    p.add_argument("--profile", action="store_true",
                   help="then profile each framework's step (a fresh model, compiled again with --compile; 5 steps "
                        "under torch.profiler after 3 of warm-up): its kernel time (on CPU, operator time) by "
                        "category, and the rate its matrix products reach")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    return p


def bench_command(argv: Sequence[str]) -> None:
    import json

    from bertpre.outputs import atomic_write, check_replaceable
    from bertpre.perf.bench import BenchOptions, format_result, run_bench
    from bertpre.training.checkpointing import check_writable

    p = bench_parser()
    args = p.parse_args(argv)
    if args.output:  # before the timing, not after it
        check_replaceable(args.output, args.overwrite, "file")
        check_writable(Path(args.output).absolute().parent, "--output")
    results = []
    for preset in args.presets:
        options = BenchOptions(preset, args.batch_size, args.seq_length, args.vocab_size, args.steps, args.warmup,
                               args.device, args.precision, args.compile, args.peak_tflops)
        results.append(run_bench(options))
        print(format_result(results[-1]), flush=True)
        if args.profile:
            from bertpre.perf.bench import FRAMEWORKS
            from bertpre.perf.breakdown import format_profile, step_profile

            results[-1]["profile"] = {}
            for framework in FRAMEWORKS:
                profile = results[-1]["profile"][framework] = step_profile(options.resolved_device(), options,
                                                                          framework=framework)
                print(f"{framework}, profiled: " + format_profile(profile), flush=True)
    if args.output:
        atomic_write(args.output, lambda f: f.write(json.dumps(results, indent=2).encode()), "--output " + args.output)


def gpu_check_parser() -> argparse.ArgumentParser:
    from bertpre.perf.gpucheck import STAGES
    from bertpre.training.options import COMPILE_MODES

    p = argparse.ArgumentParser(
        prog="bertpre gpu-check",
        description="Check the GPU path in a few minutes: prepare the bundled sample, train the shipped config "
                    "eager and compiled (tokens/s, MFU, peak memory, loss falling), kill and resume a run, train "
                    "in fp16, bench against transformers, time the attention kernels, find the largest batch of "
                    "bert-large; writes DIR/gpu_check.json and DIR/gpu_check.txt. Run it from the repository.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", required=True, type=Path, metavar="DIR", help="work folder (data, runs, results)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty work folder")
    p.add_argument("--preset", default="bert-base", help="the config trained: configs/PRESET.yaml")
    p.add_argument("--large-preset", default="bert-large")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=None, help="steps of each training run, even (default 200; "
                   "20 with --miniature)")
    p.add_argument("--num-workers", type=int, default=8, help="data loader workers of each training run")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, help="the compiled stage's model.compile_mode")
    p.add_argument("--input", nargs="+", default=None, metavar="PATH", help="text to prepare (default: the "
                   "bundled sample)")
    p.add_argument("--corpus", nargs="+", default=None, metavar="PATH",
                   help="also train configs/bert-mini-cpu.yaml's recipe on this text for --recipe-minutes")
    p.add_argument("--recipe-minutes", type=float, default=None, help="default 5 (0.3 with --miniature)")
    p.add_argument("--stages", nargs="+", default=[], choices=STAGES, metavar="STAGE",
                   help=f"run only these ({', '.join(STAGES)})")
    p.add_argument("--miniature", action="store_true",
                   help="tiny models and few steps (any machine, a CPU too): what the project's tests run")
    return p


def gpu_check_command(argv: Sequence[str]) -> None:
    from bertpre.perf.gpucheck import GpuCheckOptions, run_gpu_check
    from bertpre.perf.gpucheck_results import format_table

    args = gpu_check_parser().parse_args(argv)
    values = dict(preset=args.preset, large_preset=args.large_preset, corpus=args.corpus,
                  stages=tuple(args.stages), overwrite=args.overwrite, compile_mode=args.compile_mode)
    for name in ("steps", "recipe_minutes"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.input:
        values["inputs"] = args.input
    if args.miniature:
        options = GpuCheckOptions.miniature_options(args.output, **values)
    else:
        options = GpuCheckOptions(args.output, batch_size=args.batch_size, num_workers=args.num_workers, **values)
    results = run_gpu_check(options)
    print(format_table(results))
    if not results["ok"]:
        sys.exit(1)
