"""Compute a frozen text tower once per distinct report (``--cache_text_features``).

With the whole text tower frozen (``--freeze_text_layers -1``, ConVIRT/LiT-style) its output for a
report never changes, yet a training step would run it again every epoch; on a CPU that is most of a
step of the demo (MiniLM over ~95 tokens x 32 reports: about 1.4 s of a 3.5 s step, measured in
BENCHMARKS.md). :class:`FrozenTextFeatureCache` replaces the tower's ``forward`` (an instance
attribute, so the module tree, its ``state_dict`` and ``save_pretrained`` are untouched) by one that
looks each row up by its token ids and runs the real tower only on rows it has not seen.

Exactness: the cached tower runs in eval mode (no dropout), so a cached and a recomputed row are the
same function of the tokens; padding positions, which CGNS never reads (``segment_mean`` and the
sentence masks drop them), are returned as zeros. Keys are the unpadded token ids and the token type
ids, so a report truncated differently is a different entry. Calls that ask for hidden states or
attentions bypass the cache. Memory is ``rows x tokens x hidden x 4`` bytes (the demo: ~0.1 GB);
this is meant for datasets whose reports fit in memory, not MIMIC-CXR's 200k reports.
"""
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput


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
            rows = torch.tensor(missing, device=input_ids.device)
            was_training = self.tower.training
            self.tower.eval()
            try:
                with torch.no_grad():
                    out = self._original_forward(
                        input_ids=input_ids[rows], attention_mask=attention_mask[rows],
                        token_type_ids=token_type_ids[rows] if token_type_ids is not None else None)
            finally:
                self.tower.train(was_training)
            for j, row in enumerate(missing):
                self.entries[keys[row]] = out.last_hidden_state[j][valid[row]].detach().to("cpu", torch.float32)
        # boolean indexing visits the valid tokens row by row, the order the entries are concatenated in
        rows = torch.cat([self.entries[key] for key in keys])
        dtype = next(self.tower.parameters()).dtype
        last = torch.zeros(batch, length, rows.shape[-1], dtype=dtype, device=input_ids.device)
        last[valid] = rows.to(last.device, dtype)
        return BaseModelOutput(last_hidden_state=last)
