#!/bin/bash
# Alternate fresh-process timings of the working tree's code and an older commit's on one case:
#   bash benchmarks/ab.sh CASE OLD_COMMIT [REPS=4] [STEPS=15]
# This host's run-to-run spread is 10-15 %, so a speed change under that needs runs alternated like this.
set -euo pipefail
case=$1; old=$2; reps=${3:-4}; steps=${4:-15}
root=$(git rev-parse --show-toplevel); wt=$(mktemp -d)
git -C "$root" worktree add -q --detach "$wt" "$old"
trap 'git -C "$root" worktree remove --force "$wt"' EXIT
times=()
log=$(mktemp)
for i in $(seq "$reps"); do
  # Which side goes first alternates between pairs, so neither always runs on a warmer (or cooler) host.
  order="new old"; [ $((i % 2)) -eq 0 ] && order="old new"
  for v in $order; do
    src=$root/src; [ "$v" = old ] && src=$wt/src
    if ! ms=$(PYTHONPATH=$src "$root/.venv/bin/python" -c "
from tspd import bench
print(bench.run_case('$case', steps=$steps, warmup=4, threads=2)['ms_per_step'])" 2>"$log" | tail -1) || [ -z "$ms" ]; then
      echo "ab.sh: the $v code failed on $case:" >&2; tail -5 "$log" >&2; exit 1
    fi
    echo "$case $v $ms"
    times+=("$v=$ms")
  done
done
rm -f "$log"
# Summary: each side's median and how many pairs the new code won.
"$root/.venv/bin/python" - "${times[@]}" <<'PY'
import statistics, sys
pairs = [a.split("=") for a in sys.argv[1:]]
new = [float(v) for k, v in pairs if k == "new"]
old = [float(v) for k, v in pairs if k == "old"]
wins = sum(a < b for a, b in zip(new, old))
print(f"median new {statistics.median(new):.1f} ms, old {statistics.median(old):.1f} ms; new faster in {wins} of {len(new)} pairs")
PY
