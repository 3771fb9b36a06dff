"""Our GPT as an lm-evaluation-harness 0.4 model: loglikelihood, rolling loglikelihood, greedy generation.

    lm = MegatronGPTLM(model, tokenizer, batch_size=16)        # an in-memory model, or
    lm = MegatronGPTLM(load="runs/gpt/checkpoints")             # a checkpoint folder
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])  # or `--model megatron-gpt` (registered)

Scoring. A request's tokens are `(context + continuation)[-(L+1):][:-1]` (L = the model's position
table, left truncation), right-padded with EOD; the model is strictly causal, so padding after a row
never changes the logits this row reads. Log-probabilities are a softmax over the model's full padded
vocabulary, exactly as in the training loss and as in the Hugging Face export; padded ids are never
targets. An empty context is the EOD token (lm-eval's `prefix_token_id`). Rolling loglikelihood uses
lm-eval's disjoint windows of L tokens, as its `hf` backend does, so perplexities agree with it.

Generation is greedy without a KV cache: each step runs the batch (right-padded) once and appends the
argmax at each row's end; padded vocabulary ids are never generated. A row stops at EOD, at any `until`
string, or after `max_gen_toks`; the text is cut at the first stop string. A task that sets no
`max_gen_toks` gets min(256, L // 2) (256 would not fit a small model's window); one that asks for more
than fits is an error. Sampling settings (`do_sample: true`, `temperature`) are ignored with a warning.

Mode: each request batch runs in eval mode (no dropout, no token dropping, full length); the model's
previous train/eval mode is restored afterwards, so evaluating inside a training loop leaves it as it was.

Data parallel: `rank`/`world_size` and the `all_gather`/`gather_object`/`barrier` hooks run on the
data-parallel group, so lm-eval shards documents across ranks and rank 0 alone aggregates and reports.

Glossary: b batch rows, s padded row length, V padded vocab, L max length.
"""

import contextlib
import json
import logging
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megatron.core import parallel_state
from megatron.core.errors import UserError

logger = logging.getLogger(__name__)
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf backend default, for tasks that set none


