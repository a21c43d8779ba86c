#!/usr/bin/env bash
# One session of the default model's CPU campaign (issue 10), on a machine that may be new: what git holds
# (the shipped model, recipes/lm_data) is the only state. Subcommands, run from the repository root:
#
#   recipes/session.sh setup              install the package, the builder's deps; let nice work (below)
#   recipes/session.sh corpus [HOURS]     continue the corpus from recipes/lm_data, in the background
#                                         (2 workers x 1 thread at nice 5; default HOURS: 1 more than packed)
#   recipes/session.sh snapshot NAME [N]  freeze the first N rows (default: all) of data/corpus_big as
#                                         data/NAME, extract tokens, embeddings and mels (exp/cache_big;
#                                         KINDS="tokens" for fewer)
#   recipes/session.sh evalcorpus         data/corpus: the held-out rows of plan index < 854, the set every
#                                         gate figure in MODEL_CARD.md was measured on (a few minutes)
#   recipes/session.sh pack               add the extracted tokens of data/corpus_big to recipes/lm_data
#
# Training runs are plain trainer commands (MODEL_CARD.md gives each build's); start them with nohup.
#
# Lessons of earlier sessions (2-core AMD EPYC), which these defaults encode:
#   * with the kernel's autogroup scheduling on, `nice` does nothing between processes started from
#     different shells: a niced helper took half the CPU from a trainer. `setup` turns it off (root only).
#   * never give a process 2 threads on a core that a trainer uses: the speaker-encoder extraction ran at
#     0.5 utt/s with 2 threads beside a trainer and 16.9 utt/s with 1; the builder with 1 worker x 2 onnx
#     threads made 0.89x real time, with 2 workers x 1 thread ~1.2x.
set -euo pipefail

python=${PYTHON:-python}
M=src/cosyvoice2/assets/default_model
cmd=${1:-}
shift || true

case "$cmd" in
  setup)
    $python -m pip install -q -e ".[serve,dev,train,data,eval]"
    SKIP_PIP=1 bash scripts/setup_data_deps.sh
    if [ -w /proc/sys/kernel/sched_autogroup_enabled ]; then echo 0 > /proc/sys/kernel/sched_autogroup_enabled; fi
    mkdir -p data exp logs
    ;;
  corpus)
    packed=$($python -c "import json;print(json.load(open('recipes/lm_data/lm_data.json'))['hours'])" 2>/dev/null || echo 0)
    hours=${1:-$($python -c "print($packed + 1)")}
    if [ ! -s data/corpus_big/manifest.jsonl ] && [ -f recipes/lm_data/manifest.jsonl ]; then
      $python -m cosyvoice2.train.lmdata resume --data recipes/lm_data --corpus data/corpus_big
    fi
    mkdir -p logs
    nohup $python -m cosyvoice2.data.corpus build --out data/corpus_big --hours "$hours" --workers 2 --nice 5 \
      --no-progress >> logs/corpus_big.log 2>&1 &
    echo "corpus builder started (pid $!), log: logs/corpus_big.log"
    ;;
  snapshot)
    name=${1:?snapshot NAME [N]}
    n=${2:-100000000}
    mkdir -p "data/$name"
    # rows whose audio exists (rows restored from recipes/lm_data have none on a new machine)
    head -n "$n" data/corpus_big/manifest.jsonl | $python -c "
import json, os, sys
for line in sys.stdin:
    if os.path.exists(os.path.join('data/corpus_big', json.loads(line)['audio'])):
        sys.stdout.write(line)" > "data/$name/manifest.jsonl.tmp"
    mv "data/$name/manifest.jsonl.tmp" "data/$name/manifest.jsonl"
    for f in corpus.json speakers.json sentences wavs; do
      [ -e "data/$name/$f" ] || ln -s "../corpus_big/$f" "data/$name/$f"
    done
    for kind in ${KINDS:-tokens embeddings mels}; do
      case $kind in
        tokens) model=(--model $M/speech_tokenizer.safetensors) ;;
        embeddings) model=(--model $M/speaker_encoder.safetensors) ;;
        mels) model=() ;;
      esac
      $python -m cosyvoice2.train.extract $kind --corpus "data/$name" --cache exp/cache_big "${model[@]}" \
        --device cpu --threads 1 2>&1 | tail -n 1
    done
    wc -l "data/$name/manifest.jsonl"
    ;;
  evalcorpus)
    # The held-out rows of plan index < 854 (126 utterances, 8 min of audio): the set every gate figure in
    # MODEL_CARD.md since build 3 was measured on (cosyvoice2 eval reads only held-out rows).
    $python -m cosyvoice2.data.corpus build --out data/corpus --splits test,test_unseen_speaker \
      --plan-limit 854 --workers 2 --no-progress
    ;;
  pack)
    KINDS=tokens $0 snapshot lmpack
    $python -m cosyvoice2.train.lmdata pack --corpus data/lmpack --cache exp/cache_big --out recipes/lm_data \
      --tokenizer $M/speech_tokenizer.safetensors
    ;;
  *)
    sed -n '2,22p' "$0"
    exit 2
    ;;
esac
