"""Shared pieces of the encoder-only protocols (retrieval, zero-shot, grounding, visualize).

Load a CGNS export with its processor, pick a split, run the towers once over a split in batches
and cache the embeddings in a safetensors file whose name is a hash of everything they depend on
(the model's files, the data's fingerprint, the split and the preprocessing).
"""
import hashlib
import json
import logging
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from modeling_cgns import CGNSModel, CGNSProcessor
from modeling_cgns.modeling_cgns import ATTENTION_DIRECTIONS, DEFAULT_ATTENTION_DIRECTION
from .specs import EncoderEvaluationArguments

logger = logging.getLogger("downstream")

#: The file every export's weights are in (transformers 5 always writes safetensors).
WEIGHTS_FILE = "model.safetensors"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model_and_processor(model_name_or_path: str, device: Optional[torch.device] = None
                             ) -> Tuple[CGNSModel, CGNSProcessor]:
    """A CGNS export in eval mode on ``device`` and the processor saved beside it.

    The encoder-only protocols tokenise text, so the export must hold its tokenizer
    (``CGNSProcessor.save_pretrained``, as ``train_pretrain.py`` writes it); its absence is a
    one-line error, not a crash inside the tokenizer.
    """
    try:
        processor = CGNSProcessor.from_pretrained(model_name_or_path)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{model_name_or_path}: no CGNS processor (image processor + tokenizer) saved with the "
                         f"model; save one with CGNSProcessor(...).save_pretrained(path) ({error})") from error
    model = CGNSModel.from_pretrained(model_name_or_path)
    model.to(device or default_device()).eval()
    return model, processor


def pick_split(dataset_dict, split: Optional[str]) -> str:
    """``split`` if given (it must exist), else ``test`` when present, else ``validation``."""
    if split is not None:
        if split not in dataset_dict:
            raise ValueError(f"the dataset has no split {split!r}; it has {sorted(dataset_dict)}")
        return split
    for name in ("test", "validation"):
        if name in dataset_dict:
            return name
    raise ValueError(f"the dataset has neither a test nor a validation split (it has {sorted(dataset_dict)}); "
                     f"name one with --split")


def require_columns(split, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in split.features]
    if missing:
        raise ValueError(f"{what} needs the column(s) {missing}; the split has {sorted(split.features)}")


def require_dataset(args, task: str) -> None:
    if not args.dataset:
        raise ValueError(f"--task {task} needs --dataset")


def model_identity(model_name_or_path: str) -> Dict:
    """What the embeddings of a model depend on, cheaply: for a local folder its absolute path and
    the size and modification time of the weights and config (a retrained export gets new
    embeddings), for a hub id the id."""
    if not os.path.isdir(model_name_or_path):
        return {"model": model_name_or_path}
    identity = {"model": os.path.abspath(model_name_or_path)}
    for name in (WEIGHTS_FILE, "config.json"):
        path = os.path.join(model_name_or_path, name)
        if os.path.exists(path):
            stat = os.stat(path)
            identity[name] = [stat.st_size, stat.st_mtime_ns]
    return identity


def cache_subdir(args, override_field: str, name: str) -> str:
    """``args.<override_field>`` when set, else ``<cache_dir or ~/.cache/cgns>/<name>``."""
    if getattr(args, override_field):
        return getattr(args, override_field)
    root = args.cache_dir if args.cache_dir else os.path.join(os.path.expanduser("~"), ".cache",
                                                                                  "cgns")
    return os.path.join(root, name)


def embedding_cache_dir(args) -> str:
    """Where the encoder-only protocols cache embeddings (``--embedding_cache_dir`` or ``<cache>/embeddings``)."""
    return cache_subdir(args, "embedding_cache_dir", "embeddings")


