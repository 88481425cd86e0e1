"""What the two neighbours of a masked token tell, counted: a yardstick for val/mlm_accuracy.

From the train split of a prepared folder it counts, for every token, the token before it and
the pair (token before, token after); on the validation split it predicts a sample of
positions (one in seven, as 15% masking picks) from those counts alone, with no model:

- unigram: always the most frequent token (the majority baseline training logs);
- left: the most frequent token after the one before it;
- left+right: the most frequent token between the two neighbours (left, then unigram, when
  the pair was never seen).

An encoder that reads its neighbours as well as these counts do scores about
0.8 * left+right + 0.1 (kept tokens) + 0.1 * unigram on val/mlm_accuracy (80% of predicted
positions are [MASK], 10% keep the token, 10% show a random one).

    python studies/neighbour_baseline.py out/gutenberg
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from bertpre.data.prepared import PreparedData
from bertpre.data.tokenizer import special_ids


def most_frequent(counts: dict) -> dict:
    return {key: c.most_common(1)[0][0] for key, c in counts.items()}


def neighbour_baseline(folder: Path, share: float = 0.15, seed: int = 0) -> dict:
    prepared = PreparedData(folder)
    splits = prepared.load_dataset()
    ids_of = special_ids(prepared.tokenizer)
    special = {ids_of.cls, ids_of.sep, ids_of.pad}
    between, after, unigram = defaultdict(Counter), defaultdict(Counter), Counter()
    for ids in splits["train"].with_format("numpy")["input_ids"]:
        ids = ids.tolist()
        for i in range(1, len(ids) - 1):
            if ids[i] in special:
                continue
            between[ids[i - 1], ids[i + 1]][ids[i]] += 1
            after[ids[i - 1]][ids[i]] += 1
            unigram[ids[i]] += 1
    best_between, best_after = most_frequent(between), most_frequent(after)
    top = unigram.most_common(1)[0][0]
    rng = np.random.default_rng(seed)
    hits = Counter()
    n = 0
    for ids in splits["validation"].with_format("numpy")["input_ids"]:
        ids = ids.tolist()
        candidates = [i for i in range(1, len(ids) - 1) if ids[i] not in special]
        for i in rng.choice(candidates, size=max(1, round(len(candidates) * share)), replace=False):
            n += 1
            left_guess = best_after.get(ids[i - 1], top)
            hits["unigram"] += top == ids[i]
            hits["left"] += left_guess == ids[i]
            hits["left+right"] += best_between.get((ids[i - 1], ids[i + 1]), left_guess) == ids[i]
    result = {name: hits[name] / n for name in ("unigram", "left", "left+right")}
    result["positions"] = n
    result["expected_val_mlm_accuracy"] = 0.8 * result["left+right"] + 0.1 + 0.1 * result["unigram"]
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="a folder written by `bertpre prepare`")
    args = p.parse_args(argv)
    r = neighbour_baseline(args.data)
    print(f"{args.data}: {r['positions']} validation positions; accuracy from counts: unigram {r['unigram']:.3f}, "
          f"left neighbour {r['left']:.3f}, both neighbours {r['left+right']:.3f}; "
          f"as val/mlm_accuracy (80/10/10): {r['expected_val_mlm_accuracy']:.3f}")


if __name__ == "__main__":
    main()
