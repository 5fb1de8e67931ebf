"""Segmentation protocol (docs/method.md E.3): CGNSForSemanticSegmentation, its loss and Dice, run_segmentation.

Tiny in-code towers (resnet18 / ViT-tiny at 64 px, small decoders) and the synthetic dataset at
64 px keep the file well under 90 s on two CPU cores.
"""
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForSemanticSegmentation, TrainingArguments  # noqa: E402

from cgns.downstream import cli as td  # noqa: E402
from cgns.downstream import segmentation as seg  # noqa: E402
from cgns.downstream.segmentation import SegmentationTrainer  # noqa: E402
from modeling_cgns import CGNSForSemanticSegmentation, CGNSModel  # noqa: E402
from modeling_cgns.modeling_segmentation import (  # noqa: E402
                                                 dice_per_image,
                                                 focal_loss,
                                                 segmentation_loss,
                                                 soft_dice,
                                                 )
from tiny import tiny_config  # noqa: E402

IMAGE_SIZE = 64
SMALL_UNET = [32, 16, 8, 8, 4]
SMALL_SETR = [16, 8, 8, 4]


def segmentation_config(arch: str = "resnet18", **overrides):
    return tiny_config(arch, image_size=IMAGE_SIZE, segmentation_decoder_channels=SMALL_UNET,
                       segmentation_setr_channels=SMALL_SETR, **overrides)


