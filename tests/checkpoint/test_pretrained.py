"""`InternLM.from_pretrained` (internlm/model/pretrained.py, internlm/checkpoint/reader.py) and tools/eval_ppl.py.

On the tp2 x pp2 run of tests/checkpoint/test_hf_convert.py: every way of naming a checkpoint (work_dir,
checkpoints folder, step folder, ``step=``) and the exported HF folder load the same weights; no random init runs;
a damaged newest checkpoint falls back to the previous one; eval_ppl's loss equals a direct computation.
"""

from __future__ import annotations

import math
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from test_hf_convert import exported, tp2pp2_run  # noqa: F401  (session fixtures)

from internlm.checkpoint import find_checkpoint, merge_model_checkpoint, model_file
from internlm.model import InternLM
from train_utils import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import eval_ppl  # noqa: E402


def _assert_same(a: InternLM, b: InternLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def test_every_way_to_name_a_checkpoint_loads_the_same(tp2pp2_run, exported, monkeypatch):  # noqa: F811
    def no_init(*args, **kwargs):
        raise AssertionError("from_pretrained must not initialise weights")

    monkeypatch.setattr(InternLM, "init_weights", no_init)
    latest = InternLM.from_pretrained(tp2pp2_run)
    assert not latest.training and latest.lm_head.weight.device.type == "cpu"
    merged = merge_model_checkpoint(os.path.join(tp2pp2_run, "checkpoints", "2"))
    for name, tensor in latest.state_dict().items():
        assert torch.equal(tensor, merged[name]), name
    _assert_same(latest, InternLM.from_pretrained(os.path.join(tp2pp2_run, "checkpoints")))
    _assert_same(latest, InternLM.from_pretrained(os.path.join(tp2pp2_run, "checkpoints", "2")))
    _assert_same(latest, InternLM.from_pretrained(exported))
    first = InternLM.from_pretrained(tp2pp2_run, step=1)
    _assert_same(first, InternLM.from_pretrained(os.path.join(tp2pp2_run, "checkpoints", "1")))
    assert not torch.equal(first.lm_head.weight, latest.lm_head.weight)
    half = InternLM.from_pretrained(exported, dtype="bf16")
    assert half.config.dtype == torch.bfloat16 and torch.equal(half.norm.weight, latest.norm.weight.bfloat16())
    with pytest.raises(FileNotFoundError, match="has no checkpoint of step 7"):
        InternLM.from_pretrained(tp2pp2_run, step=7)
    with pytest.raises(ValueError, match="step=1 applies to training checkpoints"):
        InternLM.from_pretrained(exported, step=1)


def test_damaged_newest_checkpoint_falls_back(tp2pp2_run, tmp_path):  # noqa: F811
    copy = str(tmp_path / "run")
    shutil.copytree(os.path.join(tp2pp2_run, "checkpoints"), os.path.join(copy, "checkpoints"))
    damaged = os.path.join(copy, "checkpoints", "2", model_file(1, 1))
    with open(damaged, "r+b") as f:
        f.seek(-100, os.SEEK_END)
        f.write(b"\0" * 50)
    warnings = []
    assert find_checkpoint(copy, warn=warnings.append) == os.path.join(copy, "checkpoints", "1")
    assert "model_tp1_pp1.pt fails its checksum" in warnings[0]
    _assert_same(InternLM.from_pretrained(copy), InternLM.from_pretrained(tp2pp2_run, step=1))
    assert os.path.isdir(os.path.join(copy, "checkpoints", "2"))  # reported, never moved by a reader


def test_eval_ppl_matches_a_direct_computation(tp2pp2_run, demo_data, tmp_path, capsys):  # noqa: F811
    text = tmp_path / "sample.txt"
    text.write_text("import os\n\ndef main():\n    print(os.getcwd())\n", encoding="utf-8")
    rows = eval_ppl.main(
        ["--model", tp2pp2_run, "--data", demo_data["docs"], "--text-file", str(text), "--seq-len", "32"]
        + ["--max-tokens", "100"]
    )
    out = capsys.readouterr().out
    assert "source" in out and "ppl" in out and demo_data["docs"] in out
    (folder, count, loss, ppl), (_, text_count, text_loss, _) = rows
    assert folder == demo_data["docs"] and count == 100 and math.isclose(ppl, math.exp(loss))

    # the text file is one document: encode + [eos]; within one window every next token is a label but the last
    from internlm.data import Tokenizer

    tokenizer = Tokenizer(demo_data["tokenizer"])
    ids = tokenizer.encode(text.read_text(encoding="utf-8"))
    assert len(ids) + 1 <= 32
    ids = torch.tensor(ids + [tokenizer.eos_id])
    model = InternLM.from_pretrained(tp2pp2_run)
    with torch.no_grad():
        logits = model(ids[None])[0]
    expected = F.cross_entropy(logits[:-1], ids[1:]).item()
    assert text_count == len(ids) - 1 and math.isclose(text_loss, expected, rel_tol=1e-5), (text_loss, expected)
