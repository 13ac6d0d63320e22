#!/usr/bin/env bash
# The "push the frontier" tries of bench/results/trace_ft_frontier.md: trace-only frontiers
# on one suite, each changing one thing from the default trace, 2 seeds (seeds 0 and 1 of
# the suite's full frontier, which holds seqft's and lora's curves to compare with).
# Usage: bench/frontier_tries.sh SUITE OUTDIR   (then: python bench/frontier_tries.py ...)
set -euo pipefail
suite=${1:-formats}
out=${2:-runs/tries-$suite}
common=(--suite "$suite" --seeds 2 --quiet --resume --frontier-strategies trace)
at=(--grid trace:trace_budget=0.02)
try() { local name=$1; shift; echo "== $name"; trace-ft frontier "${common[@]}" --out "$out/$name" "$@"; }

try protect     "${at[@]}" --grid trace:trace_lr=3e-3,1e-2 --grid trace:trace_protect=10,100
try per_tensor  "${at[@]}" --grid trace:trace_lr=3e-3,1e-2 --grid trace:trace_scope=per_tensor
try spec_unit   "${at[@]}" --grid trace:trace_lr=3e-3 --grid trace:trace_specificity_unit=row,tensor
try probe       "${at[@]}" --grid trace:trace_lr=3e-3 --grid trace:trace_probe_steps=10,200
try all_eligible "${at[@]}" --grid trace:trace_lr=3e-3,1e-2 --trace-exclude ''
try slow_long   "${at[@]}" --grid trace:trace_lr=3e-4,1e-3 --steps 600
trace-ft frontier --suite "$suite" --seeds 2 --quiet --resume --frontier-strategies trace_paper \
    --out "$out/paper"
