#!/usr/bin/env python
# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Run a training script in this process and, when it exits, write its peak GPU memory to $BENCH_PEAK_FILE.

    accelerate launch ... benchmarks/measure.py SCRIPT [script arguments]

benchmark.py measures our scripts and diffusers' reference scripts alike through this wrapper, so both peaks are
read the same way: torch.cuda.max_memory_allocated() over the whole process (model loading, caching, training).
With $BENCH_PROFILE_FILE set, torch.profiler records optimizer step $BENCH_PROFILE_STEP (default 4: cuDNN's
search and the allocator's growth come before), from the end of the step before to the end of this one, so its
micro-batches, data loading and update; the top 20 operators by their own device time (CPU time without CUDA) go to
that file, the busy share of the step to FILE.json and the trace to FILE.trace.json.gz (gpu_check.py).
"""

import atexit
import gzip
import json
import os
import runpy
import shutil
import sys
import time


def record_peak():
    import torch

    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_initialized() else None
    with open(os.environ["BENCH_PEAK_FILE"], "w") as f:
        json.dump({"peak_memory_gib": peak}, f)


def profile_one_step(path, step):
    """Record optimizer step `step` (counted from 1); an optimizer step hook moves the profiler's schedule on."""
    import torch
    from torch.autograd import DeviceType
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = torch.cuda.is_available()
    ends = []  # host time at the end of each optimizer step

    def write(profiler):
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        averages = profiler.key_averages()
        with open(path, "w") as f:
            f.write(averages.table(sort_by=key, row_limit=20))
        # the kernels' time on the GPU (their own rows; an operator's row repeats its kernels'), or the CPU ops'
        busy = sum(event.self_device_time_total if cuda else event.self_cpu_time_total for event in averages
                   if event.device_type == (DeviceType.CUDA if cuda else DeviceType.CPU)) / 1e6
        seconds = ends[-1] - ends[-2] if len(ends) > 1 else None  # the step before this hook, host clock
        with open(path + ".json", "w") as f:
            json.dump({"step": step, "step_seconds": seconds, "busy_seconds": busy,
                       "busy_share": busy / seconds if seconds else None, "clock": "device" if cuda else "cpu"}, f)
        profiler.export_chrome_trace(path + ".trace.json")
        with open(path + ".trace.json", "rb") as raw, gzip.open(path + ".trace.json.gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)
        os.remove(path + ".trace.json")

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profiler = profile(activities=activities, on_trace_ready=write,
                       schedule=schedule(wait=max(step - 2, 0), warmup=1 if step > 1 else 0, active=1, repeat=1))

    def step_ended(*_):
        if cuda:
            torch.cuda.synchronize()  # the step's host time must cover its device work
        ends.append(time.perf_counter())
        profiler.step()

    register_optimizer_step_post_hook(step_ended)
    profiler.start()
    atexit.register(profiler.stop)


if __name__ == "__main__":
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(script))  # our scripts import kandinsky_train from beside them
    atexit.register(record_peak)
    if os.environ.get("BENCH_PROFILE_FILE"):
        profile_one_step(os.environ["BENCH_PROFILE_FILE"], int(os.environ.get("BENCH_PROFILE_STEP", "4")))
    runpy.run_path(script, run_name="__main__")
