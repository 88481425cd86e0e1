#!/usr/bin/env bash
# ChnSentiCorp transfer for the Chinese study (README.md here): continued pretraining of each arm on
# ChnSentiCorp's training text (labels dropped), then fine-tuning 2,000-review subsets (3 seeds) from
# each encoder and from random weights. Run from the repository root, alone on the machine, after
# the pretraining arms (runs/zh-study/wwm, char and ngram). On a 2-core VM alone: each `tapt` of 1,400
# steps about 9 minutes; each fine-tune of 2,000 reviews x 5 epochs about 3.5 minutes (a `transfer`
# line runs 3 seeds, and 3 more from random weights unless it borrows them with --random-from).
set -euo pipefail
TASK=../shared/data/tasks/chnsenticorp
OUT=studies/chinese-wwm/transfer
if [ ! -d out/chnsenti-64 ]; then
    python data_prep/task_text.py $TASK/train.tsv --output out/chnsenti-text/train.txt \
        --sentences-per-document 1 --split-sentences
    bertpre prepare --input out/chnsenti-text --output out/chnsenti-64 --tokenizer out/novels-64 \
        --max-seq-length 64 --format lines --word-segmenter rjieba
fi
if [ ! -d out/chnsenti-128 ]; then  # the same text at pairs of 128, what fine-tuning reads
    bertpre prepare --input out/chnsenti-text --output out/chnsenti-128 --tokenizer out/novels-64 \
        --max-seq-length 128 --format lines --word-segmenter rjieba
fi
tapt() {  # run, arm, extra options: 1,400 steps (64 x 64 unless told) on the reviews' text from the arm's last checkpoint
    bertpre train --config configs/bert-mini-zh-cpu.yaml --data.path out/chnsenti-64 \
        --model.init_from runs/zh-study/$2/checkpoints/last.ckpt --model.schedule_by steps \
        --trainer.max_steps 1400 --trainer.max_time null --trainer.val_check_interval 200 \
        --trainer.default_root_dir runs/zh-study/$1 "${@:3}" > runs/zh-study/$1.log 2>&1
}
transfer() {  # name, checkpoint, extra options
    python -m studies.transfer_study "$2" --output $OUT/$1 --train $TASK/train.tsv --dev $TASK/dev.tsv \
        --examples 2000 --learning-rates 3e-4 --runs runs/zh-transfer/$1 "${@:3}"
}
[ -f runs/zh-study/wwm-tapt/checkpoints/last.ckpt ] || tapt wwm-tapt wwm
transfer wwm-tapt runs/zh-study/wwm-tapt/checkpoints/last.ckpt
[ -f runs/zh-study/char-tapt/checkpoints/last.ckpt ] || tapt char-tapt char --data.whole_word_masking false
RANDOM_RUNS=(--random-from $OUT/wwm-tapt/results.json)
transfer char-tapt runs/zh-study/char-tapt/checkpoints/last.ckpt "${RANDOM_RUNS[@]}"
transfer wwm runs/zh-study/wwm/checkpoints/last.ckpt "${RANDOM_RUNS[@]}"
transfer char runs/zh-study/char/checkpoints/last.ckpt "${RANDOM_RUNS[@]}"
# the character arm's continued pretraining at pairs of 128 (batch 32: the same tokens per step)
[ -f runs/zh-study/char-tapt128/checkpoints/last.ckpt ] || tapt char-tapt128 char --data.whole_word_masking false \
    --data.path out/chnsenti-128 --data.batch_size 32