def _default_group():
    """The data-parallel group where one exists, else the whole world; None in a plain process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() > 1 or \
                parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise UserError("evaluation runs data parallel only; merge the tensor/pipeline-parallel checkpoint "
                            "with tools/checkpoint_util.py --merge and launch with tp = pp = 1")
        return parallel_state.get_data_parallel_group() or dist.group.WORLD
    return dist.group.WORLD


@register_model("megatron-gpt")
class MegatronGPTLM(TemplateLM):
    """lm-eval model over a `GPTModel` and our `Tokenizer` (see the module docstring for the scoring rules)."""

    def __init__(self, model=None, tokenizer=None, batch_size=8, max_length: Optional[int] = None,
                 max_gen_toks: Optional[int] = None, device=None, load: Optional[str] = None, iteration=None,
                 group=None, **kwargs):
        super().__init__()
        if load is not None:  # `--model megatron-gpt --model_args load=DIR` on lm-eval's own CLI
            from megatron.evaluation.checkpoint_model import load_gpt_checkpoint
            device = torch.device(device) if device else parallel_state.get_device()
            loaded = load_gpt_checkpoint(load, None if iteration is None else int(iteration), device=device)
            model, tokenizer = loaded.model, loaded.tokenizer
        if model is None or tokenizer is None:
            raise UserError("MegatronGPTLM needs a model and its tokenizer, or load=CHECKPOINT_DIR")
        self.model = model  # put in eval mode per request batch, its own mode restored after (see `_eval_mode`)
        self.tokenizer = tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        self._max_length = int(max_length or model.config.max_position_embeddings)
        if max_gen_toks is not None and int(max_gen_toks) >= self._max_length:
            raise UserError(f"max_gen_toks {max_gen_toks} leaves no room for context in the model's "
                            f"{self._max_length} positions; pass a smaller max_gen_toks")
        self.max_gen_toks = None if max_gen_toks is None else int(max_gen_toks)  # None: per task, see below
        self._warned = set()  # warnings already logged by this adapter (each once)
        self._vocab = tokenizer.vocab_size  # ids >= this are vocabulary padding
        self._group = group if group is not None else _default_group()
        distributed = self._group is not None
        self._rank = dist.get_rank(self._group) if distributed else 0
        self._world_size = dist.get_world_size(self._group) if distributed else 1

    # --- tokens -------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> List[int]:
        return self.tokenizer.tokenize(string)  # never adds BOS/EOS: training data had none inside docs

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.detokenize(list(tokens))

    def get_model_info(self) -> dict:
        n = sum(p.numel() for p in self.model.parameters())
        return {"model_num_parameters": n, "model_dtype": str(next(self.model.parameters()).dtype)}

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            if self._rank == 0:
                logger.warning(message)

    @contextlib.contextmanager
    def _eval_mode(self):
        """Eval mode (no dropout, no token dropping) for one call; the caller's mode is restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    # --- scoring ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _logits(self, rows: List[List[int]]) -> torch.Tensor:
        """The model's logits for right-padded `rows`: [b, s, V]."""
        s = max(len(r) for r in rows)
        tokens = torch.full((len(rows), s), self.eot_token_id, dtype=torch.long)  # [b, s]
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return self.model(tokens.to(self._device))  # [b, s, V]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy choice) per request, in order."""
        L = self.max_length
        rows, conts = [], []
        for _, ctx, cont in requests:
            whole = (list(ctx) + list(cont))[-(L + 1):]
            rows.append(whole[:-1])
            conts.append(list(cont)[-len(whole[:-1]):] if cont else [])
        results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # longest first: similar lengths per batch
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            with self._eval_mode():
                logits = self._logits([rows[i] for i in batch])  # [b, s, V]
            for j, i in enumerate(batch):
                n, c = len(rows[i]), len(conts[i])
                if c == 0:
                    results[i] = (0.0, True)
                    continue
                lp = F.log_softmax(logits[j, n - c:n].float(), dim=-1)  # [c, V]: the positions predicting cont
                target = torch.tensor(conts[i], device=lp.device)  # [c]
                score = lp.gather(1, target[:, None]).sum().item()
                results[i] = (score, bool((lp.argmax(-1) == target).all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Total log p of each whole document, over disjoint windows of `max_length` predicted tokens."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, 1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (score, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += score
        return totals

    # --- generation ---------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy continuation of each context, cut at the first `until` string."""
        groups = {}  # requests with equal generation settings share batches
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        results: List[Optional[str]] = [None] * len(requests)
        for indices in groups.values():
            until, max_gen = self._generation_settings(requests[indices[0]].args[1])
            contexts = {i: self.tok_encode(requests[i].args[0]) for i in indices}
            indices.sort(key=lambda i: -len(contexts[i]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                with self._eval_mode():
                    texts = self._greedy([contexts[i] for i in batch], until, max_gen)
                for i, text in zip(batch, texts):
                    results[i] = text
        return results

    def _generation_settings(self, gen_kwargs: dict):
        """(stop strings, max new tokens) for a task's generation_kwargs."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = [u for u in ([until] if isinstance(until, str) else until) if u]
        if kw.get("do_sample"):
            self._warn_once("do_sample", "a task asks for do_sample: true; megatron-gpt generates greedily "
                                         "(sampling settings such as temperature are ignored)")
        if kw.get("max_gen_toks") is not None:  # the task (or simple_evaluate's gen_kwargs) asked for this many
            max_gen = int(kw["max_gen_toks"])
            if max_gen >= self.max_length:
                raise UserError(f"a task asks for max_gen_toks {max_gen}, which leaves no room for context in "
                                f"the model's {self.max_length} positions; lower it in the task's "
                                f"generation_kwargs")
        elif self.max_gen_toks is not None:
            max_gen = self.max_gen_toks
        else:  # lm-eval's usual 256 where it fits, else half the window (context keeps the other half)
            max_gen = min(DEFAULT_MAX_GEN_TOKS, self.max_length // 2)
            if max_gen < DEFAULT_MAX_GEN_TOKS:
                self._warn_once("max_gen_toks", f"a task sets no max_gen_toks; generating at most {max_gen} "
                                                f"tokens (half of the model's {self.max_length} positions)")
        return until, max_gen

    def _greedy(self, contexts: List[List[int]], until: List[str], max_gen: int) -> List[str]:
        keep = self.max_length - max_gen  # left-truncate contexts so context + generation fits
        seqs = [(c or [self.prefix_token_id])[-keep:] for c in contexts]
        generated: List[List[int]] = [[] for _ in seqs]
        active = list(range(len(seqs)))  # rows still generating
        for _ in range(max_gen):
            logits = self._logits([seqs[i] for i in active])  # [b, s, V]
            last = torch.tensor([len(seqs[i]) - 1 for i in active], device=logits.device)  # [b]
            next_ids = logits[torch.arange(len(active)), last, :self._vocab].argmax(-1).tolist()  # [b]
            for i, tok in zip(list(active), next_ids):
                if tok != self.eot_token_id:
                    seqs[i].append(tok)
                    generated[i].append(tok)
                if tok == self.eot_token_id or any(u in self.tok_decode(generated[i]) for u in until):
                    active.remove(i)
            if not active:
                break
        return [self._cut(self.tok_decode(g), until) for g in generated]

    @staticmethod
    def _cut(text: str, until: List[str]) -> str:
        for u in until:
            text = text.split(u)[0]
        return text

    # --- data-parallel hooks (lm-eval shards documents by rank and gathers metrics on rank 0) ---------

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor, concatenated along dim 0 (a scalar becomes one entry per rank)."""
        if self._world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self._group)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        """The list of every rank's `obj` on group rank `dst`; None elsewhere."""
        if self._world_size == 1:
            return [obj]
        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dist.get_global_rank(self._group, dst), group=self._group)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            dist.barrier(group=self._group)
