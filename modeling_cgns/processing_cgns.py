"""CGNSProcessor = CGNSImageProcessor (chest X-ray pixels) + a BERT-family tokenizer + report sentences.

Image pipeline (docs/method.md C, D.3): any grayscale/RGB input (PIL, uint8/uint16/float arrays, a file
path, an http(s) URL or a base64 string as HF pipelines take them; MONOCHROME1 inverted on request)
-> intensities to [0, 1] -> resize so the longest side is
``resize_size`` (area-style antialiasing) -> zero-pad to a centred square -> crop ``image_size``
(random in training, centre in evaluation) -> normalise with mean/std 0.5 -> 3 channels.

Text pipeline: report -> sentences (``sentences.split_sentences``) -> one tokenisation of the joined
sentences with character offsets -> ``sentence_index`` (B, L): the sentence id (0-based) of every real
word piece; -1 on [CLS], [SEP], padding and on anything truncated away (G.24 cannot happen: special
tokens are never assigned to a sentence).
"""
import os
import re
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, BatchFeature, PretrainedConfig
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

from .configuration_cgns import CGNSConfig
from .sentences import report_text, split_sentences

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, str, "os.PathLike"]


_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


def _offline() -> bool:
    from huggingface_hub.constants import is_offline_mode

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return is_offline_mode() or env in ("1", "ON", "YES", "TRUE")


def load_image_source(source: Union[str, "os.PathLike"], timeout: Optional[float] = 10.0) -> Image.Image:
    """What HF image processors and pipelines accept as a string -> PIL image.

    A local file is opened with Pillow in its own mode (EXIF orientation applied, as
    ``transformers.image_utils.load_image`` does), so a 16-bit PNG keeps its 16 bits: that loader
    converts everything to 8-bit RGB. An ``http(s)://`` URL, a base64 string or a ``data:image/``
    URI goes through ``load_image``; a URL in offline mode (``HF_HUB_OFFLINE`` /
    ``TRANSFORMERS_OFFLINE``) is refused with a message saying so. Errors name the source.
    """
    from PIL import ImageOps
    from transformers.image_utils import load_image

    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        if _offline():
            raise ValueError(f"image URL {text} cannot be fetched in offline mode (HF_HUB_OFFLINE / "
                             f"TRANSFORMERS_OFFLINE is set): download it and pass the local path")
        try:
            return load_image(text, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - network and decoder errors alike: say which image
            raise ValueError(f"cannot load image URL {text}: {type(exc).__name__}: {exc}") from exc
    if os.path.isfile(text):
        try:
            with Image.open(text) as im:
                im.load()
                return ImageOps.exif_transpose(im)
        except Exception as exc:  # noqa: BLE001
            hint = " (DICOM: read it with data_scripts.dicom.read_dicom)" if text.lower().endswith(".dcm") else ""
            raise ValueError(f"cannot read image file {text}{hint}: {type(exc).__name__}: {exc}") from exc
    if text.startswith("data:image/") or (len(text) >= 64 and _BASE64.fullmatch(text[:4096])):
        try:
            return load_image(text)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"cannot decode the base64 image string ({len(text)} characters): {exc}") from exc
    raise FileNotFoundError(f"image file not found: {text}")


def _describe(image) -> str:
    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        return text if len(text) <= 120 else f"{text[:60]}... ({len(text)} characters)"
    return type(image).__name__


