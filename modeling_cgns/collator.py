"""Batch collation for pretraining: examples with an image and a sentence list -> model inputs."""
from typing import Any, Dict, List, Optional

import torch
from transformers import BatchFeature

from .processing_cgns import CGNSProcessor


class CGNSPretrainingCollator:
    """Turns ``{"image": PIL/array, "sentences": [str, ...]}`` examples into a CGNSModel batch.

    Images are transformed here (random crop when ``train``), so the work runs in DataLoader workers
    and nothing augmented is ever cached. Text is padded to the longest report in the batch (at most
    ``processor.max_length`` word pieces).
    """

    def __init__(self, processor: CGNSProcessor, train: bool = True, padding="longest",
                 max_length: Optional[int] = None):
        self.processor = processor
        self.train = train
        self.padding = padding
        self.max_length = max_length

    def __call__(self, examples: List[Dict[str, Any]]) -> BatchFeature:
        missing = [k for k in ("image", "sentences") if k not in examples[0]]
        if missing:
            raise KeyError(f"pretraining examples need the columns 'image' and 'sentences'; missing {missing}")
        batch = self.processor(images=[ex["image"] for ex in examples],
                               sentences=[list(ex["sentences"]) for ex in examples],
                               train=self.train, padding=self.padding, max_length=self.max_length)
        batch["pixel_values"] = batch["pixel_values"].to(torch.float32)
        return batch


__all__ = ["CGNSPretrainingCollator"]
