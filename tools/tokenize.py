"""Tokenize raw text into shards of a data folder.

    python tools/tokenize.py --input corpus/ extra.jsonl --tokenizer tok.model --output data/train --workers 4

``.txt`` files are one document each; ``.jsonl`` files hold one document per line in ``"text"``.
The shard format is described in docs/data.md. ``tokenize_to_shards`` is re-exported for in-process use.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _stand_in_for_stdlib_tokenize() -> None:
    """Load the standard library's ``tokenize`` into ``sys.modules`` in place of this file.

    Every script run from tools/ has this folder as ``sys.path[0]``, so ``import tokenize`` (done by
    linecache, inspect, dataclasses, ...) finds this file. The import system returns whatever
    ``sys.modules["tokenize"]`` holds once the module body finishes, so the real module wins.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("tokenize", os.path.join(os.path.dirname(os.__file__), "tokenize.py"))
    real = importlib.util.module_from_spec(spec)
    sys.modules["tokenize"] = real
    spec.loader.exec_module(real)


if __name__ == "tokenize":
    _stand_in_for_stdlib_tokenize()
else:
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    sys.path.insert(0, os.path.dirname(_HERE))
    from internlm.data.tokenize_corpus import tokenize_to_shards


def parse_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Tokenize .txt/.jsonl text into .bin shards.")
    p.add_argument("--input", nargs="+", required=True, help="files and/or folders (searched recursively)")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    p.add_argument("--output", required=True, help="output data folder (must hold no shards yet)")
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
        print(f"tokenize: error: {err}", file=sys.stderr)
        return 2
    shards, docs, tokens = len(info["shards"]), info["num_docs"], info["num_tokens"]
    print(f"wrote {shards} shards, {docs} documents, {tokens} tokens to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
