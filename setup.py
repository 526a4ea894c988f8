from setuptools import find_packages, setup

with open("requirements.txt") as f:
    requirements = [line.strip() for line in f if line.strip() and not line.startswith("#")]

setup(
    name="internlm-train",
    version="0.1.0",
    description="Pretraining framework for InternLM models: tensor, pipeline and hybrid ZeRO parallelism, "
    "multi-phase training, exact resume",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["internlm", "internlm.*"]),
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={
        "flash": ["flash-attn>=2.3"],
        "plot": ["matplotlib"],
        # tools/tokenizer.py inputs beyond .txt/.jsonl: .jsonl.zst, .parquet/.arrow, saved Hugging Face datasets
        "data": ["pyarrow", "datasets", "zstandard"],
        # lm-evaluation-harness with the model class "internlm" (tools/eval_harness.py), accelerate for its hf model
        "eval": ["lm-eval>=0.4.13,<0.5", "accelerate"],
        "wandb": ["wandb"],  # monitor.wandb
        "test": [
            "pytest",
            "pytest-timeout",
            "ruff",
            "matplotlib",
            "transformers",
            "triton",
            "pyarrow",
            "datasets",
            "zstandard",
            "megatron-core",  # tests write Megatron indexed datasets with its own builder
            "lm-eval>=0.4.13,<0.5",
            "accelerate",
            "wandb",
        ],
    },
    py_modules=[],
    scripts=["train.py"],
)
