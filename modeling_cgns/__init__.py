"""CGNS: cross-modal clustering-guided negative sampling for chest X-ray image-report pretraining.

Importing this package registers ``model_type="cgns"`` with transformers' Auto classes — ``AutoConfig``,
``AutoModel`` and ``AutoModelForZeroShotImageClassification`` (``CGNSModel``), ``AutoModelForImageClassification``
(the probe, see ``modeling_classification``), ``AutoProcessor``, ``AutoImageProcessor`` and ``AutoTokenizer``
(``processing_cgns``) — so ``pipeline("zero-shot-image-classification" | "image-feature-extraction" |
"image-classification", model=export)`` works on a CGNS export (docs/huggingface.md).
"""
from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

from .collator import CGNSPretrainingCollator
from .configuration_cgns import CGNSConfig
from .labeller import label_sentences, meaning_ids, sentence_meanings
from .modeling_cgns import CGNSModel, CGNSOutput, CGNSPreTrainedModel
from .modeling_classification import CGNSForImageClassification
from .modeling_detection import CGNSForObjectDetection
from .modeling_segmentation import CGNSForSemanticSegmentation
from .processing_cgns import CGNSImageProcessor, CGNSProcessor, CGNSReportTokenizer
from .trainer_callbacks import CGNSClusterCallback

AutoConfig.register("cgns", CGNSConfig, exist_ok=True)
AutoModel.register(CGNSConfig, CGNSModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(CGNSConfig, CGNSModel, exist_ok=True)

__all__ = ["CGNSConfig", "CGNSModel", "CGNSOutput", "CGNSPreTrainedModel", "CGNSImageProcessor", "CGNSProcessor",
           "CGNSReportTokenizer",
           "CGNSPretrainingCollator", "CGNSForImageClassification",
           "CGNSForSemanticSegmentation", "CGNSForObjectDetection", "CGNSClusterCallback",
           "label_sentences", "sentence_meanings", "meaning_ids"]
