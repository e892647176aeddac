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
for _ in $(seq "$reps"); do
  for v in new old; do
    src=$root/src; [ "$v" = old ] && src=$wt/src
    ms=$(PYTHONPATH=$src "$root/.venv/bin/python" -c "
from tspd import bench
print(bench.run_case('$case', steps=$steps, warmup=4, threads=2)['ms_per_step'])" 2>/dev/null | tail -1)
    echo "$case $v $ms"
    times+=("$ms")
  done
done
# Summary: each side's median and how many alternated pairs the new code won.
"$root/.venv/bin/python" - "${times[@]}" <<'PY'
import statistics, sys
t = [float(v) for v in sys.argv[1:]]
new, old = t[0::2], t[1::2]
wins = sum(a < b for a, b in zip(new, old))
print(f"median new {statistics.median(new):.1f} ms, old {statistics.median(old):.1f} ms; new faster in {wins} of {len(new)} pairs")
PY
