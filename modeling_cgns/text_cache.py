"""Compute a frozen text tower once per distinct report (``--cache_text_features``).

With the whole text tower frozen (``--freeze_text_layers -1``, ConVIRT/LiT-style) its output for a
report never changes, yet a training step would run it again every epoch; on a CPU that is most of a
step of the demo (MiniLM over ~95 tokens x 32 reports: about 1.4 s of a 3.5 s step, measured in
BENCHMARKS.md). :class:`FrozenTextFeatureCache` replaces the tower's ``forward`` (an instance
attribute, so the module tree, its ``state_dict`` and ``save_pretrained`` are untouched) by one that
looks each row up by its token ids and runs the real tower only on rows it has not seen.

Exactness: the cached tower runs in eval mode (no dropout), and a row is computed at a width set by its
own length only (the next multiple of :data:`CANONICAL_MULTIPLE` above it, its tokens first, as the
processor's right padding puts them): how far the batch it first appeared in was padded changes the
float result in the last bits (attention sums over the padded width), so without this a row's value
would depend on which batch saw it first, and a resumed run, whose first sightings differ, would not
repeat an uninterrupted one. Padding positions, which CGNS never reads (``segment_mean`` and the
sentence masks drop them), are returned as zeros. Keys are the unpadded token ids and the token type
ids, so a report truncated differently is a different entry. Calls that ask for hidden states or
attentions bypass the cache. Memory is ``rows x tokens x hidden x 4`` bytes (the demo: ~0.1 GB);
this is meant for datasets whose reports fit in memory, not MIMIC-CXR's 200k reports.
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput


#: rows are computed at the next multiple of this many tokens above their length (see the module docstring)
CANONICAL_MULTIPLE = 32


class FrozenTextFeatureCache:
    """Per-report cache of a frozen text tower's last hidden state (see the module docstring)."""

    def __init__(self, tower: nn.Module):
        trainable = [name for name, p in tower.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"the text feature cache needs a fully frozen text tower (--freeze_text_layers -1); "
                             f"{len(trainable)} parameters still train, e.g. {trainable[0]}")
        self.tower = tower
        self.entries: Dict[Tuple[bytes, bytes], torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self._original_forward = None

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> "FrozenTextFeatureCache":
        if self._original_forward is not None:
            return self
        self._original_forward = self.tower.forward
        self.tower.forward = self._forward  # instance attribute: nn.Module.__call__ dispatches to it
        return self

    def detach(self) -> None:
        if self._original_forward is not None:
            del self.tower.forward
            self._original_forward = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.entries.values())

    def stats(self) -> Dict[str, float]:
        return {"rows": len(self.entries), "hits": self.hits, "misses": self.misses,
                "megabytes": self.nbytes / 2 ** 20}

    # ------------------------------------------------------------------ the cached forward
    def _forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                 token_type_ids: Optional[torch.Tensor] = None, output_hidden_states: Optional[bool] = None,
                 output_attentions: Optional[bool] = None, **kwargs):
        if output_hidden_states or output_attentions or kwargs.get("inputs_embeds") is not None \
                or input_ids is None or attention_mask is None:
            return self._original_forward(input_ids=input_ids, attention_mask=attention_mask,
                                          token_type_ids=token_type_ids, output_hidden_states=output_hidden_states,
                                          output_attentions=output_attentions, **kwargs)
        batch, length = input_ids.shape
        valid = attention_mask.detach().bool()
        valid_cpu = valid.cpu()
        ids_cpu = input_ids.detach().cpu()
        types_cpu = token_type_ids.detach().cpu() if token_type_ids is not None else None
        keys = []
        for row in range(batch):
            ids = ids_cpu[row][valid_cpu[row]]
            types = types_cpu[row][valid_cpu[row]] if types_cpu is not None else ids[:0]
            keys.append((ids.numpy().tobytes(), types.numpy().tobytes()))
        missing = [row for row, key in enumerate(keys) if key not in self.entries]
        self.hits += batch - len(missing)
        self.misses += len(missing)
        if missing:
            lengths = valid_cpu.sum(dim=1).tolist()
            was_training = self.tower.training
            self.tower.eval()
            try:
                with torch.no_grad():
                    for chunk in self._canonical_chunks(missing, lengths):
                        self._compute(chunk, lengths, keys, input_ids, attention_mask, token_type_ids, valid)
            finally:
                self.tower.train(was_training)
        # boolean indexing visits the valid tokens row by row, the order the entries are concatenated in
        rows = torch.cat([self.entries[key] for key in keys])
        dtype = next(self.tower.parameters()).dtype
        last = torch.zeros(batch, length, rows.shape[-1], dtype=dtype, device=input_ids.device)
        last[valid] = rows.to(last.device, dtype)
        return BaseModelOutput(last_hidden_state=last)

    def canonical_width(self, length: int) -> int:
        """The width a row of ``length`` tokens is computed at: strictly wider, so that every computed row
        has padding (a batch without any may take another attention path), capped at the tower's positions."""
        width = (length // CANONICAL_MULTIPLE + 1) * CANONICAL_MULTIPLE
        limit = getattr(getattr(self.tower, "config", None), "max_position_embeddings", None)
        return min(width, limit) if isinstance(limit, int) else width

    def _canonical_chunks(self, rows: List[int], lengths: List[int]) -> List[Tuple[int, List[int]]]:
        """(width, rows) batches of the missing rows; a row as long as its (capped) width runs alone."""
        groups: Dict[int, List[int]] = {}
        for row in rows:
            groups.setdefault(self.canonical_width(int(lengths[row])), []).append(row)
        chunks = []
        for width, members in sorted(groups.items()):
            if any(lengths[row] >= width for row in members):
                chunks.extend((width, [row]) for row in members)
            else:
                chunks.append((width, members))
        return chunks

    def _compute(self, chunk: Tuple[int, List[int]], lengths: List[int], keys, input_ids, attention_mask,
                 token_type_ids, valid) -> None:
        width, rows = chunk
        ids = input_ids.new_zeros(len(rows), width)
        mask = attention_mask.new_zeros(len(rows), width)
        types = token_type_ids.new_zeros(len(rows), width) if token_type_ids is not None else None
        for j, row in enumerate(rows):
            n = int(lengths[row])
            ids[j, :n] = input_ids[row][valid[row]]
            mask[j, :n] = 1
            if types is not None:
                types[j, :n] = token_type_ids[row][valid[row]]
        out = self._original_forward(input_ids=ids, attention_mask=mask, token_type_ids=types)
        for j, row in enumerate(rows):
            n = int(lengths[row])
            self.entries[keys[row]] = out.last_hidden_state[j, :n].detach().to("cpu", torch.float32)
