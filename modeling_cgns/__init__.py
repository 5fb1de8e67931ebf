"""CGNS: cross-modal clustering-guided negative sampling for chest X-ray image-report pretraining.

Importing this package registers ``model_type="cgns"`` with ``AutoConfig`` / ``AutoModel``.
"""
from transformers import AutoConfig, AutoModel

from .collator import CGNSPretrainingCollator
from .configuration_cgns import CGNSConfig
from .labeller import label_sentences, meaning_ids, sentence_meanings
from .modeling_cgns import CGNSModel, CGNSOutput, CGNSPreTrainedModel
from .modeling_classification import CGNSForImageClassification
from .modeling_detection import CGNSForObjectDetection
from .modeling_segmentation import CGNSForSemanticSegmentation
from .processing_cgns import CGNSImageProcessor, CGNSProcessor
from .trainer_callbacks import CGNSClusterCallback

AutoConfig.register("cgns", CGNSConfig, exist_ok=True)
AutoModel.register(CGNSConfig, CGNSModel, exist_ok=True)

__all__ = ["CGNSConfig", "CGNSModel", "CGNSOutput", "CGNSPreTrainedModel", "CGNSImageProcessor", "CGNSProcessor",
           "CGNSPretrainingCollator", "CGNSForImageClassification",
           "CGNSForSemanticSegmentation", "CGNSForObjectDetection", "CGNSClusterCallback",
           "label_sentences", "sentence_meanings", "meaning_ids"]
