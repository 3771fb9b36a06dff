"""TransformerConfig: the model's shape and numerics, validated once.

Names follow Megatron's command-line flags (`--hidden-size` -> `hidden_size`) so a config reads like the
launch script that made it.
"""

from dataclasses import dataclass
from typing import Optional

from megatron.core.errors import UserError

POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope", "none")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass(frozen=True)
class TransformerConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    vocab_size: int  # padded vocabulary (multiple of --make-vocab-size-divisible-by)
    max_position_embeddings: Optional[int] = None  # defaults to seq_length
    ffn_hidden_size: Optional[int] = None  # defaults to 4h, or Megatron's SwiGLU size
    position_embedding_type: str = "learned_absolute"
    rotary_base: int = 10000
    rotary_percent: float = 1.0  # fraction of each head's dimensions RoPE rotates; the rest pass through
    # Grouped-query attention: heads share key/value heads in this many groups (nh/G query heads each).
    # None: one group per head, i.e. plain multi-head attention. 1: multi-query attention.
    num_query_groups: Optional[int] = None
    normalization: str = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    swiglu: bool = False
    openai_gelu: bool = False  # the tanh approximation of GELU (GPT-2's `gelu_new`) instead of the exact one
    add_bias_linear: bool = True
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = False
    causal: bool = True  # GPT decoder; BERT sets False and passes a padding mask
    # Activation recomputation (training only; docs/training.md). None: keep every activation.
    # "full": recompute whole layers; "selective": only core attention (softmax(QK^T)V and its dropout).
    recompute_granularity: Optional[str] = None
    # with "full": "uniform" = chunks of recompute_num_layers layers, only each chunk's input is kept;
    # "block" = the first recompute_num_layers layers of each pipeline stage, the rest keep theirs
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None  # with "full"; 1 when not given
    # Keep the residual stream (embedding output, residual adds, pipeline messages) in fp32 while the
    # parameters are bf16/fp16; the norms read it and hand their linears the parameter dtype.
    fp32_residual_connection: bool = False
    # Sequence parallelism (needs TP > 1): between the tensor-parallel GEMMs the residual stream, norms and
    # dropouts hold this rank's chunk of the sequence, [b, s/tp, h] (docs/parallelism.md).
    sequence_parallel: bool = False
    # A torch.compile backend for each layer's forward ("inductor" with --torch-compile); None = eager.
    # Runtime only: the checkpoint's model args do not carry it (layer.py, docs/training.md).
    torch_compile: Optional[str] = None

    def __post_init__(self):
        if self.max_position_embeddings is None:
            object.__setattr__(self, "max_position_embeddings", self.seq_length)
        if self.ffn_hidden_size is None:
            # Megatron: 4h, or for SwiGLU 2/3 of that (same parameter count) rounded down to 64.
            object.__setattr__(self, "ffn_hidden_size",
                               int(4 * self.hidden_size * 2 / 3 / 64) * 64 if self.swiglu else 4 * self.hidden_size)
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                     "ffn_hidden_size", "num_query_groups"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                f"{self.num_attention_heads}; choose sizes with hidden_size % heads == 0"
            )
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise UserError(f"--position-embedding-type must be one of {POSITION_EMBEDDING_TYPES}")
        if self.normalization not in NORMALIZATIONS:
            raise UserError(f"--normalization must be one of {NORMALIZATIONS}")
        if self.num_attention_heads % self.num_query_groups:
            raise UserError(f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                            f"--num-query-groups {self.num_query_groups}; each group holds nh/G query heads")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise UserError(f"--rotary-percent must be in (0, 1], got {self.rotary_percent:g}")
        if self.position_embedding_type == "rope" and (self.rotary_dim % 2 or self.rotary_dim == 0):
            raise UserError(f"RoPE needs an even, nonzero rotated dimension, got {self.rotary_dim} (head dimension "
                            f"{self.head_dim} x --rotary-percent {self.rotary_percent:g}); change the sizes")
        if self.seq_length > self.max_position_embeddings:
            raise UserError(
                f"--seq-length {self.seq_length} is longer than the position table "
                f"(--max-position-embeddings {self.max_position_embeddings}); raise --max-position-embeddings"
            )
        self._check_recompute()
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1)")

    def _check_recompute(self):
        granularity, method, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if granularity not in (None, *RECOMPUTE_GRANULARITIES):
            raise UserError(f"--recompute-granularity must be one of {RECOMPUTE_GRANULARITIES}")
        if method not in (None, *RECOMPUTE_METHODS):
            raise UserError(f"--recompute-method must be one of {RECOMPUTE_METHODS}")
        if granularity != "full":
            if method is not None:
                raise UserError("--recompute-method needs --recompute-granularity full "
                                "(selective recomputation recomputes core attention in every layer)")
            if n is not None:
                raise UserError("--recompute-num-layers needs --recompute-granularity full and a --recompute-method")
            return
        if method is None:
            raise UserError("--recompute-granularity full needs --recompute-method uniform or block")
        if n is None:
            object.__setattr__(self, "recompute_num_layers", 1)  # Megatron's default
        elif not 1 <= n <= self.num_layers:
            raise UserError(f"--recompute-num-layers must be in [1, {self.num_layers}] (--num-layers), got {n}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """The leading dimensions of each head that RoPE rotates (Megatron: int(hd * rotary_percent))."""
        return int(self.head_dim * self.rotary_percent)
