#!/bin/bash
# B2 compile, fixed prototype (engine bf16 matmul as an opaque custom op; KV cache written by one index_put_
# on the whole cache): compiled vs eager, bf16 and int4 g32, 1 thread, rows 1 and 16, then the same again
# in a second process over the same cache dir (warm start).
cd $(git rev-parse --show-toplevel)-scripts
export PYTHONPATH=. TORCHINDUCTOR_CACHE_DIR=/tmp/ind-cache3
for run in cold warm; do
  uptime
  /usr/bin/time -f "wall %e s, max RSS %M KB" .venv/bin/python b2_step.py --threads 1 --fmt bf16,int4 --rows ${ROWS:-1,16} --reps 11 --json b2_compile2_${run}.json > b2_compile2_${run}.log 2>&1
  tail -1 b2_compile2_${run}.log
done
uptime
