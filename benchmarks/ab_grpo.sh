#!/bin/bash
# The GRPO bench step time of another checkout (BASE, e.g. a clone at an older commit)
# against this one, alternating fresh runs: benchmarks/ab_grpo.sh BASE [key=value ...]
# (ROUNDS, STEPS: rounds and steps per run). Prints the median s/step of steps 2..STEPS
# and the median stage times of every run.
BASE=$(cd "$1" && pwd); shift
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=$HERE/.venv/bin/python
for round in $(seq 1 ${ROUNDS:-3}); do
  for side in before after; do
    if [ $side = before ]; then dir=$BASE; else dir=$HERE; fi
    rm -rf /tmp/ab_$side
    (cd $dir && PYTHONPATH=$dir/src $PY examples/grpo.py --config examples/grpo_bench.yaml runtime.num_episode=${STEPS:-10} runtime.eval_episode_interval=0 runtime.progress=false runtime.log_episodes=false runtime.log_dir=/tmp/ab_$side "$@" >/dev/null 2>&1)
    $PY -c "
import json,statistics; r=[json.loads(l) for l in open('/tmp/ab_$side/metrics.jsonl')]
w=r[1:]
print('$side', $round, 's/step %.3f' % statistics.median(x['seconds'] for x in w), {k: round(statistics.median(x['stages'].get(k,0) for x in w),3) for k in ('env/policy','env/reference','train')}, 'reward %.3f' % r[-1]['metrics']['grpo_policy/reward'])"
  done
done
