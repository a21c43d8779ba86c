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
#   recipes/session.sh train MIN [SNAP]   in the background, 1 thread each, for MIN minutes of training:
#                                         the LM from the shipped LM on recipes/lm_data, and the flow from
#                                         the shipped flow on snapshot data/SNAP (default cb); exp/sMMDD/;
#                                         TOKCACHE=DIR: both on the snapshot with DIR's tokens (a new tokenizer);
#                                         the LM can keep the old codes' hours as a second codebook:
#                                         LMSET='lm.aux_corpus="recipes/lm_data" lm.aux_cache="recipes/lm_data"
#                                         train.init_from="exp/lm_map/lm.safetensors"' (recipes/codebook_map.py)
#                                         LMUNITS=UNITS: the LM on a new BPE over those text units;
#                                         NETS="lm" (or "flow"): only those; LMSET="k=v ...": extra --set for the LM
#                                         (FLOWSET likewise for the flow, e.g. "train.lr=5e-4");
#                                         PROCS=2: each network as 2 data-parallel ranks (torchrun); stop
#                                         such a run early with `pkill -TERM -f cosyvoice2.train.NET` (its
#                                         ranks save and agree on the step); a SIGTERM to torchrun itself
#                                         kills the ranks before they save (back to the last save_every)
#   recipes/session.sh hift MIN [SNAP]    in the background, 1 thread: the vocoder from the shipped one on
#                                         snapshot data/SNAP (default cb5), mel + STFT + f0 losses, its
#                                         source driven by its own predicted f0 (the inference condition)
#                                         HIFTSET="k=v ...": extra --set (e.g. hift.gta_cache="exp/gta_b7":
#                                         the flow's mels of the rows as input, from `gta` below)
#   recipes/session.sh gta SNAP [N]       the shipped flow's mels of the first N (default all) train rows
#                                         of data/SNAP (zero-shot: a prompt of the same speaker), frame for
#                                         frame with their audio, into exp/gta_SNAP (1 thread, ~6x real time)
#   recipes/session.sh tokenizer MIN [SNAP]  in the background, 1 thread: the phonetic speech tokenizer from
#                                         Whisper tiny.en (its last 2 blocks trained) with a local CTC head
#                                         over the teacher's phonemes, on snapshot data/SNAP (default cb);
#                                         exp/sMMDD/tokenizer. Its codes are not the shipped model's: the
#                                         flow and LM must be retrained on them (TOKCACHE below)
#   recipes/session.sh rank FLOW HIFT [N] gate (b) on more rows than the eval's 8 sentences, to rank
#                                         candidates: N (default 24) held-out-speaker rows per language of
#                                         $CORPUS (default data/cb4), round-robin over the speakers;
#                                         tokens -> FLOW -> HIFT (run dirs, checkpoints or .safetensors),
#                                         mean Whisper error per utterance; THREADS=1|2; RAW=FILE keeps
#                                         the probe's rows (per utterance, for paired comparisons)
#                                         CACHE=DIR: the tokens (default exp/cache_big); PROBEARGS="...":
#                                         extra probe options (--cfg-rate R, --flow-steps N, --prior,
#                                         --reader $M/phoneme_reader.safetensors: the input tokens and the
#                                         output audio's tokens read back as phonemes);
#                                         SPLIT=train: rows the flow trained on (memorised or underfit?);
#                                         GL=1: Griffin-Lim of the flow's and the recording's mel as well
#   recipes/session.sh rankhift HIFT [N]  gate (a) likewise: the corpus mel of the same rows -> HIFT
#                                         (PROBEARGS="--reader ..." as for rank)
#   recipes/session.sh lmrank LM [N]      the LM alone, on N held-out-sentence rows per language of
#                                         recipes/lm_data (no audio needed): tokens it samples from the text,
#                                         read back as phonemes by the shipped model's phoneme_reader
#                                         (reader_error_sampled; the reference tokens' reading is the floor),
#                                         and its best text-alignment head (align_corr); LM: checkpoint or
#                                         .safetensors (TEXTTOK=DIR: its BPE, default the run's / the shipped;
#                                         TOPK=K, TOPP=P: sample with these instead of the model's settings)
#
# Runs go to exp/sMMDD/NET (RUN=DIR for another); a run directory that exists is RESUMED, checkpoint, step and
# learning-rate schedule included (a second session on the same day and machine needs RUN=...).
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
    # MODEL_CARD.md since build 3 was measured on (cosyvoice2 eval reads only held-out rows). Rows that
    # data/corpus_big already holds (the same deterministic plan) are taken from it, audio hard-linked;
    # the builder synthesises only the others.
    if [ -s data/corpus_big/manifest.jsonl ] && [ ! -s data/corpus/manifest.jsonl ]; then
      $python -c "
