"""Rotary position embeddings driven by explicit position ids.

Position ids come in per token (`[b, n]`) rather than being implied by the token's slot, so a layer that
random-LTD runs on a gathered subset of tokens still rotates each token by its *original* position.
Rotate-half layout (first half / second half of the rotated dimensions), as Megatron and Llama use. With
`--rotary-percent` p < 1 only the first `rd = int(hd * p)` dimensions of each head are rotated (with
frequencies of a rotary dimension rd) and the rest pass through, as in Megatron.
"""

import torch


def rope_cos_sin(position_ids: torch.Tensor, rotary_dim: int, base: int, dtype: torch.dtype):
    """cos and sin tables for the given positions: each `[b, 1, n, rd]` (rd = hd unless --rotary-percent)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float32) / rotary_dim))
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # [b, n, rd/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [b, 1, n, rd]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rd dimensions of `x` `[b, nh, n, hd]` by the angles in cos/sin `[b, 1, n, rd]`."""
    rd = cos.shape[-1]
    if rd < x.shape[-1]:  # partial rotary: the trailing hd - rd dimensions pass through
        return torch.cat([apply_rope(x[..., :rd], cos, sin), x[..., rd:]], dim=-1)  # [b, nh, n, hd]
    x1, x2 = x.chunk(2, dim=-1)  # [b, nh, n, hd/2] each
    rotated = torch.cat([-x2, x1], dim=-1)  # [b, nh, n, hd]
    return x * cos + rotated * sin
