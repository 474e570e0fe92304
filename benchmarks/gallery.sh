#!/usr/bin/env bash
# Remake the gallery (docs/gallery) with the CLI and the shipped weights: bash benchmarks/gallery.sh MNIST_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: bash benchmarks/gallery.sh MNIST_DIR}
g=docs/gallery
mkdir -p $g
python - "$data" <<'PY'
import sys
from unclip.data import load_dataset
from unclip.images import save_png
test = load_dataset("mnist", "test", sys.argv[1])
save_png(test.images[(test.labels == 7).nonzero()[0, 0]], "docs/gallery/test-seven.png")
PY
t2i generate --prompt "a handwritten 3" --num-samples 16 --animate --out $g/three
rm $g/three/0*.png
t2i vary $g/test-seven.png --num-samples 8 --out $g/vary-seven
rm $g/vary-seven/0*.png
t2i interpolate --from one --to seven --frames 8 --out $g/one-to-seven
rm $g/one-to-seven/0*.png
t2i classify $g/test-seven.png > $g/classify.txt
