#!/usr/bin/env python
"""Convert data tokenized by InternLM's tools/tokenizer.py (``.bin`` JSON lines + numpy ``.bin.meta``) into this
framework's shards, once; then point ``data.train_folder`` (or ``valid_folder``) at DST.

    python tools/convert_internlm_data.py SRC DST [--vocab-size 103168] [--eos-id 2] [--min-length 0]

SRC is searched recursively (InternLM's ``train/cn/...`` folders); every ``.bin`` becomes one shard directly in
DST, documents copied token for token (see internlm/data/internlm_format.py).
"""

import argparse
import sys

from internlm.data.internlm_format import convert_internlm_folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="InternLM tokenized data folder (searched recursively)")
    parser.add_argument("dst", help="output folder for this framework's shards")
    parser.add_argument("--vocab-size", type=int, default=103168, help="model vocabulary size (default: InternLM-7B's)")
    parser.add_argument("--eos-id", type=int, default=2, help="end-of-sequence id recorded in the shard header")
    parser.add_argument(
        "--min-length",
        type=int,
        default=0,
        help="drop documents shorter than this many tokens (InternLM's data.min_length)",
    )
    args = parser.parse_args(argv)
    try:
        stats = convert_internlm_folder(args.src, args.dst, args.vocab_size, args.eos_id, args.min_length)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"converted {stats['files']} file(s): {stats['documents']:,} documents, {stats['tokens']:,} tokens "
        f"({stats['dropped']:,} shorter than {args.min_length} dropped) into {args.dst}; "
        f"set data.train_folder={args.dst!r}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
