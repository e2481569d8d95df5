#!/bin/bash
# Converts raw/<source> with the OFFICIAL Meta-Dataset converter into
# official/<source> (records) and official/splits (split files as the
# converter leaves them). See README.md for the environment.
#   usage: run_official.sh <official source tree> <python of the official venv>
set -euo pipefail
SRC=$1
PY=$2
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(mktemp -d)
cp -r "$HERE/splits" "$OUT/splits"
cd "$SRC"
export PYTHONPATH="$SRC"
for ds in omniglot dtd vgg_flower aircraft cu_birds traffic_sign fungi quickdraw mscoco; do
  "$PY" "$HERE/official_shim.py" \
    --dataset=$ds --${ds}_data_root="$HERE/raw/$ds" \
    --records_root="$OUT/records" --splits_root="$OUT/splits" 2> "$OUT/$ds.log" \
    || { tail -20 "$OUT/$ds.log"; exit 1; }
done
rm -rf "$HERE/official"
mkdir -p "$HERE/official"
cp -r "$OUT/records/." "$HERE/official/"
rm -rf "$OUT"
