"""Traces of the engine at work, on demand: vLLM's LLM.start_profile() / stop_profile().

Between the two calls torch.profiler records what each process runs: on the CPU the scheduler, the step's Python
and every operator and kernel launch; on a GPU every kernel too. stop_profile() writes one Chrome trace per process
(open it in https://ui.perfetto.dev or chrome://tracing) into the profiler directory: the one given, else
MINILLM_TORCH_PROFILER_DIR, else vLLM's VLLM_TORCH_PROFILER_DIR. The engine's own process writes
`engine-<pid>-<ms>.pt.trace.json`; each worker process of a tensor / pipeline / expert-parallel engine
`rank<r>-...` and of a disaggregated one `prefill-...` / `decode-...`, so the host's share of a step and the
kernels' share read side by side (the step-time breakdowns of benchmarks/RESULTS.md came from such traces). No
chapter builds this module; it is the tool to read the engine the chapters build. Profiling slows every operator
a little: time a run without it.
"""
from __future__ import annotations

import os
import time

import torch

PROFILER_DIR_ENV = ("MINILLM_TORCH_PROFILER_DIR", "VLLM_TORCH_PROFILER_DIR")


def profiler_dir(explicit: str | None = None) -> str:
    """Where traces go: `explicit`, else the first of PROFILER_DIR_ENV that is set; RuntimeError if none is."""
    if explicit is not None:
        if not isinstance(explicit, (str, os.PathLike)) or not str(explicit):
            raise ValueError(f"profile_dir must be a directory path, got {explicit!r}")
        return str(explicit)
    for name in PROFILER_DIR_ENV:
        if os.environ.get(name):
            return os.environ[name]
    raise RuntimeError(f"profiling needs a directory for its traces: pass profile_dir or set "
                       f"{' or '.join(PROFILER_DIR_ENV)}")


class TraceRecorder:
    """One process's torch.profiler session: start(directory), then stop() writes the trace and returns its path."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._profile: torch.profiler.profile | None = None
        self._directory: str | None = None

    @property
    def running(self) -> bool:
        return self._profile is not None

    def start(self, directory: str) -> None:
        if self._profile is not None:
            raise RuntimeError("a profile is already being recorded: stop_profile() first")
        os.makedirs(directory, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profile = torch.profiler.profile(activities=activities, record_shapes=True)
        profile.start()
        self._profile, self._directory = profile, directory

    def stop(self) -> str:
        if self._profile is None:
            raise RuntimeError("no profile is being recorded: start_profile() first")
        profile, self._profile = self._profile, None
        profile.stop()
        path = os.path.join(self._directory, f"{self.name}-{os.getpid()}-{int(time.time() * 1000)}.pt.trace.json")
        profile.export_chrome_trace(path)
        return path
