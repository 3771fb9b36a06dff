"""The flat collectives under one name across torch releases.

torch 2.13 renamed `reduce_scatter_tensor`/`all_gather_into_tensor` to `reduce_scatter_single`/
`all_gather_single` (same arguments) and deprecates the old names; the GPU machine's torch 2.11 has only
the old ones. Every caller imports these two.
"""

import torch.distributed as dist

reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
