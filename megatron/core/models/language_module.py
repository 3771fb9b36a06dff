"""What GPT and BERT share as pipeline stages: the stage's parts, the tied output weight, layout-free init.

One model object is one pipeline stage: the first stage (`pre_process`) owns the embeddings, the last
(`post_process`) the heads and the loss; a middle stage receives its input through `set_input_tensor`.
With one stage it is the whole model. The layers of the stage are numbered globally
(`layer_offset` + local index), which is what random-LTD's layer set and the init keys use.

Tied embeddings across stages: the last stage keeps its own copy of the word-embedding matrix as
`output_layer.weight`, initialized from the same key as `embedding.word_embeddings.weight` (so the two
start equal) and marked `shared_embedding`; the trainer all-reduces their gradients over the embedding
group every step, so they stay equal. With one stage the embedding matrix itself serves both ends.

Subclasses build `embedding` (first stage), the block under `block_name` (`decoder` for GPT, `encoder`
for BERT, as in megatron-core) and their heads, then call `reset_parameters`.
"""

import re
from typing import Optional

import torch
from torch import nn

from megatron.core import parallel_state
from megatron.core.models.init import init_parameters
from megatron.core.tensor_parallel import divide, set_tensor_model_parallel_attributes
from megatron.core.transformer.config import TransformerConfig


class LanguageModule(nn.Module):
    def __init__(self, config: TransformerConfig, pre_process: bool, post_process: bool, layer_offset: int,
                 block_name: str):
        super().__init__()
        self.config = config
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_offset = layer_offset
        self.share_embeddings = not config.untie_embeddings_and_output_weights
        self._layer_key = re.compile(rf"^{block_name}\.layers\.(\d+)\.")
        self._block_name = block_name
        self.input_tensor = None

    def make_output_layer(self, bias: bool = False) -> Optional[nn.Module]:
        """The last stage's own output-projection parameters, or None when it needs none: the weight
        `[V/tp, h]` unless it is this stage's embedding matrix, and a vocab-parallel bias `[V/tp]` if asked."""
        own_weight = self.post_process and (not self.share_embeddings or not self.pre_process)
        if not self.post_process or not (own_weight or bias):
            return None
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rows = divide(self.config.vocab_size, tp, "the padded vocabulary (see --make-vocab-size-divisible-by)")
        layer = nn.Module()
        if own_weight:
            layer.weight = nn.Parameter(torch.empty(rows, self.config.hidden_size))
            set_tensor_model_parallel_attributes(layer.weight, True, partition_dim=0, stride=1)
            layer.weight.shared_embedding = self.share_embeddings  # a copy of the first stage's embedding
        if bias:
            layer.bias = nn.Parameter(torch.empty(rows))
            set_tensor_model_parallel_attributes(layer.bias, True, partition_dim=0, stride=1)
        return layer

    def global_param_name(self, name: str) -> str:
        """The layout-free name: global layer numbers; a tied output copy shares the embedding's key."""
        name = self._layer_key.sub(
            lambda m: f"{self._block_name}.layers.{int(m.group(1)) + self.layer_offset}.", name)
        if name == "output_layer.weight" and self.share_embeddings:
            return "embedding.word_embeddings.weight"
        return name

    def reset_parameters(self, seed: int = 1234) -> None:
        init_parameters(self, self.global_param_name, self.config.init_method_std, self.config.num_layers, seed)

    def set_input_tensor(self, tensor: Optional[torch.Tensor]) -> None:
        """The hidden states a middle or last stage receives from the previous stage: [b, s, h]."""
        self.input_tensor = tensor

    def output_weight(self) -> torch.Tensor:
        """The `[V/tp, h]` matrix of the output projection: the last stage's own, or the embedding."""
        own = getattr(self.output_layer, "weight", None) if self.output_layer is not None else None
        return self.embedding.word_embeddings.weight if own is None else own
