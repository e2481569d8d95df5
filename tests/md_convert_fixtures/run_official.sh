#!/bin/bash
# Converts raw/<source> with the OFFICIAL Meta-Dataset converter into
# official/<source>/ (records and dataset_spec.json), and ILSVRC into
# official/<ilsvrc_2012|ilsvrc_2012_v2>.tar.gz (1000 class files each, most
# empty; with num_leaf_images.json). See README.md for the environment.
#   usage: run_official.sh <official source tree> <python of the official venv>
set -euo pipefail
SRC=$1
PY=$2
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=$(mktemp -d)
cp -r "$HERE/splits" "$OUT/splits"
# The full ILSVRC tree (empty folders and WordNet files added).
PYTHONPATH="$REPO" "$PY" "$HERE/make_raw.py" --materialize_ilsvrc "$OUT/ilsvrc_raw"
# A relative records root, so that each spec's `path` reads records/<name>.
cd "$OUT"
export PYTHONPATH="$SRC"
for ds in omniglot dtd vgg_flower aircraft cu_birds traffic_sign fungi quickdraw mscoco ilsvrc_2012 ilsvrc_2012_v2; do
  case $ds in
    ilsvrc_2012*) root_flag=--ilsvrc_2012_data_root="$OUT/ilsvrc_raw" ;;
    *) root_flag=--${ds}_data_root="$HERE/raw/$ds" ;;
  esac
  "$PY" "$HERE/official_shim.py" --dataset=$ds "$root_flag" \
    --records_root=records --splits_root="$OUT/splits" 2> "$OUT/$ds.log" \
    || { tail -20 "$OUT/$ds.log"; exit 1; }
done
rm -rf "$HERE/official"
mkdir -p "$HERE/official"
for ds in ilsvrc_2012 ilsvrc_2012_v2; do
  tar -C "$OUT/records" --sort=name --mtime=@0 --owner=0 --group=0 \
    --numeric-owner -cf - "$ds" | gzip -9n > "$HERE/official/$ds.tar.gz"
  rm -rf "$OUT/records/$ds"
done
cp -r "$OUT/records/." "$HERE/official/"
rm -rf "$OUT"
