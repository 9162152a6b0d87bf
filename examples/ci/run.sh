#!/usr/bin/env bash
# A CI check of the loss along the straight line from init to final: train the spiral MLP
# briefly, evaluate the whole-model and per-layer paths, and hold them against
# expectations.toml. Exit status: 0 when every expectation holds, 1 when one fails, 2 on bad
# input. The HTML report (figures, verdicts, the check's outcome, provenance) lands in
# $WORK/report.html and the JUnit report in $WORK/report.xml either way.
#
#   bash examples/ci/run.sh                 # WORK defaults to a fresh temporary folder
#   WORK=out bash examples/ci/run.sh        # keep the checkpoints, result.nc and report.xml
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${WORK:-$(mktemp -d)}"
# The expectations hold for this configuration (seed 0, 20 epochs); change both together.
EPOCHS=20
SEED=0

echo "ckptscope CI example: working in $WORK"
ckptscope demo --out "$WORK" --epochs "$EPOCHS" --seed "$SEED"
ckptscope path "$WORK/init.safetensors" "$WORK/final.safetensors" --preset layers \
    --out "$WORK/result.nc"
# The report for a reviewer first: it records the check's outcome and exits 0 either way.
ckptscope report "$WORK/result.nc" --expect "$HERE/expectations.toml" --out "$WORK/report.html" \
    --title "ckptscope CI: spiral MLP, $EPOCHS epochs, seed $SEED"
ckptscope check "$WORK/result.nc" --expect "$HERE/expectations.toml" --junit "$WORK/report.xml"
