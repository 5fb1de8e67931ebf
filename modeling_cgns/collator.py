"""Batch collation for pretraining: examples with an image and a sentence list -> model inputs."""
from typing import Any, Dict, List, Optional

import torch
from transformers import BatchFeature

from .cluster_metrics import UNKNOWN, meaning_id, meaning_topic
from .processing_cgns import CGNSProcessor


class CGNSPretrainingCollator:
    """Turns ``{"image": PIL/array, "sentences": [str, ...]}`` examples into a CGNSModel batch.

    Images are transformed here (random crop when ``train``), so the work runs in DataLoader workers
    and nothing augmented is ever cached. Text is padded to the longest report in the batch (at most
    ``processor.max_length`` word pieces).
    """

    def __init__(self, processor: CGNSProcessor, train: bool = True, padding="longest",
                 max_length: Optional[int] = None, label_meanings: bool = False):
        self.processor = processor
        self.train = train
        self.padding = padding
        # examples without a sentence_meanings column get the sentence labeller's (docs/labeller.md), so the
        # clustering can be scored on real reports too (about 0.1 ms a sentence)
        self.label_meanings = label_meanings
        self.max_length = max_length

    def __call__(self, examples: List[Dict[str, Any]]) -> BatchFeature:
        missing = [k for k in ("image", "sentences") if k not in examples[0]]
        if missing:
            raise KeyError(f"pretraining examples need the columns 'image' and 'sentences'; missing {missing}")
        batch = self.processor(images=[ex["image"] for ex in examples],
                               sentences=[list(ex["sentences"]) for ex in examples],
                               train=self.train, padding=self.padding, max_length=self.max_length)
        batch["pixel_values"] = batch["pixel_values"].to(torch.float32)
        if MEANINGS_COLUMN in examples[0]:
            batch.update(sentence_meaning_tensors(examples))
        elif self.label_meanings:
            from .labeller import sentence_meanings

            batch.update(sentence_meaning_tensors(
                [{"sentences": ex["sentences"], MEANINGS_COLUMN: sentence_meanings(list(ex["sentences"]))}
                 for ex in examples]))
        return batch


MEANINGS_COLUMN = "sentence_meanings"
MEANING_KEYS = ("sentence_meaning_ids", "sentence_topic_ids")


def sentence_meaning_tensors(examples: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """``sentence_meaning_ids`` and ``sentence_topic_ids`` (B, S), -1 padded: the ids (``cluster_metrics.meaning_id``)
    of each sentence's meaning and topic, in the order the processor numbers the sentences (blank sentences
    are skipped there, so here too). Not model inputs: the training loop takes them out of the batch to score
    the clustering (docs/clustering.md)."""
    rows = []
    for ex in examples:
        meanings = list(ex.get(MEANINGS_COLUMN) or [])
        sentences = list(ex["sentences"])
        if len(meanings) != len(sentences):
            raise ValueError(f"an example has {len(sentences)} sentences but {len(meanings)} sentence meanings")
        rows.append([m for s, m in zip(sentences, meanings) if s.strip()])
    width = max([len(r) for r in rows] + [1])
    ids = torch.full((len(rows), width), UNKNOWN, dtype=torch.long)
    topics = torch.full((len(rows), width), UNKNOWN, dtype=torch.long)
    for b, row in enumerate(rows):
        for s, meaning in enumerate(row):
            ids[b, s] = meaning_id(meaning)
            topics[b, s] = meaning_id(meaning_topic(meaning))
    return {"sentence_meaning_ids": ids, "sentence_topic_ids": topics}


def pop_sentence_meanings(batch) -> Optional[Dict[str, torch.Tensor]]:
    """Takes the meaning tensors out of a collated batch (so it can go to the model); ``None`` if it has none."""
    if MEANING_KEYS[0] not in batch:
        return None
    return {key: batch.pop(key) for key in MEANING_KEYS}


def flat_sentence_meanings(meanings: Dict[str, torch.Tensor], sentence_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The (B, S) meaning tensors flattened like ``CGNSOutput.text_sentence_features`` (the valid sentences of
    ``sentence_mask`` (B, S'), in batch order; sentences cut by truncation are not in S')."""
    out = {}
    for key, value in meanings.items():
        value = value.to(sentence_mask.device)
        width = sentence_mask.shape[1]
        if value.shape[1] < width:
            value = torch.cat([value, value.new_full((value.shape[0], width - value.shape[1]), UNKNOWN)], dim=1)
        out[key] = value[:, :width][sentence_mask]
    return out


__all__ = ["CGNSPretrainingCollator", "MEANINGS_COLUMN", "MEANING_KEYS", "sentence_meaning_tensors",
           "pop_sentence_meanings", "flat_sentence_meanings"]
