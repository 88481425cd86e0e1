"""Benchmark `bertpre prepare`: throughput, peak memory, scaling with corpus size and processes.

    python studies/bench_prepare.py [--corpus DIR] [--repeat 10] [--num-proc 1 2] [--json FILE]

Steps, each a separate `bertpre` process timed from start to exit, its peak memory taken as
the largest summed PSS (proportional set size: resident memory, pages shared between the
forked workers counted once) of the process and its workers, sampled every 20 ms, and the
largest RSS of any one of them:

1. the corpus (default: ../shared/data/corpora/gutenberg) written one sentence per line, as
   Google's create_pretraining_data.py expects, then repeated --repeat times into a larger file;
2. `bertpre tokenizer` on the 1x file (8,192 tokens, as in SPEC.md's reference run);
3. `bertpre prepare --tokenizer` on the 1x and the larger file for each --num-proc;
4. `bertpre prepare --tokenizer` on the raw prose files (sentence splitting included);
5. `bertpre tokenizer` on the larger file with the default and a smaller --tokenizer-sample-mb.

Throughput is input megabytes (10^6 bytes) per second of wall time, start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "corpora" / "gutenberg"


def tree_memory(pid: int) -> tuple[int, int]:
    """(summed PSS, largest RSS) in bytes of ``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    pss = rss = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        stack.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line and not line.startswith("0"))
        except OSError:
            continue
        pss += int(fields["Pss"].split()[0]) * 1024
        rss = max(rss, int(fields["Rss"].split()[0]) * 1024)
    return pss, rss


def run(argv: list[str]) -> dict:
    """Run a command; wall seconds and the peak memory of its process tree."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_pss = peak_rss = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_pss, peak_rss
        while not done.is_set():
            pss, rss = tree_memory(process.pid)
            peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = process.communicate()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - start
    if process.returncode:
        sys.exit(f"failed: {' '.join(argv)}\n{err}")
    return {"seconds": round(seconds, 2), "peak_pss_mb": round(peak_pss / 1e6),
            "peak_rss_one_process_mb": round(peak_rss / 1e6), "stdout": out}


def bertpre(*args: str) -> list[str]:
    return [sys.executable, "-m", "bertpre.cli", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="folder of raw prose .txt files")
    parser.add_argument("--repeat", type=int, default=10, help="size of the larger input, in copies of the corpus")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--workdir", type=Path, default=None, help="keep intermediate files here")
    args = parser.parse_args()
    if not args.corpus.is_dir():
        sys.exit(f"--corpus {args.corpus}: not found")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bertpre-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    prose = sorted(p for p in args.corpus.glob("*.txt") if p.name != "SOURCE.txt")
    lines = work / "corpus-lines.txt"
    subprocess.run([sys.executable, str(ROOT / "data_prep" / "to_sentence_lines.py"), *map(str, prose),
                    "--output", str(lines)], check=True, stdout=subprocess.DEVNULL)
    big = work / f"corpus-lines-x{args.repeat}.txt"
    with big.open("wb") as out:
        for _ in range(args.repeat):
            with lines.open("rb") as f:
                shutil.copyfileobj(f, out)
                out.write(b"\n")
    size = {"1x": lines.stat().st_size, f"{args.repeat}x": big.stat().st_size,
            "prose": sum(p.stat().st_size for p in prose)}
    results: dict = {
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}",
        "input_bytes": size,
    }

    def report(name: str, result: dict, nbytes: int | None = None) -> None:
        result.pop("stdout", None)
        if nbytes:
            result["mb_per_s"] = round(nbytes / 1e6 / result["seconds"], 2)
        results[name] = result
        print(f"{name:<44} {result['seconds']:>7.2f} s  {result.get('mb_per_s', ''):>6} MB/s  "
              f"peak PSS {result['peak_pss_mb']:>5} MB  (largest process RSS {result['peak_rss_one_process_mb']} MB)",
              flush=True)

    tokenizer = work / "tokenizer"
    report("tokenizer 1x", run(bertpre("tokenizer", "--input", str(lines), "--output", str(tokenizer),
                                       "--vocab-size", str(args.vocab_size), "--overwrite")), size["1x"])
    for num_proc in args.num_proc:
        for name, path in (("1x", lines), (f"{args.repeat}x", big)):
            out = work / f"prepared-{name}-{num_proc}"
            report(f"prepare lines {name} --num-proc {num_proc}",
                   run(bertpre("prepare", "--input", str(path), "--output", str(out), "--tokenizer", str(tokenizer),
                               "--format", "lines", "--num-proc", str(num_proc), "--overwrite")), size[name])
            shutil.rmtree(out)
    out = work / "prepared-prose"
    report(f"prepare prose 1x --num-proc {max(args.num_proc)}",
           run(bertpre("prepare", "--input", *map(str, prose), "--output", str(out), "--tokenizer", str(tokenizer),
                       "--num-proc", str(max(args.num_proc)), "--overwrite")), size["prose"])
    shutil.rmtree(out)
    for sample_mb in (100, 20):
        report(f"tokenizer {args.repeat}x --tokenizer-sample-mb {sample_mb}",
               run(bertpre("tokenizer", "--input", str(big), "--output", str(work / "tok-big"), "--vocab-size",
                           str(args.vocab_size), "--tokenizer-sample-mb", str(sample_mb), "--overwrite")))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
