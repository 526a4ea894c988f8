# A 20B-shaped run for the simulation tests: internlm-20b (hidden 5120, 60 layers) at tensor 4 (sequence
# parallel) x pipeline 4 with 2 interleaved chunks x data 2 on 32 devices, full recomputation.
_base_ = "../../configs/internlm_104b/base.py"
JOB_NAME = "internlm_20b_sim"
model = dict(preset="internlm-20b", num_chunks=2, checkpoint=True)
parallel = dict(tensor=dict(size=4, mode="mtp"), pipeline=dict(size=4, interleaved_overlap=True), zero1=2)
data = dict(train_folder="/data/not/on/this/machine", micro_num=4, total_tokens=1_000_000_000)
