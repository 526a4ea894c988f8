#!/usr/bin/env python
"""Pretrain an InternLM model.

    python train.py --config configs/demo.py
    torchrun --nproc_per_node 8 train.py --config configs/internlm_7b/phase1.py configs/internlm_7b/phase2.py

See README.md and docs/.
"""

import os
import sys

# Before torch is imported: OpenMP worker threads sleep while they wait for work instead of spinning (GNU
# OpenMP's default spins first). Next to another busy process, spinning threads steal each other's cores: on 2
# cores the demo's step took 1.4-2.9 s (stalls up to 15 s) spinning and 0.66 s sleeping; 0.38 vs 0.41 s alone
# (README, "CPU threads"). An OMP_WAIT_POLICY set by the user is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from internlm.train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
