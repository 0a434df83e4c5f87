"""Other servers the benchmarks compare the engine with, each run in a process of its own.

`llamacpp`: llama.cpp through node-llama-cpp (npm, prebuilt CPU binaries), on the GGUF file the
default model ships in. `side_by_side`: the engine and a peer in alternating processes, the
median ratio and its range (`python -m bench.serving --peer llamacpp`).
"""
