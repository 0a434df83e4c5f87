"""B2 diagnosis: which generated kernels of the compiled step take the time (inductor kernel profiling)."""
import sys, runpy
import torch._inductor.config as c
c.cpp.enable_kernel_profile = True
sys.argv = ["b2_step.py"] + sys.argv[1:]
runpy.run_path("b2_step.py", run_name="__main__")
