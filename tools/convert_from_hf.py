"""Import a Hugging Face folder (Llama, or InternLM's published layout) as a training checkpoint.

    python tools/convert_from_hf.py --hf internlm-7b --output ckpt/internlm-7b
    # then train from it:   ckpt = dict(load_ckpt_folder="ckpt/internlm-7b", ...)
    # or load it:           InternLM.from_pretrained("ckpt/internlm-7b")

``--output`` becomes one checkpoint folder in the format of docs/checkpoint.md: ``model_tp0_pp0.pt`` (a
one-process layout; training under any layout reshards it on load), ``meta.json`` (version 2, step 0, the model
config, the layout and the file's size and CRC-32, written by `internlm.checkpoint.convert`) and the
``tokenizer.model`` when the HF folder has one. Tensors keep their dtype and bits (ours -> HF -> ours is exact).
The weights are read one file at a time and written once (the model is held once, never twice).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from internlm.checkpoint import is_checkpoint
from internlm.checkpoint.convert import write_full_checkpoint
from internlm.model import InternLM, InternLMConfig
from internlm.model.hf import is_hf_folder, iter_hf_tensors


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Import a Hugging Face Llama / InternLM folder as a training checkpoint.")
    p.add_argument("--hf", required=True, help="Hugging Face folder (config.json + safetensors or pytorch_model.bin)")
    p.add_argument("--output", required=True, help="checkpoint folder to write (new, or an earlier import)")
    return p.parse_args(argv)


def convert(hf: str, output: str) -> str:
    if not is_hf_folder(hf):
        raise SystemExit(f"--hf {hf}: not a Hugging Face model folder (config.json and weight files)")
    if os.path.exists(output) and os.listdir(output) and not is_checkpoint(output):
        raise SystemExit(f"--output {output} exists and is not a checkpoint: choose a new folder")
    config = InternLMConfig.from_hf(hf)
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in InternLM(config).named_parameters()}
    start = time.perf_counter()
    state = {}
    for name, tensor in iter_hf_tensors(hf):
        if name not in expected:
            raise SystemExit(f"{hf}: tensor {name!r} does not belong to the model its config.json describes")
        if tuple(tensor.shape) != expected[name]:
            raise SystemExit(f"{hf}: {name} has shape {list(tensor.shape)}, config.json implies {list(expected[name])}")
        state[name] = tensor
    missing = sorted(set(expected) - set(state))
    if missing:
        raise SystemExit(f"{hf}: {len(missing)} tensors missing, e.g. {', '.join(missing[:5])}")
    state = {name: state[name] for name in expected}  # the model's own order
    tokenizer = os.path.join(hf, "tokenizer.model")
    extra = [tokenizer] if os.path.isfile(tokenizer) else []
    write_full_checkpoint(output, state, config.to_dict(), dict(hf=os.path.abspath(hf)), extra)
    del state
    print(
        f"imported {hf} ({len(expected)} tensors, {config.num_params() / 1e6:.1f}M parameters, "
        f"{str(config.dtype).replace('torch.', '')}) into {output} in {time.perf_counter() - start:.1f} s"
    )
    return output


def main(argv=None) -> None:
    args = parse_args(argv)
    convert(args.hf, args.output)


if __name__ == "__main__":
    main()