def cache_key(**parts) -> str:
    """A short stable hash of JSON-serialisable ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_tensors(path: Optional[str], compute, description: str) -> Dict[str, torch.Tensor]:
    """``compute()`` -> dict of tensors, stored at ``path`` (safetensors) and read back on the next call.

    ``path=None`` disables the cache. A cache file that cannot be read is recomputed (and said so).
    """
    if path is not None and os.path.exists(path):
        try:
            tensors = load_file(path)
            logger.info("%s: read from the cache %s", description, path)
            return tensors
        except Exception as error:  # a truncated or foreign file: recompute rather than fail
            logger.warning("%s: cache file %s unreadable (%s); recomputing", description, path, error)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in compute().items()}
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.partial"   # per process: two runs may fill one cache at once
        save_file(tensors, temporary)
        os.replace(temporary, path)           # atomic: a killed run never leaves half a cache file
        logger.info("%s: cached in %s", description, path)
    return tensors


def batches(items: Sequence, batch_size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def image_batch(processor: CGNSProcessor, images: Sequence, device) -> torch.Tensor:
    """Evaluation transform (centre crop) of a list of images -> (B, 3, S, S) float32 on ``device``."""
    pixel_values = processor.image_processor.preprocess(list(images), train=False)["pixel_values"]
    return torch.as_tensor(pixel_values).to(device=device, dtype=torch.float32)


def text_batch(processor: CGNSProcessor, sentence_lists: Sequence[Sequence[str]], device) -> Dict[str, torch.Tensor]:
    """Lists of sentences -> ``input_ids``, ``attention_mask``, (``token_type_ids``), ``sentence_index`` on ``device``."""
    encoded = processor(sentences=[list(s) for s in sentence_lists])
    return {k: v.to(device) for k, v in encoded.items()}


def image_chunks(images, batch_size: int) -> Iterable[List]:
    """Lists of at most ``batch_size`` images from a list, or from a ``datasets.Dataset`` with an
    ``image`` column (decoded one batch at a time, so a large split never sits in memory decoded)."""
    if hasattr(images, "iter") and hasattr(images, "features"):
        for batch in images.select_columns(["image"]).iter(batch_size=batch_size):
            yield batch["image"]
    else:
        yield from (list(chunk) for chunk in batches(images, batch_size))


@torch.no_grad()
def encode_images(model: CGNSModel, processor: CGNSProcessor, images, batch_size: int = 64,
                  quiet: bool = False, desc: str = "images") -> torch.Tensor:
    """``get_image_features(...).pooler_output`` of every image (a list, or a Dataset with an ``image`` column), in
    batches: (N, D) on the CPU."""
    device = next(model.parameters()).device
    total = -(-len(images) // batch_size)
    out = [model.get_image_features(image_batch(processor, chunk, device)).pooler_output.float().cpu()
           for chunk in tqdm(image_chunks(images, batch_size), total=total, desc=desc, disable=quiet)]
    return torch.cat(out) if out else torch.zeros(0, model.config.projection_dim)


@torch.no_grad()
def encode_reports(model: CGNSModel, processor: CGNSProcessor, sentence_lists: Sequence[Sequence[str]],
                   batch_size: int = 64, quiet: bool = False, desc: str = "reports") -> torch.Tensor:
    """``get_text_features(...).pooler_output`` of every report given as its sentence list, in batches: (N, D) on
    the CPU."""
    device = next(model.parameters()).device
    out = [model.get_text_features(**text_batch(processor, chunk, device)).pooler_output.float().cpu()
           for chunk in tqdm(list(batches(sentence_lists, batch_size)), desc=desc, disable=quiet)]
    return torch.cat(out) if out else torch.zeros(0, model.config.projection_dim)


def report_sentences(row: Dict) -> List[str]:
    """The sentence list of a dataset row: its ``sentences`` column, else ``report`` split here."""
    if "sentences" in row and row["sentences"] is not None:
        return [s for s in row["sentences"] if s and s.strip()]
    return CGNSProcessor.split_report(row.get("report"))



__all__ = [
    "load_model_and_processor", "pick_split", "require_columns", "require_dataset", "model_identity",
    "cache_subdir", "embedding_cache_dir", "cache_key", "cached_tensors", "batches", "image_chunks", "image_batch",
    "text_batch", "encode_images",
    "encode_reports", "report_sentences", "default_device", "EncoderEvaluationArguments", "WEIGHTS_FILE",
]
