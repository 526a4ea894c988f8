"""lm-evaluation-harness with our model class: registers ``internlm`` (internlm/evaluation/harness.py), then runs
lm-eval's own command line with every argument passed through (docs/evaluation.md).

    python tools/eval_harness.py --model internlm --model_args pretrained=work_dirs/demo,dtype=float32 \\
        --tasks my_task --include_path my_tasks/ --device cpu --batch_size 4 --output_path out/

Needs the ``eval`` extra: ``pip install -e ".[eval]"``. (Not named lm_eval.py: that would shadow the package.)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise SystemExit('error: lm-eval is not installed: pip install -e ".[eval]"') from None
    import internlm.evaluation.harness  # noqa: F401  (registers the "internlm" model)

    cli_evaluate()  # reads sys.argv: every argument goes to lm-eval as given


if __name__ == "__main__":
    main()
