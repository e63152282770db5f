#!/usr/bin/env python
# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Run a training script in this process and, when it exits, write its peak GPU memory to $BENCH_PEAK_FILE.

    accelerate launch ... benchmarks/measure.py SCRIPT [script arguments]

benchmark.py measures our scripts and diffusers' reference scripts alike through this wrapper, so both peaks are
read the same way: torch.cuda.max_memory_allocated() over the whole process (model loading, caching, training).
"""

import atexit
import json
import os
import runpy
import sys


def record_peak():
    import torch

    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_initialized() else None
    with open(os.environ["BENCH_PEAK_FILE"], "w") as f:
        json.dump({"peak_memory_gib": peak}, f)


if __name__ == "__main__":
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(script))  # our scripts import kandinsky_train from beside them
    atexit.register(record_peak)
    runpy.run_path(script, run_name="__main__")
