"""The prompts of the prompt-based protocols (zero-shot classification, grounding): reading and checking a
prompt file, and a prompt as the sentence list the text tower takes.

Prompt file: JSON ``{"<label name>": {"positive": [str, ...], "negative": [str, ...]}, ...}``; the default,
:data:`DEFAULT_PROMPTS`, ships with the package (``cgns/downstream/zero_shot_prompts.json``).
"""
import json
import os
from typing import Dict, List, Sequence

from modeling_cgns.sentences import split_sentences

DEFAULT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zero_shot_prompts.json")
POLARITIES = ("positive", "negative")


def load_prompts(path: str, label_names: Sequence[str]) -> Dict[str, Dict[str, List[str]]]:
    """Read and check a prompt file; returns ``{label: {"positive": [...], "negative": [...]}}`` for ``label_names``."""
    try:
        with open(path) as f:
            prompts = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"prompt file {path}: cannot read it as JSON ({error})") from error
    if not isinstance(prompts, dict):
        raise ValueError(f"prompt file {path}: expected an object {{label: {{positive: [...], negative: [...]}}}}")
    missing = [name for name in label_names if name not in prompts]
    if missing:
        raise ValueError(f"prompt file {path} has no prompts for {missing}; it has {sorted(prompts)}")
    checked = {}
    for name in label_names:
        entry = prompts[name]
        if not isinstance(entry, dict):
            raise ValueError(f"prompt file {path}: {name!r} must map to {{positive: [...], negative: [...]}}")
        checked[name] = {}
        for polarity in POLARITIES:
            texts = entry.get(polarity)
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise ValueError(f"prompt file {path}: {name!r}/{polarity} must be a non-empty list of non-empty "
                                 f"strings, got {texts!r}")
            checked[name][polarity] = texts
    return checked


def prompt_sentences(prompt: str) -> List[str]:
    """A prompt as the sentence list the text tower takes (the report sentence splitter)."""
    sentences = split_sentences(prompt)
    if not sentences:
        raise ValueError(f"prompt {prompt!r} has no sentence of at least two words after normalisation")
    return sentences


__all__ = ["DEFAULT_PROMPTS", "POLARITIES", "load_prompts", "prompt_sentences"]
