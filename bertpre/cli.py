"""The ``bertpre`` command: ``prepare`` (argparse) and ``train`` (LightningCLI)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import bertpre
from bertpre.errors import UserError
from bertpre.perf.commands import bench_command, bench_parser, gpu_check_command, gpu_check_parser

USAGE = """usage: bertpre {prepare,tokenizer,combine,inspect,train,curves,bench,gpu-check,export,import,finetune,predict} ...

  prepare   raw text -> tokenizer + sentence-pair dataset      bertpre prepare --help
  tokenizer train only the tokenizer (before sharded prepare)   bertpre tokenizer --help
  combine   join sharded prepare outputs into one folder        bertpre combine DIR... --output DIR
  inspect   statistics and a figure of a prepared folder        bertpre inspect DIR
  train     pretrain with MLM + NSP from a YAML config          bertpre train --help
  curves    draw a run's curves (loss, accuracy, context gain)  bertpre curves RUN
  bench     time bertpre's training step against transformers'  bertpre bench --help
  gpu-check the GPU path in a few minutes: speed, MFU, compile,     bertpre gpu-check --output DIR
            resume, fp16, bert-large's largest batch
  export    checkpoint -> HuggingFace directory (pretrained or   bertpre export CKPT --output DIR
            fine-tuned)
  import    HuggingFace BERT directory -> bertpre checkpoint     bertpre import DIR --output CKPT
  finetune  sequence classification from a YAML config          bertpre finetune --help
  predict   label a file with a fine-tuned checkpoint           bertpre predict --help
"""


def _input_arguments(p: argparse.ArgumentParser) -> None:
    from bertpre.data.corpus import FORMATS

    io = p.add_argument_group("input and output")
    io.add_argument("--input", nargs="+", required=True, metavar="PATH",
                    help="files (text, .gz/.bz2/.xz, .jsonl, .parquet), folders, saved datasets or glob patterns")
    io.add_argument("--output", required=True, type=Path, metavar="DIR", help="output folder")
    io.add_argument("--format", default="auto", choices=FORMATS,
                    help="lines: one sentence per line, blank line between documents; prose: wrapped text, "
                         "split into sentences here; jsonl: one document per line; auto: by extension and content")
    io.add_argument("--text-field", default="text",
                    help="JSONL field or Parquet / saved-dataset column holding a document's text")
    io.add_argument("--doc-separator", default=None, metavar="REGEX",
                    help=r"a line matching this starts a new document and is dropped, e.g. '^ = [^=].* = $' for WikiText")
    io.add_argument("--encoding", default="utf-8",
                    help="of text files without a byte-order mark, e.g. gb18030 (GBK) or big5 for Chinese corpora; "
                         "a UTF-16/32 or UTF-8 BOM names its own encoding")
    io.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    io.add_argument("--skip-unreadable", action="store_true",
                    help="skip (and list in prepare.json) input files that cannot be read, instead of stopping")


def _tokenizer_training_arguments(group) -> None:
    group.add_argument("--vocab-size", type=int, default=30522, help="vocabulary size of a trained tokenizer")
    group.add_argument("--cased", action="store_true", help="keep case (without it, text is lowercased)")
    group.add_argument("--tokenizer-sample-mb", type=float, default=100.0,
                       help="train the tokenizer on a random sample of documents holding about this much text")


def _corpus_options(args: argparse.Namespace):
    from bertpre.data.corpus import CorpusOptions

    return CorpusOptions(format=args.format, text_field=args.text_field, doc_separator=args.doc_separator,
                         skip_unreadable=args.skip_unreadable, encoding=args.encoding)


def prepare_parser():
    """``bertpre prepare``'s options, also readable from a YAML file (``--config``, keys as the
    option names with underscores) and printable as one (``--print_config``): the same config
    machinery (jsonargparse) as ``train``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(
        prog="bertpre prepare",
        description="Turn raw text into a WordPiece tokenizer and a sentence-pair dataset for MLM + NSP. "
                    "Options can come from a YAML file (--config prepare.yaml, keys as below with "
                    "underscores); the command line wins; --print_config prints the resolved options.",
        exit_on_error=True,
    )
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    _input_arguments(p)
    scale = p.add_argument_group("scale")
    scale.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)),
                       help="worker processes (the output is the same for any number)")
    scale.add_argument("--shard-index", type=int, default=0, help="prepare only this shard of the input files")
    scale.add_argument("--num-shards", type=int, default=1,
                       help="split the input files into this many shards (needs --tokenizer; join with bertpre combine)")
    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", default=None, metavar="PATH",
                     help="reuse a tokenizer.json, a vocab.txt or an earlier prepare's output instead of training one")
    _tokenizer_training_arguments(tok)
    pairs = p.add_argument_group("sentence pairs")
    pairs.add_argument("--objective", default="nsp",  # checked by PairOptions: one line naming the choices
                       help="the sentence objective the data is made for: nsp (BERT: B follows A or is random), sop "
                            "(ALBERT: A and B consecutive, swapped half the time) or none (RoBERTa: full sequences "
                            "of one segment, MLM only); training follows the data")
    pairs.add_argument("--max-seq-length", type=int, default=128,
                       help="tokens per pair, [CLS] A [SEP] B [SEP] included (the model's sequence length)")
    pairs.add_argument("--short-seq-prob", type=float, default=None,
                       help="probability of a shorter target length (default 0.1; 0 for --objective none)")
    pairs.add_argument("--nsp-probability", type=float, default=0.5, help="probability that B is a random segment")
    pairs.add_argument("--validation-fraction", type=float, default=0.05,
                       help="fraction of documents held out for validation")
    pairs.add_argument("--seed", type=int, default=12345,
                       help="seed of the split, the pairs and the tokenizer's document sample (same seed, same output)")
    pairs.add_argument("--dupe-factor", type=int, default=1,
                       help="number of passes over the corpus, each with different pairs (and masks)")
    masking = p.add_argument_group("masking (default: dynamic, at training time)")
    masking.add_argument("--static-masking", action="store_true",
                         help="store masks in the dataset, as Google's generator does")
    masking.add_argument("--whole-word-masking", action="store_true", help="with --static-masking")
    masking.add_argument("--max-ngram", type=int, default=1, metavar="N",
                         help="with --static-masking: mask spans of up to N consecutive words (tokens without "
                              "--whole-word-masking), MacBERT's n-gram masking; 1: each alone")
    words = p.add_argument_group("word boundaries (Chinese whole-word masking)")
    words.add_argument("--word-segmenter", default=None,  # checked by WordOptions
                       help="segment Chinese text into words with this segmenter (rjieba: the zh extra, pip install -e '.[zh]') "
                            "and store the boundaries, so that whole-word masking masks whole Chinese words")
    words.add_argument("--user-dict", default=None, metavar="FILE",
                       help="the segmenter's user dictionary for domain words: one 'word [frequency] [tag]' a line")
    return p


