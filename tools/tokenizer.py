"""Tokenize raw documents into shards of a data folder.

    python tools/tokenizer.py --input corpus/ extra.jsonl.zst --tokenizer tok.model --output data/train --workers 4

Inputs (files or folders, folders searched recursively in sorted relative-path order): ``.txt`` (one document per
file), ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` (one document per line, in ``--text-key``), ``.parquet`` and
``.arrow`` (one per row, column ``--text-key``) and Hugging Face datasets saved with ``save_to_disk``.
``--dedup exact`` drops documents whose text was seen before; ``--skip-bad`` counts malformed records instead of
stopping at the first. An interrupted run continues where it stopped when the same command is run again.
InternLM's flag names are accepted too: ``--text_input_path`` for ``--input`` and ``--bin_output_path`` for
``--output`` (still a data folder here, not a single ``.bin`` file; ``--tokenizer`` is still required).
The shard format is described in docs/data.md. ``tokenize_to_shards`` is re-exported for in-process use.
"""

import argparse
import os
import sys

from internlm.data.tokenize_corpus import STATE_FILE, tokenize_to_shards


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Tokenize text (txt, jsonl[.gz|.zst], parquet, HF datasets) into shards.")
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
        help="output data folder (must hold no shards yet, unless it holds an interrupted run to finish)",
    )
    p.add_argument("--text-key", default="text", help="JSON field / column holding the text (default: text)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (spawn); 1 = in-process")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard (documents are not split)")
    p.add_argument("--prefix", default="shard", help="shard file name prefix")
    p.add_argument("--dedup", choices=("none", "exact"), default="none", help="exact: drop repeated documents")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed records instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="hide the progress line")
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
            text_key=args.text_key,
            dedup=args.dedup,
            skip_bad=args.skip_bad,
        )
    except (OSError, ValueError) as err:
        kept = os.path.isfile(os.path.join(args.output, STATE_FILE))
        hint = "; the completed input files are kept: fix it and run the same command again to go on" if kept else ""
        print(f"tokenizer: error: {err}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tokenizer: interrupted; run the same command again to finish {args.output}", file=sys.stderr)
        return 130
    shards, docs, tokens = len(info["shards"]), info["num_docs"], info["num_tokens"]
    extra = [f"{info['files']} input files"]
    if info["resumed_files"]:
        extra.append(f"resumed after {info['resumed_files']} completed files")
    if args.dedup != "none":
        extra.append(f"{info['duplicates']} duplicate documents dropped")
    if args.skip_bad:
        extra.append(f"{info['bad_records']} bad records skipped")
    print(f"wrote {shards} shards, {docs} documents, {tokens} tokens to {args.output} ({'; '.join(extra)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
