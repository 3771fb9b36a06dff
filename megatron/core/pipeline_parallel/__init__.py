"""Pipeline parallelism: the model is cut into pp stages, one per rank of a PP group.

Activations travel between adjacent stages with static shapes (`p2p.py`), and `schedules.py` orders
forwards and backwards of the micro-batches (1F1B) so that each stage keeps at most pp - rank of them.
Activations are batch-first `[b, s, h]`.
"""

from megatron.core.pipeline_parallel.p2p import (
    recv_backward,
    recv_forward,
    send_backward,
    send_backward_recv_forward,
    send_forward,
    send_forward_recv_backward,
)
from megatron.core.pipeline_parallel.schedules import (
    ForwardStep,
    LossFn,
    forward_backward_no_pipelining,
    forward_backward_pipelining_1f1b,
    get_forward_backward_func,
)

__all__ = [
    "recv_forward", "send_forward", "recv_backward", "send_backward",
    "send_forward_recv_backward", "send_backward_recv_forward",
    "ForwardStep", "LossFn", "forward_backward_no_pipelining", "forward_backward_pipelining_1f1b", "get_forward_backward_func",
]
