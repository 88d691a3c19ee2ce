#!/usr/bin/env bash
# Reproduces the bundled model in fastgpt/default_model/ from text every Python install carries.
#
#   scripts/train_default_model.sh [RUN_DIR]
#
# `fastgpt train --corpus stdlib` gathers pydoc_data's help topics and the standard library's docstrings
# at run time (nothing is downloaded), trains a 4096-token byte-level BPE on the training split, then a
# 4-layer, 192-wide GPT-2 (2.6M parameters, 256-token context) on 2 CPU threads. The run (checkpoints,
# tokenised data, training.json) stays in RUN_DIR; the final model (fp16 weights: 5.2 MB) and its
# tokenizer are copied into the package. Re-running into an existing RUN_DIR continues that run
# (--resume) instead of starting over.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
run_dir="${1:-${TMPDIR:-/tmp}/fastgpt-default-model-run}"
dest="$repo/fastgpt/default_model"

start=$(date +%s)
TRITON_INTERPRET=0 python -m fastgpt train \
    --corpus stdlib --val-fraction 0.05 --vocab-size 4096 \
    --n-layer 4 --n-head 6 --n-embd 192 --n-positions 256 --block-size 256 \
    --batch-size 16 --grad-accum 1 --max-steps 600 --lr 2e-3 --min-lr 2e-4 --warmup-steps 40 \
    --weight-decay 0.1 --grad-clip 1.0 \
    --eval-interval 150 --eval-iters 8 --checkpoint-interval 150 --log-interval 20 \
    --seed 0 --device cpu --threads 2 --save-dtype float16 \
    --out "$run_dir" --resume
end=$(date +%s)

mkdir -p "$dest"
for f in config.json model.safetensors tokenizer.json vocab.json merges.txt special_tokens_map.json \
         tokenizer_config.json training.json; do
    cp "$run_dir/$f" "$dest/$f.tmp" && chmod 644 "$dest/$f.tmp" && mv "$dest/$f.tmp" "$dest/$f"  # never half-copied
done
echo "wall clock $((end - start)) s; bundled model in $dest ($(du -sh "$dest" | cut -f1))" >&2