def random_batch(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    labels = (torch.rand(batch, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g) > 0.8).float()
    return pixel_values, labels


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A full CGNS export (CGNSModel.save_pretrained) with a resnet18 tower and a small U-Net config."""
    path = str(tmp_path_factory.mktemp("cgns_export"))
    torch.manual_seed(0)
    CGNSModel(segmentation_config()).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------- model

@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_patch16_224"])
def test_output_shapes_and_loss(arch):
    torch.manual_seed(0)
    model = CGNSForSemanticSegmentation(segmentation_config(arch))
    pixel_values, labels = random_batch()
    out = model(pixel_values=pixel_values)
    assert out.loss is None
    assert out.logits.shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE)
    out = model(pixel_values=pixel_values, labels=labels)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(not name.startswith("vision_model.") for name in trainable)
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.vision_model.parameters())
    assert model.config.vision_kind == ("grid" if arch == "resnet18" else "tokens")


def test_default_decoder_channels():
    config = tiny_config("resnet18", image_size=IMAGE_SIZE)
    model = CGNSForSemanticSegmentation(config)
    outs = [block.conv2[0].out_channels for block in model.decoder.blocks]
    assert outs == [256, 128, 64, 32, 16]
    # resnet18's skips (layer3, layer2, layer1, act1) feed the first four blocks; the fifth has none
    ins = [block.conv1[0].in_channels for block in model.decoder.blocks]
    assert ins == [512 + 256, 256 + 128, 128 + 64, 64 + 64, 32]


def test_only_decoder_trains_and_tower_stays_frozen():
    torch.manual_seed(0)
    model = CGNSForSemanticSegmentation(segmentation_config())
    tower_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    assert not model.vision_model.training and model.decoder.training
    for step in range(3):
        pixel_values, labels = random_batch(seed=step)
        model(pixel_values=pixel_values, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.vision_model.state_dict()
    # weights and BatchNorm running statistics (G.26 fixed: the tower stays in eval mode)
    assert any("running_mean" in k for k in tower_before)
    for key, value in tower_before.items():
        assert torch.equal(value, after[key]), key
    changed = [k for k, v in model.decoder.state_dict().items() if not torch.equal(v, decoder_before[k])]
    assert any("running_mean" in k for k in changed) and any(k.endswith("weight") for k in changed)


# ---------------------------------------------------------------------------------------------- loss, Dice

def test_loss_matches_a_loop_computation():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 3, 4, generator=g, dtype=torch.float64)
    targets = torch.rand(2, 1, 3, 4, generator=g, dtype=torch.float64).round()
    targets[0, 0, 0, 0] = 0.3  # a soft (area-resized) target value
    focal_terms, inter, p_sum, t_sum = [], 0.0, 0.0, 0.0
    for x, t in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        p = 1.0 / (1.0 + math.exp(-x))
        bce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        # sigmoid(-x (2t - 1)) ** 2: (1 - p)^2 for t = 1, p^2 for t = 0
        modulation = (1.0 / (1.0 + math.exp(x * (2 * t - 1)))) ** 2
        focal_terms.append(modulation * bce)
        inter, p_sum, t_sum = inter + p * t, p_sum + p, t_sum + t
    focal = sum(focal_terms) / len(focal_terms)
    dice = (2 * inter + 1) / (p_sum + t_sum + 1)
    assert focal_loss(logits, targets).item() == pytest.approx(focal, rel=1e-9)
    assert soft_dice(logits, targets).item() == pytest.approx(dice, rel=1e-9)
    expected = 10 * focal - math.log(dice)
    assert segmentation_loss(logits, targets).item() == pytest.approx(expected, rel=1e-9)
    model = CGNSForSemanticSegmentation(segmentation_config())
    out = model(pixel_values=random_batch()[0], labels=random_batch()[1])
    assert out.loss.item() == pytest.approx(segmentation_loss(out.logits, random_batch()[1]).item(), rel=1e-6)


def test_focal_loss_with_gamma_zero_is_bce():
    logits, targets = torch.randn(2, 1, 5, 5), (torch.rand(2, 1, 5, 5) > 0.5).float()
    assert focal_loss(logits, targets, gamma=0.0).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, targets).item(), rel=1e-6)


def test_dice_known_answers():
    truth = torch.zeros(5, 1, 4, 4)
    probs = torch.zeros(5, 1, 4, 4)
    truth[0, 0, :2] = 1.0
    probs[0, 0, :2] = 0.9                       # perfect -> 1
    # image 1: empty truth, empty prediction -> 1; image 2: empty truth, a predicted pixel -> 0
    probs[2, 0, 0, 0] = 0.7
    truth[3, 0, :2] = 1.0
    probs[3, 0, 1:3] = 0.8                      # half overlap: 2 * 4 / (8 + 8) = 0.5
    truth[4, 0, 0, :2] = 1.0                    # a missed lesion -> 0
    probs[4, 0, 0, :2] = 0.5                    # 0.5 is not > 0.5
    assert dice_per_image(probs, truth).tolist() == [1.0, 1.0, 0.0, 0.5, 0.0]
    # soft ground truth is binarised at 0.5
    soft_truth = torch.tensor([[0.6, 0.6, 0.4, 0.4]])
    assert dice_per_image(torch.ones(1, 4), soft_truth).item() == pytest.approx(2 / 3)


def test_dice_accumulator_reports_positive_images_and_the_empty_baseline():
    """An all-empty prediction scores the fraction of empty ground truths in "dice" and 0 on positives."""
    from transformers import EvalPrediction

    truth = torch.zeros(4, 1, 4, 4)
    truth[0, 0, :2] = 1.0                        # positive, predicted perfectly below
    truth[1, 0, 0, :2] = 1.0                     # positive, missed
    logits = torch.full((4, 1, 4, 4), -5.0)
    logits[0, 0, :2] = 5.0
    logits[3, 0, 0, 0] = 5.0                     # a false positive on an empty image
    accumulate = seg.DiceAccumulator()
    assert accumulate(EvalPrediction(logits[:2].numpy(), truth[:2].numpy()), compute_result=False) == {}
    result = accumulate(EvalPrediction(logits[2:].numpy(), truth[2:].numpy()), compute_result=True)
    assert result == {"dice": pytest.approx(0.5), "dice_positive": pytest.approx(0.5),
                      "dice_empty_prediction": pytest.approx(0.5), "num_positive": 2}
    empty = accumulate(EvalPrediction(torch.full_like(logits, -5.0).numpy(), truth.numpy()), compute_result=True)
    assert empty["dice"] == empty["dice_empty_prediction"] == 0.5 and empty["dice_positive"] == 0.0
    none_positive = accumulate(EvalPrediction(logits[2:].numpy(), truth[2:].numpy()), compute_result=True)
    assert none_positive["dice_positive"] == -1.0 and none_positive["num_positive"] == 0


def test_setr_upsampling_uses_align_corners_true_as_e3():
    """SETR-naive blocks upsample like E.3's nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)."""
    from modeling_cgns.modeling_segmentation import SETRNaiveDecoder

    torch.manual_seed(0)
    decoder = SETRNaiveDecoder(embed_dim=8, channels=[6, 4]).eval()
    tokens = torch.randn(2, 9, 8)
    with torch.no_grad():
        hidden = decoder.token_projection(tokens).transpose(1, 2).reshape(2, 8, 3, 3)
        upsample = torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        for block in decoder.blocks:
            hidden = upsample(block(hidden))
        torch.testing.assert_close(decoder(tokens, (3, 3)), hidden)


def mask_split(positive_flags):
    import datasets
    import numpy as np

    masks = []
    for flag in positive_flags:
        mask = np.zeros((8, 8), dtype=np.uint8)
        if flag:
            mask[2:4, 2:4] = 255
        masks.append(mask)
    return datasets.Dataset.from_dict({"mask": masks, "row": list(range(len(masks)))},
                                      features=datasets.Features({"mask": datasets.Image(),
                                                                  "row": datasets.Value("int32")}))


def test_balance_keeps_every_positive_and_as_many_negatives():
    flags = [False, True, False, False, True, False, False, True, False, False]
    split = mask_split(flags)
    assert seg.positive_images(split).tolist() == flags
    balanced = seg.balance_positives(split, seed=42)
    rows = balanced["row"]
    assert len(rows) == 6 and rows == sorted(rows)
    assert {1, 4, 7} <= set(rows)
    assert rows == seg.balance_positives(split, seed=42)["row"]           # deterministic
    # an already balanced split (or one with more positives) is unchanged, as SIIM's builder output
    assert seg.balance_positives(balanced, seed=42)["row"] == rows
    assert seg.balance_positives(mask_split([True, True, False]))["row"] == [0, 1, 2]
    with pytest.raises(ValueError, match="no_balance_train"):
        seg.balance_positives(mask_split([False, False]))


# ---------------------------------------------------------------------------------------------- loading

def test_from_cgns_export(export_dir, tmp_path):
    source = CGNSModel.from_pretrained(export_dir)
    model = CGNSForSemanticSegmentation.from_pretrained(export_dir)
    expected = source.vision_model.state_dict()
    for key, value in model.vision_model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    assert not model.vision_model.training
    assert [b.conv2[0].out_channels for b in model.decoder.blocks] == SMALL_UNET  # from the export's config
    auto_model = AutoModelForSemanticSegmentation.from_pretrained(export_dir)
    assert isinstance(auto_model, CGNSForSemanticSegmentation)
    # a segmenter's own save / load round trip keeps its decoder
    model.save_pretrained(tmp_path / "segmenter")
    reloaded = CGNSForSemanticSegmentation.from_pretrained(tmp_path / "segmenter")
    pixel_values = random_batch()[0]
    model.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(pixel_values=pixel_values).logits,
                               model(pixel_values=pixel_values).logits, atol=1e-5, rtol=1e-5)
    random_tower = CGNSForSemanticSegmentation.from_pretrained(export_dir, init="random")
    assert not torch.equal(random_tower.vision_model.timm_model.conv1.weight,
                           model.vision_model.timm_model.conv1.weight)
    with pytest.raises(ValueError, match="init must be one of"):
        CGNSForSemanticSegmentation.from_pretrained(export_dir, init="scratch")


