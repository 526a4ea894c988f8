# One-phase shortcut of the demo (the two-phase demo: configs/demo/phase1.py configs/demo/phase2.py).
_base_ = "demo/phase1.py"

data = dict(total_steps=400)
phase = dict(name="demo")
work_dir = "work_dirs/demo_one_phase"