transfer char-tapt128 runs/zh-study/char-tapt128/checkpoints/last.ckpt "${RANDOM_RUNS[@]}"
# fewer labelled reviews, from the best encoder (random weights rerun at each size); the novels alone at 500
transfer char-tapt-1000 runs/zh-study/char-tapt/checkpoints/last.ckpt --examples 1000
transfer char-tapt-500 runs/zh-study/char-tapt/checkpoints/last.ckpt --examples 500
transfer char-500 runs/zh-study/char/checkpoints/last.ckpt --examples 500 --random-from $OUT/char-tapt-500/results.json
# the same 500 reviews for 20 epochs (300 optimizer steps), so random weights have steps to leave the majority label
transfer char-tapt-500-20ep runs/zh-study/char-tapt/checkpoints/last.ckpt --examples 500 --epochs 20
# the character arm's continued pretraining for 5,000 steps (19 passes over the reviews' text instead of 5.4)
[ -f runs/zh-study/char-tapt5k/checkpoints/last.ckpt ] || tapt char-tapt5k char --data.whole_word_masking false \
    --trainer.max_steps 5000 --trainer.val_check_interval 500
transfer char-tapt5k runs/zh-study/char-tapt5k/checkpoints/last.ckpt "${RANDOM_RUNS[@]}"
transfer char-tapt5k-500-20ep runs/zh-study/char-tapt5k/checkpoints/last.ckpt --examples 500 --epochs 20 \
    --random-from $OUT/char-tapt-500-20ep/results.json
# fine-tuning at lr 1e-4 instead of 3e-4 (the later --learning-rates wins), the best encoder and random weights
transfer char-tapt-lr1e-4 runs/zh-study/char-tapt/checkpoints/last.ckpt --learning-rates 1e-4
# MacBERT's n-gram masking (whole words in spans of up to 4, data.max_ngram 4): its own novels arm (the
# README's pretraining command with --data.max_ngram 4, runs/zh-study/ngram), continued pretraining on the
# reviews' text masked the same way, then 2,000 reviews, 500 reviews in 20 epochs, and the novels alone
[ -f runs/zh-study/ngram-tapt/checkpoints/last.ckpt ] || tapt ngram-tapt ngram --data.max_ngram 4
transfer ngram-tapt runs/zh-study/ngram-tapt/checkpoints/last.ckpt "${RANDOM_RUNS[@]}"
transfer ngram-tapt-500-20ep runs/zh-study/ngram-tapt/checkpoints/last.ckpt --examples 500 --epochs 20 \
    --random-from $OUT/char-tapt-500-20ep/results.json
transfer ngram runs/zh-study/ngram/checkpoints/last.ckpt "${RANDOM_RUNS[@]}"
# the n-gram encoder after the reviews' text with its pooler re-initialised (2,000 reviews)
transfer ngram-tapt-reinit-pooler runs/zh-study/ngram-tapt/checkpoints/last.ckpt --reinit-pooler "${RANDOM_RUNS[@]}"
# every labelled review (all 6,565, 5 epochs; the seeds vary the new weights, dropout and data order), from the best
# path's encoder (n-gram, the reviews' text, pooler re-initialised) and from random weights: about 11.5
# minutes a fine-tune
transfer ngram-tapt-reinit-pooler-all runs/zh-study/ngram-tapt/checkpoints/last.ckpt --reinit-pooler --examples 6565
# random weights at 2,000 reviews again on code with a422d7f (before it, a random-weight run drew its classifier
# head, dropout and data order from seed 0 whatever its seed; its subset did follow the seed): on such code this
# line runs both sides, and the pretrained ones repeat ngram-tapt-reinit-pooler's (the study copied them)
transfer ngram-tapt-reinit-pooler-reseeded runs/zh-study/ngram-tapt/checkpoints/last.ckpt --reinit-pooler
# the same at 500 reviews in 20 epochs (the pretrained runs repeat ngram-tapt-500-20ep's, which the study copied)
transfer ngram-tapt-500-20ep-reseeded runs/zh-study/ngram-tapt/checkpoints/last.ckpt --examples 500 --epochs 20
# the character arm's encoder after the reviews' text against those random weights (500 x 20 epochs): reruns its
# fine-tunes and borrows the rerun random-weight runs (needs runs/zh-study/char-tapt, rebuilt with the lines above)
transfer char-tapt-500-20ep-reseeded runs/zh-study/char-tapt/checkpoints/last.ckpt --examples 500 --epochs 20 \
    --random-from $OUT/ngram-tapt-500-20ep-reseeded/results.json
