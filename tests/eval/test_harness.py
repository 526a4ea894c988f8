"""lm-evaluation-harness: our model class ``internlm`` on a training checkpoint scores what lm-eval's own ``hf``
model scores on the same checkpoint exported by tools/convert_to_hf.py (log-likelihood, rolling log-likelihood
and greedy generation), through tools/eval_harness.py's command line."""

import json
import os
import subprocess
import sys

import pytest

from train_utils import REPO

lm_eval = pytest.importorskip("lm_eval")  # the eval extra (also in the test extra: CI fails on a skip)

TASKS = {
    "t_mc": "output_type: multiple_choice\ndoc_to_text: '{{{{context}}}}'\ndoc_to_choice: '{{{{choices}}}}'\n"
    "doc_to_target: gold\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    "t_rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{{{text}}}}'\n"
    "metric_list:\n  - metric: word_perplexity\n",
    "t_gen": "output_type: generate_until\ndoc_to_text: '{{{{context}}}}'\ndoc_to_target: '{{{{choices[gold]}}}}'\n"
    "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
    "metric_list:\n  - metric: exact_match\n",
}


def _write_yaml(folder: str, eval_tasks: dict) -> None:
    for name, body in TASKS.items():
        data = eval_tasks["ppl" if name == "t_rolling" else "mc"]
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
            f.write(head + body.format())


def _samples(results: dict, task: str) -> list:
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_internlm_model_scores_as_hf_on_the_exported_checkpoint(single_eval_run, eval_tasks, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    hf_dir, out_dir, task_dir = (str(tmp_path / name) for name in ("hf", "out", "tasks"))
    os.makedirs(task_dir)
    _write_yaml(task_dir, eval_tasks)
    export = [sys.executable, os.path.join(REPO, "tools", "convert_to_hf.py")]
    subprocess.run([*export, "--checkpoint", single_eval_run, "--output", hf_dir], check=True, env=env, cwd=REPO)
    ours = [sys.executable, os.path.join(REPO, "tools", "eval_harness.py"), "--model", "internlm"]
    ours += ["--model_args", f"pretrained={single_eval_run},dtype=float32", "--tasks", ",".join(TASKS)]
    ours += ["--include_path", task_dir, "--device", "cpu", "--batch_size", "4", "--output_path", out_dir]
    proc = subprocess.run([*ours, "--log_samples"], env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|t_mc" in proc.stdout  # lm-eval's own score table
    found = [os.path.join(d, f) for d, _, fs in os.walk(out_dir) for f in fs if f.startswith("results")]
    with open(found[0]) as f:
        ours_results = json.load(f)["results"]

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    hf = simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf_dir},dtype=float32",
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=task_dir),
        device="cpu",
        batch_size=4,
        log_samples=True,
    )
    for metric in ("acc,none", "acc_norm,none"):
        assert ours_results["t_mc"][metric] == hf["results"]["t_mc"][metric], metric
    assert ours_results["t_rolling"]["word_perplexity,none"] == pytest.approx(
        hf["results"]["t_rolling"]["word_perplexity,none"], rel=1e-5
    )
    assert ours_results["t_gen"]["exact_match,none"] == hf["results"]["t_gen"]["exact_match,none"]

    # per request, from Python too: the same log-likelihoods and the same greedy generations
    import internlm.evaluation.harness  # noqa: F401  (registers "internlm")

    mine = simple_evaluate(
        model="internlm",
        model_args=f"pretrained={single_eval_run},dtype=float32",
        tasks=["t_mc", "t_gen"],
        task_manager=TaskManager(include_path=task_dir),
        device="cpu",
        batch_size=4,
        log_samples=True,
    )
    for a, b in zip(_samples(mine, "t_mc"), _samples(hf, "t_mc")):
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip((r[0] for r in a), (r[0] for r in b)):
            assert ll_a == pytest.approx(ll_b, rel=1e-5, abs=1e-5) and greedy_a == greedy_b
    assert _samples(mine, "t_gen") == _samples(hf, "t_gen")
