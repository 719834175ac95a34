#!/usr/bin/env bash
# Stage what the GPU machine needs into one folder (the device tool sends only the lead's checkout, plus carried
# ignored folders): this branch's src/, bench/, tests/, and an UNCHANGED copy of the seed recipe from ../shared.
# usage: bench/stage_gpu.sh DEST   (run from the repository root)
set -euo pipefail
dest=${1:?usage: bench/stage_gpu.sh DEST}
rm -rf "$dest/src" "$dest/bench" "$dest/tests"
mkdir -p "$dest"
cp -r src bench tests pyproject.toml "$dest/"
cp ../shared/bench/seed_recipe.py "$dest/bench/seed_recipe.py"
find "$dest" -name __pycache__ -prune -exec rm -rf {} +
cmp ../shared/bench/seed_recipe.py "$dest/bench/seed_recipe.py"
