"""The label convention every package shares: ``IGNORE_INDEX`` marks a token that takes no loss.

The data pipeline writes it (the last token of every document, padding sequences), the kernels and the
vocab-parallel loss skip it, the model's ``labels=`` call and the trainer count tokens by it. It is -100, the
``ignore_index`` default of ``torch.nn.functional.cross_entropy`` and of transformers' causal LMs, so labels
written here mean the same there. A module of its own so that ``internlm.data`` (numpy only) and
``internlm.kernels`` (torch only) read it without importing each other.
"""

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX"]
