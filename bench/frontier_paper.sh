#!/usr/bin/env bash
# Follow-up of the tries: the authors' whole-tensor rule (trace_paper) over a finer lr grid
# with 3 seeds, on one suite (the tries found it above seqft's line at lr 1e-3 on formats).
# Usage: bench/frontier_paper.sh SUITE OUTDIR LR1,LR2,...
set -euo pipefail
suite=${1:-formats}
out=${2:-runs/paper-$suite}
lrs=${3:-1e-3,1.5e-3,2e-3}
trace-ft frontier --suite "$suite" --seeds 3 --quiet --resume --frontier-strategies trace_paper \
    --grid "trace_paper:trace_lr=$lrs" --out "$out"
