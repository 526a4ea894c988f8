"""Complete prompts with a checkpoint or a Hugging Face folder (KV cache, batched, greedy or sampled).

    python tools/generate.py --model work_dirs/demo --prompt "def main(" --prompt "The module" --max-new-tokens 48
    python tools/generate.py --model hf_out --prompts-file prompts.txt --temperature 0        # greedy
    python tools/generate.py --model work_dirs/demo --step 200 --prompt "import " --top-k 20 --top-p 0.9

``--model``: a run's work_dir, its checkpoints folder or one step folder (the newest verified step unless
``--step``), or a Hugging Face folder (config.json + weights): loaded with `InternLM.from_pretrained`. Prompts come
from ``--prompt`` (repeatable) and/or ``--prompts-file`` (one prompt per line, blank lines skipped). The tokenizer is
``--tokenizer``, else the folder's ``tokenizer.model`` or the run's ``data.tokenizer_path``, else the demo tokenizer
(``data_cache/demo/tokenizer.model``). Sampling follows `internlm.model.generate`: temperature 0 is greedy, else
temperature, then top-k, then top-p; each row stops at the tokenizer's EOS or after ``--max-new-tokens``. Prints
every prompt followed by its completion (the decoded prompt + new tokens).
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

import torch

from internlm.model import InternLM, generate
from internlm.model.pretrained import find_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEMO_TOKENIZER = os.path.join("data_cache", "demo", "tokenizer.model")  # the demo's data.demo_cache_dir


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint (work_dir, checkpoints folder or step) or HF folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest verified one)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", default=None, help="a text file of prompts, one per line")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens; 0: all (default 40)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: the model's, else the demo's)")
    p.add_argument("--bos", action="store_true", help="prepend the tokenizer's BOS id to every prompt")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    p.add_argument("--dtype", default=None, help="fp32 / bf16 / fp16 (default: as saved)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if not args.prompt and not args.prompts_file:
        p.error("give --prompt TEXT (repeatable) and/or --prompts-file FILE")
    if args.max_new_tokens < 0 or args.batch_size < 1 or not 0 < args.top_p <= 1:
        p.error("--max-new-tokens must be >= 0, --batch-size >= 1 and --top-p in (0, 1]")
    return args


def read_prompts(args: argparse.Namespace) -> List[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise SystemExit(f"--prompts-file {args.prompts_file}: no such file")
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    return prompts


def pick_tokenizer(args: argparse.Namespace) -> str:
    path = args.tokenizer or find_tokenizer(args.model, args.step)
    for demo in (DEMO_TOKENIZER, os.path.join(REPO, DEMO_TOKENIZER)):  # from the working directory or the repository
        if path is None and os.path.isfile(demo):
            path = demo
    if path is None or not os.path.isfile(path):
        raise SystemExit(
            f"no tokenizer for {args.model}: it holds no tokenizer.model and records no data.tokenizer_path, and "
            f"{DEMO_TOKENIZER} does not exist; pass --tokenizer MODEL"
        )
    return path


def main(argv: Optional[List[str]] = None) -> List[str]:
    """Print and return the completions (prompt + generated text), one per prompt, in order."""
    from internlm.data import Tokenizer

    args = parse_args(argv)
    prompts = read_prompts(args)
    tokenizer = Tokenizer(pick_tokenizer(args))
    model = InternLM.from_pretrained(args.model, dtype=args.dtype, device=args.device, step=args.step)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise SystemExit(f"tokenizer vocabulary {tokenizer.vocab_size} > the model's {model.config.vocab_size}")
    prefix = [tokenizer.bos_id] if args.bos and tokenizer.bos_id >= 0 else []
    encoded = [prefix + tokenizer.encode(text) for text in prompts]
    if any(len(ids) == 0 for ids in encoded):
        raise SystemExit("an empty prompt has no token to continue from; give text or --bos")
    completions = []
    for start in range(0, len(encoded), args.batch_size):
        rows = generate(
            model,
            encoded[start : start + args.batch_size],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            eos_id=tokenizer.eos_id,
            seed=args.seed + start,
        )
        for offset, ids in enumerate(rows):
            text = tokenizer.decode(ids)
            completions.append(text)
            index = start + offset
            print(f"### {index}: {prompts[index]!r} (+{len(ids) - len(encoded[index])} tokens)\n{text}\n", flush=True)
    return completions


if __name__ == "__main__":
    main()
