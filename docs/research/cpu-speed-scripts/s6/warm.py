"""Start-up of a FastRuntime with the compiled wide step: load, then `warm_up()` (compiles), timed.
Needs `compiled_wide_step.patch` applied (the `cpu_compile` setting). docs/research/cpu-speed.md §6.

    python warm.py 16        # MAX_BATCH_SIZE; run twice: the second start reads inductor's cache
"""
import pathlib
import logging, sys, time, os
t0 = time.perf_counter()
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[4]))
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
for n in ("httpx", "urllib3"): logging.getLogger(n).setLevel(logging.WARNING)
from engine.config import load_settings
from engine import model as engine_model
from engine.serving.runner import FastRuntime
from engine.serving import threads as cpu_threads
rows = int(sys.argv[1])
s = load_settings(model_cache_dir=pathlib.Path(__file__).resolve().parents[4] / "models", max_batch_size=rows, cpu_compile="auto")
loaded = engine_model.load(s)
cpu_threads.claim(s.resolved_cpu_threads())
rt = FastRuntime(loaded.model, s)
t1 = time.perf_counter()
rt.warm_up()
from torch._dynamo.utils import compile_times
print(compile_times(repr="str"))
print(f"load {t1-t0:.1f}s warm_up {time.perf_counter()-t1:.1f}s failed={rt.compiled.failed}", flush=True)
