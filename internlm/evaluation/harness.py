"""lm-evaluation-harness on our checkpoints: the model class ``internlm`` (``pip install -e ".[eval]"``).

    python tools/eval_harness.py --model internlm --model_args pretrained=work_dirs/demo,dtype=float32 \\
        --tasks my_task --include_path my_tasks/ --device cpu --batch_size 4 --output_path out/

    import internlm.evaluation.harness  # registers "internlm" with lm-eval
    lm_eval.simple_evaluate(model="internlm", model_args="pretrained=work_dirs/demo", tasks=[...])

``model_args``: ``pretrained`` (a work_dir, its checkpoints folder, a step folder or a Hugging Face folder: any
layout, `InternLM.from_pretrained`), ``step``, ``dtype`` (float32, bfloat16, ...; default the checkpoint's),
``tokenizer`` (a SentencePiece .model; default the checkpoint's: its folder's tokenizer.model or the run's
data.tokenizer_path, `find_tokenizer`), ``max_length`` (default max_position_embeddings), ``max_gen_toks`` (256).

The requests are encoded by lm-eval's own rule (`TemplateLM`: no BOS; an empty context and a rolling window start
from BOS, or EOS without one), as its ``hf`` model does, so a checkpoint and its `tools/convert_to_hf.py` export
score alike. ``loglikelihood``: the summed log-probability of the continuation's tokens (context cut from the left
to ``max_length``) and whether each is the argmax; ``loglikelihood_rolling``: lm-eval's disjoint rolling windows
of ``max_length``; ``generate_until``: greedy (or sampled with ``do_sample``/``temperature``) with the KV cache of
`internlm.model.generate`, cut at the first stop string.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from internlm.data import Tokenizer
from internlm.model import InternLM, generate
from internlm.model.pretrained import find_tokenizer

Request = Tuple[Any, List[int], List[int]]  # ((context, continuation) or None, context ids, continuation ids)


@register_model("internlm")
class InternLMHarnessModel(TemplateLM):
    """An InternLM checkpoint as an lm-eval model (module docstring: arguments and rules)."""

    def __init__(
        self,
        pretrained: str,
        step: Optional[int] = None,
        dtype: Optional[str] = None,
        device: Optional[str] = "cpu",
        tokenizer: Optional[str] = None,
        batch_size: Any = 1,
        max_length: Optional[int] = None,
        max_gen_toks: int = 256,
        **_: Any,  # lm-eval passes max_batch_size and others our class has no use for
    ) -> None:
        super().__init__()
        step = None if step is None else int(step)
        self._device = torch.device(device or "cpu")
        self.model = InternLM.from_pretrained(pretrained, dtype=dtype, device=self._device, step=step)
        path = tokenizer or find_tokenizer(pretrained, step)
        if path is None:
            raise ValueError(f"{pretrained}: no tokenizer.model and no recorded data.tokenizer_path; pass tokenizer=")
        self.tokenizer = Tokenizer(path)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1  # "auto" is not supported: 1
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)

    # ---------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and a rolling window start from: BOS when the tokenizer has one, else EOS (as
        lm-eval's hf model, so that the two score alike)."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id >= 0 else self.tokenizer.eos_id

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, **_: Any) -> List[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int], **_: Any) -> str:
        return self.tokenizer.decode(tokens)

    # ---------------------------------------------------------------- log-likelihood
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: List[Request], disable_tqdm: bool = False, **_: Any):
        """``(sum of log p(continuation token), all greedy)`` per request, in batches of ``batch_size`` rows
        (longest first, right-padded: a causal model's padding after a row does not change it)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: Dict[int, Tuple[float, bool]] = {}
        for a in range(0, len(order), self.batch_size):
            batch = order[a : a + self.batch_size]
            rows, conts = [], []
            for i in batch:
                _, context, continuation = requests[i]
                rows.append((context + continuation)[-(self.max_length + 1) :][:-1])
                conts.append(continuation)
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = torch.tensor(row)
            logprobs = F.log_softmax(self.model(ids.to(self._device)).float(), dim=-1).cpu()
            for r, i in enumerate(batch):
                n, cont = len(rows[r]), torch.tensor(conts[r])
                picked = logprobs[r, n - len(cont) : n]
                answer = (float(picked.gather(-1, cont[:, None]).sum()), bool((picked.argmax(-1) == cont).all()))
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return [results[i] for i in range(len(requests))]

    def loglikelihood_rolling(self, requests: List[Any], disable_tqdm: bool = False) -> List[float]:
        """The log-likelihood of each whole text: lm-eval's disjoint windows of ``max_length`` (`prefix_token_id`
        first)."""
        out = []
        for request in requests:
            (text,) = request.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            pieces = [(None,) + make_disjoint_window(w) for w in windows]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(pieces))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ---------------------------------------------------------------- generation
    def generate_until(self, requests: List[Any], disable_tqdm: bool = False) -> List[str]:
        """Each request's continuation of its context, cut before the first stop string (EOS included)."""
        out = []
        eos_text = self.tok_decode([self.eot_token_id])
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text or None)
            max_new = int(kwargs.pop("max_gen_toks"))
            prompt = self.tok_encode(context)[-max(self.max_length - max_new, 1) :] or [self.eot_token_id]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            ids = generate(
                self.model,
                prompt,
                max_new_tokens=max_new,
                temperature=temperature,
                top_k=kwargs.get("top_k"),
                top_p=kwargs.get("top_p"),
                eos_id=self.eot_token_id,
            )
            text = self.tok_decode([t for t in ids[len(prompt) :] if t != self.eot_token_id])
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


__all__ = ["InternLMHarnessModel"]