def run_prepare(argv: Sequence[str]) -> None:
    from bertpre.data.pairs import PairOptions
    from bertpre.data.prepare import PrepareOptions, prepare
    from bertpre.data.summary import summary
    from bertpre.data.words import WordOptions

    args = prepare_parser().parse_args(argv)
    options = PrepareOptions(
        inputs=args.input,
        output=args.output,
        corpus=_corpus_options(args),
        pairs=PairOptions(args.max_seq_length, args.short_seq_prob, args.nsp_probability, args.objective),
        words=WordOptions(args.word_segmenter, args.user_dict),
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        cased=args.cased,
        seed=args.seed,
        validation_fraction=args.validation_fraction,
        dupe_factor=args.dupe_factor,
        static_masking=args.static_masking,
        whole_word_masking=args.whole_word_masking,
        max_ngram=args.max_ngram,
        overwrite=args.overwrite,
        num_proc=args.num_proc,
        shard_index=args.shard_index,
        num_shards=args.num_shards,
        tokenizer_sample_mb=args.tokenizer_sample_mb,
    )
    record = prepare(options)
    print(summary(record, args.output))


def tokenizer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bertpre tokenizer",
        description="Train only the WordPiece tokenizer (tokenizer.json + vocab.txt), e.g. once before "
                    "preparing shards with --tokenizer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _input_arguments(p)
    _tokenizer_training_arguments(p)
    p.add_argument("--seed", type=int, default=12345, help="seed of the document sample")
    return p


def run_tokenizer(argv: Sequence[str]) -> None:
    from bertpre.data.prepare import write_tokenizer

    p = tokenizer_parser()
    args = p.parse_args(argv)
    record = write_tokenizer(args.input, args.output, _corpus_options(args), args.vocab_size, args.cased,
                             args.tokenizer_sample_mb, args.seed, args.overwrite)
    print(f"trained {args.output}/tokenizer.json in {record['seconds']} s: vocab {record['vocab_size']}, "
          f"sample {record['sample_chars'] / 1e6:.1f} M characters ({record['sample_sentences']} sentences), "
          f"fingerprint {record['fingerprint']}")


def combine_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bertpre combine",
                                description="Join the outputs of `bertpre prepare --shard-index i --num-shards k` "
                                            "into one prepared folder for training.")
    p.add_argument("shards", nargs="+", metavar="DIR", help="prepared shard folders, in order")
    p.add_argument("--output", required=True, type=Path, metavar="DIR")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return p


def run_combine(argv: Sequence[str]) -> None:
    from bertpre.data.prepared import combine
    from bertpre.data.summary import summary

    p = combine_parser()
    args = p.parse_args(argv)
    print(summary(combine(args.shards, args.output, args.overwrite), args.output))


def inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bertpre inspect",
                                description="Print a prepared folder's statistics and draw them: sequence lengths, "
                                            "NotNext split, token frequencies.")
    p.add_argument("path", metavar="DIR", help="a folder written by `bertpre prepare`")
    p.add_argument("--plot", default=None, metavar="PNG", help="where to write the figure (default: DIR-report.png beside the folder)")
    return p


