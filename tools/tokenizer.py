"""Tokenize raw text into shards of a data folder.

    python tools/tokenizer.py --input corpus/ extra.jsonl --tokenizer tok.model --output data/train --workers 4

``.txt`` files are one document each; ``.jsonl`` files hold one document per line in ``"text"``.
InternLM's flag names are accepted too: ``--text_input_path`` for ``--input`` and ``--bin_output_path`` for
``--output`` (still a data folder here, not a single ``.bin`` file; ``--tokenizer`` is still required).
The shard format is described in docs/data.md. ``tokenize_to_shards`` is re-exported for in-process use.
"""

import argparse
import sys

from internlm.data.tokenize_corpus import tokenize_to_shards


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Tokenize .txt/.jsonl text into .bin shards.")
    p.add_argument(
        "--input",
        "--text_input_path",
        dest="input",
        nargs="+",
        required=True,
        help="files and/or folders (searched recursively); --text_input_path is InternLM's name",
    )
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    p.add_argument(
        "--output",
        "--bin_output_path",
        dest="output",
        required=True,
        help="output data folder (must hold no shards yet); --bin_output_path is InternLM's name",
    )
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (spawn); 1 = in-process")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard (documents are not split)")
    p.add_argument("--prefix", default="shard", help="shard file name prefix")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        info = tokenize_to_shards(
            args.input,
            args.tokenizer,
            args.output,
            workers=args.workers,
            shard_tokens=args.shard_tokens,
            prefix=args.prefix,
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as err:
        print(f"tokenizer: error: {err}", file=sys.stderr)
        return 2
    shards, docs, tokens = len(info["shards"]), info["num_docs"], info["num_tokens"]
    print(f"wrote {shards} shards, {docs} documents, {tokens} tokens to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
