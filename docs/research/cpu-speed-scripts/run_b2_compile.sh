#!/bin/bash
# B2 compile: the prototype step compiled with inductor (dynamic=False), 1 row, bf16 and int4 g32, 1 thread;
# run twice with the same TORCHINDUCTOR_CACHE_DIR: the second process shows what the caches save.
cd $(git rev-parse --show-toplevel)-scripts
export PYTHONPATH=. TORCHINDUCTOR_CACHE_DIR=/tmp/ind-cache
for run in cold warm; do
  uptime
  /usr/bin/time -f "wall %e s, max RSS %M KB" .venv/bin/python b2_step.py --threads 1 --fmt bf16,int4 --rows ${ROWS:-1} --reps 11 --json b2_compile_${run}.json > b2_compile_${run}.log 2>&1
  tail -1 b2_compile_${run}.log
done
uptime
