#!/bin/bash
# Reruns every audit behind the README's "Audit" table and writes one JSON per
# run to benchmarks/results/audit/: claimed epsilon 1, 4 and 8, both auditors,
# the real optimizer and the three controls, seed 1 and the CLI's defaults (1000
# canaries, 200 steps, expected batch 250, 100 + 100 guesses). About 10 s per
# run on a 2-core CPU, 4 minutes in all. Exit status 1 of a control run is
# expected: it means the audit refuted the claim.
set -u
cd "$(dirname "$0")/.."
out=benchmarks/results/audit
mkdir -p "$out"
for eps in 1 4 8; do
  for auditor in white_box black_box; do
    for control in none no_noise no_clipping half_noise; do
      python -m tf_dpsat.audit --epsilon="$eps" --auditor="$auditor" \
        --control="$control" --seed=1 \
        --output_json="$out/eps$eps-$auditor-$control.json" > /dev/null
      echo "epsilon=$eps $auditor control=$control: exit status $?"
    done
  done
done