def run_inspect(argv: Sequence[str]) -> None:
    from bertpre.data.inspect import inspect

    p = inspect_parser()
    args = p.parse_args(argv)
    text, _ = inspect(args.path, args.plot)
    print(text)


def curves_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bertpre curves",
                                description="Draw a training or fine-tuning run's curves (loss, validation MLM accuracy "
                                            "against the majority and random-context lines, context gain, learning "
                                            "rate) into a PNG; every run writes one at its end.")
    p.add_argument("run", metavar="RUN", help="a run folder (trainer.default_root_dir: its newest logs/version_N), "
                                              "a logs/version_N folder or a metrics.csv")
    p.add_argument("--output", default=None, metavar="PNG", help="where to write the figure (default: curves.png "
                                                                 "beside metrics.csv)")
    return p


def run_curves(argv: Sequence[str]) -> None:
    from bertpre.training.curves import plot_curves

    args = curves_parser().parse_args(argv)
    print(f"curves {plot_curves(args.run, args.output)}")


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bertpre export",
                                description="Write a directory that transformers loads: a pretraining checkpoint "
                                            "as BertForPreTraining, a fine-tuning one as "
                                            "BertForSequenceClassification with its label names (not one "
                                            "fine-tuned with model.pooling mean: no transformers class "
                                            "computes it).")
    p.add_argument("checkpoint", help="a .ckpt written by `bertpre train` or `bertpre finetune`")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    return p


def run_export(argv: Sequence[str]) -> None:
    from bertpre.model.export import export_checkpoint

    p = export_parser()
    args = p.parse_args(argv)
    print(f"exported {args.checkpoint} -> {export_checkpoint(args.checkpoint, args.output, args.overwrite)}")


def import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bertpre import",
                                description="Turn a HuggingFace BERT directory (BertForPreTraining, BertForMaskedLM "
                                            "or BertModel) into a bertpre checkpoint for model.init_from.")
    p.add_argument("directory")
    p.add_argument("--output", required=True, help="checkpoint file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint file")
    return p


def run_import(argv: Sequence[str]) -> None:
    from bertpre.model.export import import_hf

    p = import_parser()
    args = p.parse_args(argv)
    initialised = import_hf(args.directory, args.output, args.overwrite)
    print(f"imported {args.directory} -> {args.output}")
    if initialised:
        print(f"  not in the source, initialised afresh: {', '.join(initialised)}")


def run_train(argv: Sequence[str]) -> None:
    from bertpre.lightning_cli import train_cli

    train_cli(list(argv))


def run_finetune(argv: Sequence[str]) -> None:
    from bertpre.lightning_cli import train_cli

    train_cli(list(argv), command="finetune")


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bertpre predict",
                                description="Write a TSV with a 'prediction' column (and with --scores one "
                                            "probability column per class) for every row of a file.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by `bertpre finetune`")
    p.add_argument("--input", required=True, help=".tsv, .csv or .jsonl with the columns used in fine-tuning")
    p.add_argument("--output", required=True, help="TSV file to write")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward pass (default: 64)")
    p.add_argument("--scores", action="store_true",
                   help="add a p_<label> column per class: the softmax probabilities, to pick thresholds")
    p.add_argument("--device", default="auto",
                   help="auto (the first GPU where torch sees one, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def run_predict(argv: Sequence[str]) -> None:
    from bertpre.tasks.predict import predict_file

    p = predict_parser()
    args = p.parse_args(argv)
    rows = predict_file(args.checkpoint, args.input, args.output, args.batch_size, args.overwrite, args.scores,
                        args.device)
    print(f"wrote {rows} predictions to {args.output}")


# the argparse commands' parsers (train and finetune use LightningCLI), for the docs check
PARSERS = {"prepare": prepare_parser, "tokenizer": tokenizer_parser, "combine": combine_parser,
           "inspect": inspect_parser, "curves": curves_parser, "bench": bench_parser, "gpu-check": gpu_check_parser, "export": export_parser,
           "import": import_parser, "predict": predict_parser}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    commands = {"prepare": run_prepare, "tokenizer": run_tokenizer, "combine": run_combine, "inspect": run_inspect,
                "train": run_train, "curves": run_curves, "bench": bench_command, "gpu-check": gpu_check_command, "export": run_export,
                "import": run_import,
                "finetune": run_finetune, "predict": run_predict}
    if not argv:  # a command is required: usage on stderr, exit 2 (like argparse)
        print(USAGE, file=sys.stderr, end="")
        sys.exit(2)
    if argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return
    if argv[0] in ("-V", "--version"):
        print(f"bertpre {bertpre.__version__}")
        return
    if argv[0] not in commands:
        print(f"bertpre: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    try:
        commands[argv[0]](argv[1:])
    except UserError as e:
        message = " ".join(str(e).split())  # one line, whatever a library put into the reason
        print(f"bertpre {argv[0]}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"bertpre {argv[0]}: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # output piped into e.g. `head`, which has exited
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
