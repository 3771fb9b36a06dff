"""`--profile --profile-step-start N --profile-step-end M`: a torch.profiler trace of iterations N+1..M.

As Megatron's flags (with `--use-pytorch-profiler`, the only profiler here): recording starts before the
step that begins with N iterations done and stops after the step that ends with M done, on the global
ranks of `--profile-ranks` (default 0). The trace is written by `tensorboard_trace_handler` into
`--tensorboard-dir` as `<host>_<pid>.<time>.pt.trace.json`, which TensorBoard's profiler plugin and
Perfetto (ui.perfetto.dev, or chrome://tracing) open. Operator shapes are recorded; stacks are not (they
make traces of a large model unwieldy). A run that stops inside the window writes what it recorded.
"""

from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler


class StepProfiler:
    def __init__(self, start: int, end: int, out_dir: Optional[str], enabled: bool, device: torch.device):
        assert not enabled or (0 <= start < end and out_dir), "--profile needs start < end and a directory"
        self.start, self.end, self.out_dir, self.enabled, self.device = start, end, out_dir, enabled, device
        self._prof: Optional[profile] = None

    def before_step(self, done: int) -> None:
        """Called with the number of iterations done before a step; starts recording inside the window."""
        if self.enabled and self._prof is None and self.start <= done < self.end:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._prof = profile(activities=activities, record_shapes=True,
                                 on_trace_ready=tensorboard_trace_handler(self.out_dir))
            self._prof.start()

    def after_step(self, done: int) -> None:
        """Called with the number of iterations done after a step; writes the trace at the window's end."""
        if self._prof is not None and done >= self.end:
            self.close()

    def close(self) -> None:
        if self._prof is not None:
            self._prof.stop()  # calls the trace handler
            self._prof, self.enabled = None, False
