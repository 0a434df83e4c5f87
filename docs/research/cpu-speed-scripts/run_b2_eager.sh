#!/bin/bash
# B2 eager, interleaved in one process: the prototype step with bf16 / int4 g32 / int8 weights (LoRA on, 4 modes)
# beside the engine's FastRuntime step; 1 thread (the shared machine's load makes 2-thread OpenMP erratic)
cd $(git rev-parse --show-toplevel)-scripts
export PYTHONPATH=.
uptime
.venv/bin/python b2_step.py --threads ${THREADS:-1} --fmt bf16,int4,int8 --rows 1,4,16,64 --reps 11 --skip-compile --engine --json b2_eager_t${THREADS:-1}.json > b2_eager_t${THREADS:-1}.log 2>&1
uptime
