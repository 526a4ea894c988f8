"""A context rank's share of a packed micro-batch: the tokens `ContextShard.index` names, every tensor cut alike.

The loader packs a whole micro-batch on every context rank (they share a data rank, hence its data). With
``C = parallel.context`` ranks each keeps ``total / C`` of its ``total`` tokens (ring: zigzag chunks ``r`` and
``2C-1-r``; a2a: chunk ``r``)::

    input_ids[r]    = input_ids[index]
    labels[r]       = labels[index]          the loader's labels are already the next tokens: labels[t] = x[t+1]
                                             (IGNORE_INDEX at a document's end), so no target crosses ranks
    position_ids[r] = position_ids[index]    the loader's per-document positions of the global batch
    max_seqlen      = the global longest document (dynamic-NTK rope length and the kernels' bound)

The `ContextShard` (built once per micro-batch from the GLOBAL boundaries) replaces the `PackedDocs` as ``docs``:
the model hands it to every `ContextAttentionCore`, which knows where each local token sits in its document.
The loss is a sum over this rank's tokens; summed over the context group (with data and pipeline) it is the
one-process sum, and ``label_tokens`` / ``global_tokens`` stay those of the whole micro-batch.
"""

from __future__ import annotations

from typing import Any, Dict

from internlm.model import PackedDocs
from internlm.parallel.context.shard import ContextShard

_SPLIT_KEYS = ("input_ids", "labels", "position_ids", "span_ids")  # span_ids: evaluation's token -> scored span


def split_for_context(micro_batch: Dict[str, Any], docs: PackedDocs, pc: Any) -> Dict[str, Any]:
    """``micro_batch`` (device tensors of shape (1, total)) cut to context rank ``pc.cp_rank``'s tokens, with
    ``docs`` replaced by its `ContextShard`; unchanged when ``pc.cp_size == 1``."""
    if getattr(pc, "cp_size", 1) == 1:
        return dict(micro_batch, docs=docs)
    shard = ContextShard.build(docs, pc.cp_group, pc.layout.context_mode, pc.cp_size, pc.cp_rank)
    out = dict(micro_batch)
    index = shard.index.to(micro_batch["input_ids"].device)
    for key in _SPLIT_KEYS:
        if key not in micro_batch:
            continue
        tensor = micro_batch[key]
        out[key] = tensor.reshape(1, -1).index_select(1, index).reshape(*tensor.shape[:-1], -1)
    out["max_seqlen"] = docs.max_seqlen  # global: rope's dynamic-NTK length must not depend on the split
    out["docs"] = shard
    return out


__all__ = ["split_for_context"]
