"""Perplexity of a checkpoint or Hugging Face folder on tokenized data folders or raw text files.

    python tools/eval_ppl.py --model work_dirs/demo --data data_cache/demo/docs data_cache/demo/code
    python tools/eval_ppl.py --model hf_demo --text-file notes.txt --seq-len 512 --max-tokens 20000

Each source is read from its start as the training loader reads it: windows of ``--seq-len`` tokens, split into
pieces at document ends (no attention or prediction across documents; positions restart per document), labels the
next token except after a document's EOS. A raw text file is one document (``encode(text) + [eos]``, with the
model's tokenizer: the folder's, the run's ``data.tokenizer_path``, or ``--tokenizer``). Per source, over the N
labels of the windows read (at most ``--max-tokens``): loss = sum of -log p(label) / N, ppl = exp(loss).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from internlm.data.packing import pack_window
from internlm.labels import IGNORE_INDEX
from internlm.model import HeadInput, InternLM
from internlm.model.pretrained import find_tokenizer


class TextStream:
    """Raw text files as a token stream (one document per file), with `TokenStream`'s read / doc_ends."""

    def __init__(self, paths: List[str], tokenizer_path: str) -> None:
        from internlm.data import Tokenizer

        tok = Tokenizer(tokenizer_path)
        docs = []
        for path in paths:
            with open(path, encoding="utf-8") as f:
                docs.append(np.asarray(tok.encode(f.read()) + [tok.eos_id], dtype=np.int64))
        self.tokens = np.concatenate(docs) if docs else np.zeros(0, np.int64)
        self.ends = np.cumsum([d.size for d in docs]).astype(np.int64)
        self.num_tokens = int(self.tokens.size)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.tokens[start:stop]

    def doc_ends(self, start: int, stop: int) -> np.ndarray:
        return self.ends[(self.ends > start) & (self.ends <= stop)]


@torch.no_grad()
def evaluate(model: InternLM, stream, seq_len: int, max_tokens: int, device: torch.device) -> Tuple[int, float]:
    """(labels counted, summed negative log-likelihood) over the windows of ``stream`` from its start."""
    count, nll, start = 0, 0.0, 0
    while start < stream.num_tokens and count < max_tokens:
        stop = min(start + seq_len + 1, stream.num_tokens)
        tokens = stream.read(start, stop)
        if tokens.size < seq_len:  # a short tail: evaluate it as a shorter window
            seq = tokens.size
        else:
            seq = seq_len
        ends = stream.doc_ends(start, start + seq) - start
        packed = pack_window(tokens[: seq + 1], ends, seq)
        labels = torch.from_numpy(packed.labels).to(device)
        out = model(
            torch.from_numpy(packed.input_ids).view(1, -1).to(device),
            cu_seqlens=torch.from_numpy(packed.cu_seqlens).to(device),
            position_ids=torch.from_numpy(packed.position_ids).view(1, -1).to(device),
            max_seqlen=int(np.diff(packed.cu_seqlens).max()),
            cu_seqlens_list=packed.cu_seqlens.tolist(),
        )
        logits = (out.logits() if isinstance(out, HeadInput) else out)[0].float()
        keep = labels != IGNORE_INDEX
        budget = max_tokens - count
        if int(keep.sum()) > budget:  # stop exactly at max_tokens labels
            keep &= torch.cumsum(keep.int(), 0) <= budget
        nll += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
        start += seq
    return count, nll


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Perplexity per data folder or text file.")
    p.add_argument("--model", required=True, help="checkpoint (work_dir / checkpoints / step folder) or HF folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest verified one)")
    p.add_argument("--data", nargs="+", default=[], help="tokenized data folders (tools/tokenizer.py shards)")
    p.add_argument("--text-file", nargs="+", default=[], help="raw UTF-8 text files, one document each")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model for --text-file (default: the model's)")
    p.add_argument("--seq-len", type=int, default=2048, help="window length (default 2048)")
    p.add_argument("--max-tokens", type=int, default=100_000, help="labels evaluated per source (default 100000)")
    p.add_argument("--dtype", default=None, help="fp32 / bf16 / fp16 (default: as saved)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if not args.data and not args.text_file:
        p.error("give --data FOLDER [FOLDER ...] and/or --text-file FILE [FILE ...]")
    return args


def main(argv=None) -> List[Tuple[str, int, float, float]]:
    args = parse_args(argv)
    from internlm.data import TokenStream

    device = torch.device(args.device)
    model = InternLM.from_pretrained(args.model, dtype=args.dtype, device=device, step=args.step)
    sources = [(folder, TokenStream(folder)) for folder in args.data]
    if args.text_file:
        tokenizer = args.tokenizer or find_tokenizer(args.model, args.step)
        if tokenizer is None:
            raise SystemExit(f"--text-file needs a tokenizer: {args.model} records none; pass --tokenizer MODEL")
        for path in args.text_file:
            sources.append((path, TextStream([path], tokenizer)))
    rows = []
    print(f"{'source':<48} {'tokens':>10} {'loss':>8} {'ppl':>10}")
    for name, stream in sources:
        if (getattr(stream, "vocab_size", None) or 0) > model.config.vocab_size:  # None: Megatron data
            raise SystemExit(f"{name}: vocabulary {stream.vocab_size} > the model's {model.config.vocab_size}")
        start = time.perf_counter()
        count, nll = evaluate(model, stream, args.seq_len, args.max_tokens, device)
        loss = nll / max(count, 1)
        rows.append((name, count, loss, math.exp(loss)))
        print(f"{name:<48} {count:>10} {loss:>8.4f} {math.exp(loss):>10.3f}   ({time.perf_counter() - start:.1f} s)")
    return rows


if __name__ == "__main__":
    main()
