"""Train a byte-fallback SentencePiece tokenizer on raw text.

    python tools/train_tokenizer.py --input corpus/ --vocab-size 32000 --output tokenizers/my

writes ``tokenizers/my.model`` and ``tokenizers/my.vocab``. Inputs are read like tools/tokenizer.py
(``.txt`` = one document, ``.jsonl`` = one document per line in ``"text"``).
"""

import argparse
import pathlib
import sys

from internlm.data.tokenizer import train_sentencepiece


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a SentencePiece tokenizer on .txt/.jsonl text.")
    p.add_argument("--input", nargs="+", required=True, help="files and/or folders (searched recursively)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output", required=True, help="model prefix: writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="training threads (1 is reproducible)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model = train_sentencepiece(
            [pathlib.Path(p) for p in args.input],
            args.output,
            args.vocab_size,
            model_type=args.model_type,
            max_sentences=args.max_sentences,
            seed=args.seed,
            num_threads=args.threads,
        )
    except (OSError, ValueError, RuntimeError) as err:
        print(f"train_tokenizer: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