def test_checkpoints_hold_decoder_buffers_not_the_tower(tmp_path):
    model = CGNSForSemanticSegmentation(segmentation_config())
    training_args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = SegmentationTrainer(model=model, args=training_args)
    trainer._save(str(tmp_path / "checkpoint"))
    saved = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    assert saved and not any(k.startswith("vision_model.") for k in saved)
    assert "decoder.blocks.0.conv1.1.running_mean" in saved and "head.weight" in saved


# ---------------------------------------------------------------------------------------------- end to end

def test_run_segmentation_end_to_end(export_dir, tmp_path):
    output_dir = tmp_path / "out"
    argv = ["--task", "segmentation", "--dataset", "synthetic_cxr",
            "--cache_dir", str(tmp_path / "data"), "--model", export_dir, "--output_dir", str(output_dir),
            "--dataset_options", "num_images=60", f"image_size={IMAGE_SIZE}", "--max_epochs", "2",
            "--seeds", "0", "--quiet"]
    args = td.parse_args(argv)
    # the E.3 protocol defaults come with --task segmentation
    assert (args.dataset_task, args.batch_size, args.lr, args.weight_decay) == ("segmentation", 16, 5e-4, 0.05)
    results = td.main(argv)         # train_downstream.py --task segmentation dispatches to run_segmentation
    with open(output_dir / "results.json") as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(results))
    assert written["hyperparameters"]["weight_decay"] == 0.05
    dice = written["seeds"]["0"]["test"]["dice"]
    assert 0.0 <= dice <= 1.0
    assert written["summary"]["dice"] == {"mean": dice, "std": 0.0, "n": 1}
    assert written["metric"] == "dice" and written["decoder"] == "unet"
    # the 48 generated training images, balanced: every positive and as many negatives (E.3)
    assert written["num_examples"]["validation"] == 6 and written["num_examples"]["test"] == 6
    assert 2 <= written["num_examples"]["train"] < 48 and written["num_examples"]["train"] % 2 == 0
    test = written["seeds"]["0"]["test"]
    assert test["dice_empty_prediction"] == pytest.approx(1 - test["num_positive"] / 6)
    assert test["dice_positive"] is None or 0.0 <= test["dice_positive"] <= 1.0
    assert set(written["summary"]) == {"dice", "dice_positive", "dice_empty_prediction"}
    assert written["seeds"]["0"]["epochs_trained"] == 2
    assert written["seeds"]["0"]["best_validation_loss"] is not None  # eval_loss drives early stopping
    assert (output_dir / "results.md").read_text().count("| dice |") == 1
    assert not (output_dir / "seed_0" / "checkpoints").exists()


__all__ = []