import json, os
src, dst = 'data/corpus_big', 'data/corpus'
keep = []
os.makedirs(dst, exist_ok=True)
for line in open(f'{src}/manifest.jsonl'):
    r = json.loads(line)
    if r['split'] in ('test', 'test_unseen_speaker') and int(r['id'].rsplit('-', 1)[1]) < 854 \\
            and os.path.exists(f'{src}/{r[\"audio\"]}'):
        keep.append(r)
for r in keep:
    os.makedirs(os.path.dirname(f'{dst}/{r[\"audio\"]}'), exist_ok=True)
    if not os.path.exists(f'{dst}/{r[\"audio\"]}'):
        os.link(f'{src}/{r[\"audio\"]}', f'{dst}/{r[\"audio\"]}')
with open(f'{dst}/manifest.jsonl.tmp', 'w') as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + '\\n' for r in keep)
os.replace(f'{dst}/manifest.jsonl.tmp', f'{dst}/manifest.jsonl')
print(f'{len(keep)} held-out rows taken from {src}')"
    fi
    $python -m cosyvoice2.data.corpus build --out data/corpus --splits test,test_unseen_speaker \
      --plan-limit 854 --workers 2 --no-progress
    ;;
  pack)
    KINDS=tokens $0 snapshot lmpack
    $python -m cosyvoice2.train.lmdata pack --corpus data/lmpack --cache exp/cache_big --out recipes/lm_data \
      --tokenizer $M/speech_tokenizer.safetensors
    ;;
  train | hift)
    minutes=${1:?$cmd MINUTES [SNAPSHOT]}
    run=${RUN:-exp/s$(date +%m%d)}
    mkdir -p logs "$run"
    # launch NET ARGS...: one background trainer of NET, warm-started from the shipped weights, 1 thread,
    # for $minutes of training, into $run/NET, logging to logs/NET_RUN.log (two arms on one day keep apart)
    launch() {
      local net=$1
      shift
      # PROCS=N: N data-parallel ranks (torchrun, gloo), 1 thread each: both cores on one network
      local runner=($python -m)
      if [ "${PROCS:-1}" -gt 1 ]; then runner=($python -m torch.distributed.run --standalone --nproc_per_node="$PROCS" -m); fi
      nohup "${runner[@]}" "cosyvoice2.train.$net" --config "recipes/conf_cpu/$net.toml" \
        --set "train.out_dir=\"$run/$net\"" --set 'train.device="cpu"' \
        --set "train.init_from=\"$M/$net.safetensors\"" --set "train.max_minutes=$minutes" \
        --set train.max_steps=1000000 "$@" >> "logs/${net}_$(basename "$run").log" 2>&1 &
      echo "$net started (pid $!): $run/$net, log logs/${net}_$(basename "$run").log"
    }
    if [ "$cmd" = train ]; then
      snap=${2:-cb}
      # TOKCACHE=DIR: the speech tokens of a new tokenizer (DIR/tokens.safetensors; its embeddings and
      # mels may be links to exp/cache_big's): the LM then trains on the snapshot's rows, the only ones
      # with audio to tokenise, instead of recipes/lm_data (the shipped tokenizer's codes).
      if [ -n "${TOKCACHE:-}" ]; then lmdata=("data/$snap" "$TOKCACHE"); else lmdata=(recipes/lm_data recipes/lm_data); fi
      # The shipped BPE (its tokenizer_config says which text units it reads), or with LMUNITS=UNITS a
      # new BPE over those units (text.TEXT_UNITS) and a fresh text embedding; the rest warm-starts.
      if [ -n "${LMUNITS:-}" ]; then
        text=(--set "lm.text_units=\"$LMUNITS\"" --set 'train.init_exclude=["embed_tokens"]')
      else
        text=(--set "lm.text_tokenizer=\"$M/tokenizer\"")
      fi
      nets=" ${NETS:-lm flow} "
      extra=()
      for kv in ${LMSET:-}; do extra+=(--set "$kv"); done
      if [[ $nets == *" lm "* ]]; then
        # bf16 autocast where the CPU has native bf16: 0.64 vs 0.85 s/step for the LM (AMD EPYC with
        # AVX512_BF16, 2 trainers x 1 thread, 2026-12-06; losses within 0.001 of float32's over 40 steps)
        bf16=$($python -c "from cosyvoice2 import cpu; print(str(cpu.detect().native_bf16).lower())")
        launch lm --set "train.cpu_bf16=$bf16" --set "train.corpus=\"${lmdata[0]}\"" \
          --set "train.cache=\"${lmdata[1]}\"" "${text[@]}" --set train.lr=1e-3 --set train.warmup_steps=100 \
          --set train.eval_every=200 "${extra[@]}"
      fi
      if [[ $nets == *" flow "* ]]; then
        flowextra=()
        for kv in ${FLOWSET:-}; do flowextra+=(--set "$kv"); done
        launch flow --set "train.corpus=\"data/$snap\"" --set "train.cache=\"${TOKCACHE:-exp/cache_big}\"" \
          --set train.lr=1e-3 --set train.warmup_steps=100 --set train.eval_every=400 "${flowextra[@]}"
      fi
    else
      snap=${2:-cb5}
      hiftextra=()
      for kv in ${HIFTSET:-}; do hiftextra+=(--set "$kv"); done
      launch hift --set "train.corpus=\"data/$snap\"" --set 'hift.source_f0="predicted"' --set train.lr=3e-4 \
        --set train.save_every=200 "${hiftextra[@]}"
    fi
    ;;
  gta)
    snap=${1:?gta SNAP [N]}
    $python -m cosyvoice2.train.gta --corpus "data/$snap" --cache exp/cache_big --flow $M/flow.safetensors \
      --out "exp/gta_$snap" --limit "${2:-0}"
    ;;
  tokenizer)
    minutes=${1:?tokenizer MINUTES [SNAPSHOT]}
    snap=${2:-cb}
    run=${RUN:-exp/s$(date +%m%d)}
    mkdir -p logs "$run"
    nohup $python -m cosyvoice2.train.tokenizer --config recipes/conf_cpu/tokenizer.toml \
      --set "train.out_dir=\"$run/tokenizer\"" --set 'train.device="cpu"' --set "train.corpus=\"data/$snap\"" \
      --set "train.max_minutes=$minutes" --set train.max_steps=1000000 --set train.warmup_steps=100 \
      --set train.eval_every=200 --set train.save_every=200 \
      --set 'asr.units="phonemes"' --set asr.n_blocks=0 --set asr.train_blocks=2 \
      >> "logs/tokenizer_$(date +%m%d).log" 2>&1 &
    echo "tokenizer started (pid $!): $run/tokenizer, log logs/tokenizer_$(date +%m%d).log"
    ;;
  rank | rankhift)
    if [ "$cmd" = rank ]; then
      flow=${1:?rank FLOW HIFT [N]}
      hift=${2:?rank FLOW HIFT [N]}
      n=${3:-24}
      probe=(flow --run "$flow" --hift "$hift" --cache "${CACHE:-exp/cache_big}")
      # GL=1: also Griffin-Lim of the flow's mel and of the recording's (no vocoder in the way)
      [ "${GL:-0}" = 1 ] || probe+=(--no-griffin-lim)
      # shellcheck disable=SC2206
      probe+=(${PROBEARGS:-})
    else
      hift=${1:?rankhift HIFT [N]}
      n=${2:-24}
      probe=(hift --run "$hift")
      # shellcheck disable=SC2206
      probe+=(${PROBEARGS:-})
    fi
    corpus=${CORPUS:-data/cb4}
    ids=$($python -c "
import itertools, json, os, sys
rows = [json.loads(l) for l in open('$corpus/manifest.jsonl')]
rows = [r for r in rows if os.path.exists(os.path.join('$corpus', r['audio']))]
for lang in ('en', 'zh'):
    # round-robin over the held-out speakers (ids sort by speaker first)
    pick = sorted(r['id'] for r in rows if r['split'] == '${SPLIT:-test_unseen_speaker}' and r['language'] == lang)
    by_speaker = {}
    for i in pick:
        by_speaker.setdefault(i.split('-')[0], []).append(i)
    order = [i for group in itertools.zip_longest(*by_speaker.values()) for i in group if i]
    print(' '.join(order[:$n]))")
    # shellcheck disable=SC2086
    $python -m cosyvoice2.train.probe "${probe[@]}" --corpus "$corpus" --threads "${THREADS:-1}" --utts $ids \
      | tee "${RAW:-/dev/null}" | $python -c "
import json, sys
rows = [json.loads(l) for l in sys.stdin]
for lang in ('en', 'zh'):
    r = [x for x in rows if '-' + lang + '-' in x['id']]
    if r:
        for x in r:  # probe hift: cepstral peak [copy, original]
            x.update(dict(zip(('cpp_copy', 'cpp_ref'), x.pop('cepstral_peak', []))))
        keys = [k for k in ('error_hift', 'error', 'ref_error', 'mel_l1', 'cpp_copy', 'cpp_ref',
                            'error_griffin_lim', 'error_griffin_lim_ref', 'reader_error_in', 'reader_error_out')
                if k in r[0]]
        mean = lambda k: sum(x[k] for x in r) / len(r)
        print(f'{lang}: n={len(r)} ' + ' '.join(f'{k}={mean(k):.4f}' for k in keys))"
    ;;
  lmrank)
    lm=${1:?lmrank LM [N]}
    n=${2:-12}
    case $lm in *.safetensors) tok=${TEXTTOK:-$M/tokenizer} ;; *) tok=${TEXTTOK:-} ;; esac
    ids=$($python -c "
import json
rows = [json.loads(l) for l in open('recipes/lm_data/manifest.jsonl')]
for lang in ('en', 'zh'):
    print(' '.join([r['id'] for r in rows if r['split'] == 'test' and r['language'] == lang][:$n]))")
    # shellcheck disable=SC2086
    $python -m cosyvoice2.train.probe lm --run "$lm" ${tok:+--text-tokenizer "$tok"} --corpus recipes/lm_data \
      --cache recipes/lm_data --reader "$M/phoneme_reader.safetensors" --threads "${THREADS:-1}" --utts $ids \
      ${TOPK:+--top-k "$TOPK"} ${TOPP:+--top-p "$TOPP"} \
      | tee "${RAW:-/dev/null}" | $python -c "
import json, sys
rows = [json.loads(l) for l in sys.stdin]
for lang in ('en', 'zh'):
    r = [x for x in rows if '-' + lang + '-' in x['id']]
    if r:
        keys = ('reader_error_ref', 'reader_error_sampled', 'sampled_length_ratio', 'align_corr', 'teacher_forced_acc',
                'text_gain')
        print(f'{lang}: n={len(r)} ' + ' '.join(f'{k}={sum(x[k] for x in r) / len(r):.4f}' for k in keys))"
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d'
    exit 2
    ;;
esac
