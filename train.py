#!/usr/bin/env python
"""Pretrain an InternLM model.

    python train.py --config configs/demo.py
    torchrun --nproc_per_node 8 train.py --config configs/internlm_7b/phase1.py configs/internlm_7b/phase2.py

See README.md and docs/.
"""

import sys

from internlm.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