def to_unit_range(image: ImageInput, photometric_interpretation: Optional[str] = None) -> torch.Tensor:
    """Any single image -> float32 (H, W) grayscale tensor in [0, 1].

    uint8 is divided by 255; 16-bit, other integer and float arrays are min-max scaled over the image
    (the DICOM convention of "scale by the range"); RGB is averaged to gray; MONOCHROME1 is inverted.
    A path, URL or base64 string is loaded first (``load_image_source``). An image with no pixels
    (a 0 side) is a ``ValueError``.
    """
    if isinstance(image, (str, os.PathLike)):
        image = load_image_source(image)
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            array = np.asarray(image).astype(np.float32)
            scaled = None
        else:
            array = np.asarray(image.convert("L"))
            scaled = array.astype(np.float32) / 255.0
    else:
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        scaled = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else None
    if array.size == 0:
        raise ValueError(f"empty image: array of shape {tuple(array.shape)}")
    if scaled is None:
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError("image contains NaN or infinite values")
        lo, hi = float(array.min()), float(array.max())
        scaled = (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
    if scaled.ndim == 3:
        if scaled.shape[-1] in (3, 4):
            scaled = scaled[..., :3].mean(axis=-1)
        elif scaled.shape[0] in (1, 3):
            scaled = scaled.mean(axis=0)
        else:
            raise ValueError(f"cannot interpret image of shape {scaled.shape} as grayscale or RGB")
    if scaled.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale or 3-D colour image, got shape {scaled.shape}")
    if scaled.size == 0:
        raise ValueError(f"empty image: {scaled.shape[0]} x {scaled.shape[1]} pixels")
    if photometric_interpretation is not None and photometric_interpretation.upper() == "MONOCHROME1":
        scaled = 1.0 - scaled
    return torch.from_numpy(np.ascontiguousarray(scaled))


def default_resize_size(image_size: int) -> int:
    """The protocol's resize before the crop: 256 for 224 (docs/method.md C), the same ratio for other sizes."""
    return round(image_size * 256 / 224)


class CGNSImageProcessor(BaseImageProcessor):
    r"""Chest X-ray image processor: longest side -> ``resize_size``, zero-pad square, crop ``image_size``.

    Args:
        image_size (`int`, 224): output side.
        resize_size (`int`, optional): longest side after resizing (before padding and cropping); default
            :func:`default_resize_size` of ``image_size`` (256 for 224).
        image_mean / image_std (`float`, 0.5 / 0.5): normalisation, giving [-1, 1] pixels.
        num_channels (`int`, 3): the gray image is replicated to this many channels.
    """

    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int = 224, resize_size: Optional[int] = None, image_mean: float = 0.5,
                 image_std: float = 0.5, num_channels: int = 3, **kwargs):
        super().__init__(**kwargs)
        if resize_size is None:
            resize_size = default_resize_size(image_size)
        if resize_size < image_size:
            raise ValueError(f"resize_size ({resize_size}) must be >= image_size ({image_size})")
        self.image_size = image_size
        self.resize_size = resize_size
        self.image_mean = image_mean
        self.image_std = image_std
        self.num_channels = num_channels

    def transform(self, image: ImageInput, train: bool = False, photometric_interpretation: Optional[str] = None,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One image -> (num_channels, image_size, image_size) float tensor."""
        gray = to_unit_range(image, photometric_interpretation)
        h, w = gray.shape
        scale = self.resize_size / max(h, w)
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
        if (new_h, new_w) == (h, w):    # stored at resize_size already (data_scripts max_size): identity
            resized = gray
        else:
            resized = F.interpolate(gray[None, None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                                    antialias=True)[0, 0].clamp_(0.0, 1.0)
        canvas = gray.new_zeros(self.resize_size, self.resize_size)
        top, left = (self.resize_size - new_h) // 2, (self.resize_size - new_w) // 2
        canvas[top:top + new_h, left:left + new_w] = resized
        margin = self.resize_size - self.image_size
        if train and margin > 0:
            top, left = (int(v) for v in torch.randint(margin + 1, (2,), generator=generator))
        else:
            top = left = margin // 2
        crop = canvas[top:top + self.image_size, left:left + self.image_size]
        crop = (crop - self.image_mean) / self.image_std
        return crop.unsqueeze(0).expand(self.num_channels, -1, -1).contiguous()

    def preprocess(self, images, train: bool = False, photometric_interpretation=None, return_tensors="pt",
                   **kwargs) -> BatchFeature:
        if not isinstance(images, (list, tuple)):
            images = [images]
        if isinstance(photometric_interpretation, (list, tuple)):
            interpretations = list(photometric_interpretation)
        else:
            interpretations = [photometric_interpretation] * len(images)
        if len(interpretations) != len(images):
            raise ValueError(f"{len(interpretations)} photometric interpretations for {len(images)} images")
        pixel_values = []
        for i, (im, pi) in enumerate(zip(images, interpretations)):
            try:
                pixel_values.append(self.transform(im, train, pi))
            except (ValueError, OSError) as exc:  # say which image of the batch, by name where it has one
                raise type(exc)(f"image {i} of {len(images)} ({_describe(im)}): {exc}") from exc
        return BatchFeature({"pixel_values": torch.stack(pixel_values)}, tensor_type=None)


class CGNSProcessor(ProcessorMixin):
    r"""Image processor + tokenizer + report-to-sentence logic for :class:`CGNSModel`.

    ``processor(images=..., text=...)`` where ``text`` is a report string (or a list of them), or
    ``sentences=`` lists of already split sentences. Returns ``pixel_values``, ``input_ids``,
    ``attention_mask`` (and ``token_type_ids``), ``sentence_index``. Without an ``image_processor``
    the default :class:`CGNSImageProcessor` (224 px crops of 256 px resizes) is used.
    """

    attributes = ["image_processor", "tokenizer"]
    # The tokenizer is saved in this subfolder, not beside processor_config.json: without
    # ``import modeling_cgns``, ``AutoProcessor`` would otherwise fall back to returning the bare
    # tokenizer, which silently drops the images. With the subfolder it fails loudly instead.
    tokenizer_subfolder = "tokenizer"

    def __init__(self, image_processor=None, tokenizer=None, max_length: int = 256, **kwargs):
        self.max_length = max_length
        if image_processor is None:
            image_processor = CGNSImageProcessor()
        super().__init__(image_processor, tokenizer, **kwargs)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """``ProcessorMixin.save_pretrained`` with the tokenizer files in ``tokenizer/`` (see ``tokenizer_subfolder``)."""
        if push_to_hub:
            from huggingface_hub import create_repo

            commit_message = kwargs.pop("commit_message", None)
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(str(save_directory))))
            token = kwargs.get("token")
            repo_id = create_repo(repo_id, exist_ok=True, token=token, private=kwargs.get("private")).repo_id
            files_timestamps = self._get_files_timestamps(save_directory) if os.path.isdir(save_directory) else {}
        saved = super().save_pretrained(save_directory, **kwargs)
        tokenizer_files = self.tokenizer.save_pretrained(os.path.join(save_directory, self.tokenizer_subfolder))
        for path in tokenizer_files:
            top_level = os.path.join(save_directory, os.path.basename(path))
            if os.path.isfile(top_level):
                os.remove(top_level)
        if push_to_hub:
            self._upload_modified_files(save_directory, repo_id, files_timestamps, commit_message=commit_message,
                                        token=token)
        return saved

    @classmethod
    def _load_tokenizer_from_pretrained(cls, sub_processor_type, pretrained_model_name_or_path, subfolder="",
                                        **kwargs):
        tokenizer_subfolder = os.path.join(subfolder, cls.tokenizer_subfolder) if subfolder else cls.tokenizer_subfolder
        try:
            # The subfolder has no config.json: a blank config stops AutoTokenizer looking for one there (which,
            # for a Hub repo id, fails), so tokenizer_config.json alone names the class.
            return super()._load_tokenizer_from_pretrained(sub_processor_type, pretrained_model_name_or_path,
                                                           subfolder=tokenizer_subfolder,
                                                           **{"config": PretrainedConfig(), **kwargs})
        except (OSError, ValueError):
            # exports written before the tokenizer moved to its subfolder
            return super()._load_tokenizer_from_pretrained(sub_processor_type, pretrained_model_name_or_path,
                                                           subfolder=subfolder, **kwargs)

    @staticmethod
    def split_report(report: Optional[str], max_tokens: Optional[int] = None) -> List[str]:
        """The report's sentences; with ``max_tokens``, only as many as a tokenizer truncating there
        can see (``split_sentences``): a long report is cut before the expensive work."""
        return split_sentences(report, max_tokens=max_tokens)

    @staticmethod
    def split_sections(impression: Optional[str], findings: Optional[str]) -> List[str]:
        return split_sentences(report_text(impression, findings))

    def tokenize_sentences(self, batch_sentences: Sequence[Sequence[str]], padding: Union[bool, str] = "longest",
                           max_length: Optional[int] = None) -> BatchFeature:
        """Lists of sentences -> input_ids, attention_mask, (token_type_ids), sentence_index; all (B, L)."""
        max_length = max_length or self.max_length
        texts, spans = [], []
        for sentences in batch_sentences:
            pieces, bounds, pos = [], [], 0
            # every whitespace-separated word is at least one word piece: words past max_length in
            # all are truncated away anyway, so they are never handed to the tokenizer
            budget = max_length
            for sentence in sentences:
                if budget <= 0:
                    break
                sentence = sentence.strip()
                if not sentence:
                    continue
                words = sentence.split(None, budget)
                if len(words) > budget:
                    sentence = sentence[:len(sentence) - len(words[-1])].rstrip()
                budget -= min(len(words), budget)
                if pieces:
                    pos += 1
                bounds.append((pos, pos + len(sentence)))
                pieces.append(sentence)
                pos += len(sentence)
            texts.append(" ".join(pieces))
            spans.append(bounds)
        encoded = self.tokenizer(texts, padding=padding, truncation=True, max_length=max_length,
                                 return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt")
        offsets = encoded.pop("offset_mapping")
        special = encoded.pop("special_tokens_mask").bool()
        sentence_index = torch.full_like(encoded["input_ids"], -1)
        for row, bounds in enumerate(spans):
            if not bounds:
                continue
            starts = torch.tensor([b[0] for b in bounds])
            token_start = offsets[row, :, 0].contiguous()
            # a token belongs to the last sentence that starts at or before its first character
            ids = torch.searchsorted(starts, token_start, right=True) - 1
            sentence_index[row] = ids.clamp(min=0)
        real = encoded["attention_mask"].bool() & ~special & (offsets[..., 1] > offsets[..., 0])
        encoded["sentence_index"] = sentence_index.masked_fill(~real, -1)
        return encoded

    def __call__(self, images=None, text=None, sentences=None, train: bool = False, padding="longest",
                 max_length: Optional[int] = None, photometric_interpretation=None, **kwargs) -> BatchFeature:
        if images is None and text is None and sentences is None:
            raise ValueError("give images, text (reports) or sentences")
        if text is not None and sentences is not None:
            raise ValueError("give either text (reports, split here) or sentences (already split), not both")
        data = {}
        if text is not None:
            reports = [text] if isinstance(text, str) else list(text)
            sentences = [self.split_report(r, max_length or self.max_length) for r in reports]
        if sentences is not None:
            if sentences and isinstance(sentences[0], str):
                sentences = [sentences]
            data.update(self.tokenize_sentences(sentences, padding=padding, max_length=max_length))
        if images is not None:
            data.update(self.image_processor.preprocess(images, train=train,
                                                        photometric_interpretation=photometric_interpretation))
        return BatchFeature(data)

    @property
    def model_input_names(self):
        return ["pixel_values", "input_ids", "attention_mask", "token_type_ids", "sentence_index"]


# the loading options of ``AutoTokenizer.from_pretrained`` that reach the processor (the rest are its own)
_HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "token", "revision")


class CGNSReportTokenizer:
    r"""The text side of :class:`CGNSProcessor` behind the tokenizer interface.

    ``AutoTokenizer.from_pretrained(export)`` returns one (after ``import modeling_cgns``), so the pipelines
    that tokenize text themselves — ``pipeline("zero-shot-image-classification", model=export)`` — embed a
    candidate label's prompt exactly as ``processor(text=prompt)`` and ``cgns evaluate --task zero_shot`` do:
    each text is a report, cut into sentences by ``sentences.split_sentences`` (lower case, punctuation
    dropped, pieces of fewer than two words dropped), tokenized jointly, with ``sentence_index``. A text with
    no such sentence (a bare one-word label under ``hypothesis_template="{}"``) is refused with a reason:
    its embedding would be the same for every label. Any other attribute (``pad_token_id``, ``decode``,
    ``vocab_size``, ...) is the word-piece tokenizer's.
    """

    _loading = False     # CGNSProcessor.from_pretrained can fall back to AutoTokenizer, which lands here again

    def __init__(self, processor: CGNSProcessor):
        self.processor = processor

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "CGNSReportTokenizer":
        """The processor saved with a CGNS export (a folder or a Hub id) -> its report tokenizer."""
        missing = OSError(f"{pretrained_model_name_or_path}: no CGNSProcessor (processor_config.json + tokenizer/) "
                          f"saved with this CGNS export, so no tokenizer: save it beside the model with "
                          f"processor.save_pretrained(folder)")
        if cls._loading:
            raise missing
        cls._loading = True
        try:
            options = {k: kwargs[k] for k in _HUB_OPTIONS if k in kwargs}
            return cls(CGNSProcessor.from_pretrained(pretrained_model_name_or_path, **options))
        except OSError as error:
            raise missing from error
        finally:
            cls._loading = False

    def __call__(self, text: Union[str, Sequence[str]], padding: Union[bool, str] = "longest",
                 truncation: bool = True, max_length: Optional[int] = None, return_tensors: Optional[str] = "pt"
                 ) -> BatchFeature:
        """Reports -> ``input_ids``, ``attention_mask`` (, ``token_type_ids``), ``sentence_index``; all (B, L)."""
        if return_tensors not in ("pt", None):
            raise ValueError(f"CGNSReportTokenizer returns PyTorch tensors only, got return_tensors={return_tensors!r}")
        if not truncation:
            raise ValueError("CGNSReportTokenizer always truncates reports to the processor's max_length")
        texts = [text] if isinstance(text, str) else list(text)
        sentences = [self.processor.split_report(t) for t in texts]
        empty = [t for t, s in zip(texts, sentences) if not s]
        if empty:
            raise ValueError(f"{empty!r}: no sentence of at least two words after normalisation (lower case, "
                             f"punctuation dropped), so nothing for the report tower to embed; for zero-shot labels "
                             f"use a template with words around the label, e.g. hypothesis_template='There is {{}}.'")
        return BatchFeature(dict(self.processor.tokenize_sentences(sentences, padding=padding, max_length=max_length)))

    def save_pretrained(self, save_directory, **kwargs):
        """Saves the processor it belongs to (``processor_config.json`` + ``tokenizer/``)."""
        return self.processor.save_pretrained(save_directory, **kwargs)

    def __getattr__(self, name):
        if name == "processor":       # not set yet (copy / unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.processor.tokenizer, name)


# One implementation (torch tensor ops, no PIL- or torchvision-specific path) serves both backends transformers
# asks for; registered under "pil" only, every load with torchvision installed would ask for "torchvision" and
# log "Requested torchvision backend is not available. Falling back to pil backend."
AutoImageProcessor.register(CGNSConfig, image_processor_classes={"pil": CGNSImageProcessor,
                                                                 "torchvision": CGNSImageProcessor}, exist_ok=True)
AutoProcessor.register(CGNSConfig, CGNSProcessor, exist_ok=True)
AutoTokenizer.register(CGNSConfig, tokenizer_class=CGNSReportTokenizer, exist_ok=True)

__all__ = ["CGNSImageProcessor", "CGNSProcessor", "CGNSReportTokenizer", "default_resize_size", "load_image_source",
           "to_unit_range"]
