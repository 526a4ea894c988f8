"""Export a training checkpoint as a Hugging Face folder (``LlamaForCausalLM``, no remote code).

    python tools/convert_to_hf.py --checkpoint work_dirs/demo --output hf_demo
    python tools/convert_to_hf.py --checkpoint work_dirs/demo/checkpoints --step 200 --output hf_demo \\
        --tokenizer data_cache/demo/tokenizer.model --dtype bf16 --max-shard-size 2GB

Writes ``config.json`` (`InternLMConfig.to_hf`), the weights as safetensors files of at most ``--max-shard-size``
(with ``model.safetensors.index.json`` when there are several) and the tokenizer (``tokenizer.model``,
``tokenizer_config.json``, ``special_tokens_map.json``: a ``LlamaTokenizer``). The checkpoint may be saved under
any layout (tensor shards are joined, pipeline stages and chunks gathered). Streams: each output file is built
from the memory-mapped checkpoint files, written, and freed before the next (peak: one output file).
The tokenizer defaults to the run's ``data.tokenizer_path`` (found through the work_dir's resolved config).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

from internlm.checkpoint import CheckpointReader, find_checkpoint
from internlm.errors import BadInputError
from internlm.model.config import parse_dtype
from internlm.model.hf import (
    SAFE_INDEX,
    tokenizer_ids,
    write_hf_config,
    write_hf_tokenizer,
    write_hf_weights,
)
from internlm.model.pretrained import checkpoint_config, find_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Export a training checkpoint as a Hugging Face LlamaForCausalLM folder.")
    p.add_argument("--checkpoint", required=True, help="work_dir, its checkpoints folder, or one step folder")
    p.add_argument("--step", type=int, default=None, help="step to export (default: the newest verified one)")
    p.add_argument("--output", required=True, help="Hugging Face folder to write")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: the run's data.tokenizer_path)")
    p.add_argument("--dtype", default=None, help="weights dtype: fp32, bf16, fp16 (default: as saved)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> str:
    folder = find_checkpoint(args.checkpoint, args.step)
    reader = CheckpointReader(folder)
    config = checkpoint_config(reader)
    dtype = parse_dtype(args.dtype) if args.dtype else None
    tokenizer = args.tokenizer or find_tokenizer(folder)
    if args.tokenizer and not os.path.isfile(args.tokenizer):
        raise SystemExit(f"--tokenizer {args.tokenizer}: no such file")
    os.makedirs(args.output, exist_ok=True)
    # weights of an earlier export would shadow or mix with these (transformers prefers model.safetensors)
    for stale in glob.glob(os.path.join(args.output, "model*.safetensors")) + [os.path.join(args.output, SAFE_INDEX)]:
        if os.path.isfile(stale):
            os.remove(stale)
    ids = tokenizer_ids(tokenizer) if tokenizer else {}
    write_hf_config(args.output, config, dtype, **ids)
    out_dtype = dtype or config.dtype
    sizes = [
        (name, entry.nbytes // entry.dtype.itemsize * out_dtype.itemsize) for name, entry in reader.entries().items()
    ]
    start = time.perf_counter()
    files = write_hf_weights(args.output, sizes, reader.tensor, args.max_shard_size, dtype)
    reader.close()
    total = sum(n for _, n in sizes)
    print(
        f"exported {folder} (step {reader.step}, {len(sizes)} tensors, {total / 1e6:.1f} MB "
        f"{str(out_dtype).replace('torch.', '')}) to {args.output}: {len(files)} safetensors file(s) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    if tokenizer:
        write_hf_tokenizer(tokenizer, args.output)
        print(f"tokenizer {tokenizer} -> {args.output}/tokenizer.model (LlamaTokenizer)")
    else:
        print(
            "no tokenizer written: the checkpoint's run config names no tokenizer_path that exists; "
            "pass --tokenizer MODEL to include one"
        )
    return args.output


def main(argv=None) -> None:
    try:
        convert(parse_args(argv))
    except BadInputError as exc:  # e.g. a checkpoint file whose pickle would run code: refused, one line, status 2
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
