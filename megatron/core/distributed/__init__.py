"""Data parallelism: gradient buffers (`param_and_grad_buffer.py`) and their reduction (`ddp.py`)."""

from megatron.core.distributed.ddp import DataParallelGradSync
from megatron.core.distributed.param_and_grad_buffer import Bucket, ParamAndGradBuffer

__all__ = ["Bucket", "DataParallelGradSync", "ParamAndGradBuffer"]
