"""Object detection protocol (docs/method.md E.2): CGNSForObjectDetection, the mAP metric, downstream.detection.

Tiny resnet18 towers at 64 px (grids 2 / 4 / 8) and the synthetic dataset at 64 px keep the file well
under 90 s on two CPU cores.
"""
import json
import math
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cgns.downstream import cli as td  # noqa: E402
from modeling_cgns import CGNSForObjectDetection, CGNSModel  # noqa: E402
from modeling_cgns.detection_metrics import (  # noqa: E402
                                             average_precision_per_threshold,
                                             mean_average_precision,
                                             )
from cgns.downstream import detection as det  # noqa: E402
from modeling_cgns.modeling_detection import ANCHORS_224, build_targets, yolo_scale_loss  # noqa: E402
from tiny import tiny_config  # noqa: E402

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CGNSForObjectDetection(tiny_config("resnet18", image_size=IMAGE_SIZE))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cgns_export"))
    torch.manual_seed(0)
    CGNSModel(tiny_config("resnet18", image_size=IMAGE_SIZE)).save_pretrained(path)
    return path


def one_box_labels():
    return [torch.tensor([[0.25, 0.575, 0.35, 0.625]]), torch.zeros(0, 4)]


# ------------------------------------------------------------------------------------------------ model

def test_output_shapes_per_scale(model):
    outputs = model(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert outputs.loss is None
    assert [tuple(x.shape) for x in outputs.logits] == [(2, 18, 2, 2), (2, 18, 4, 4), (2, 18, 8, 8)]
    # resnet18 (C5 = 512) gets the ResNet-50 widths divided by 4: first branch 128 / 256
    assert model.detection_head.branch0.output.in_channels == 256
    assert model.detection_head.branch1.body[0][0].in_channels == 256 + 64  # C4 + upsampled route
    assert model.detection_head.branch2.body[0][0].in_channels == 128 + 32  # C3 + upsampled route


def test_only_head_trains_and_tower_is_unchanged(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("detection_head.") for n in trainable)
    assert trainable == {"detection_head." + n for n, _ in model.detection_head.named_parameters()}
    tower_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    assert not model.vision_model.training and model.detection_head.training
    for _ in range(2):
        outputs = model(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), labels=one_box_labels())
        optimizer.zero_grad()
        outputs.loss.backward()
        assert all(p.grad is not None for p in model.detection_head.parameters())
        optimizer.step()
    for key, value in model.vision_model.state_dict().items():  # weights and BN running statistics
        assert torch.equal(value, tower_before[key]), key


def test_target_assignment_known_answer(model):
    # stride 8 at 64 px: G = 8; box centre (0.3, 0.6) -> (2.4, 4.8) -> cell (gi 2, gj 4), offsets (0.4, 0.8)
    anchors_grid = model.anchors_px[2] * 8 / IMAGE_SIZE
    targets = build_targets(one_box_labels(), anchors_grid, grid_size=8)
    size = torch.tensor([0.1 * 8, 0.05 * 8])
    expected_anchor = 2  # (17.77, 12.38) px at 224 is the closest shape to 0.8 x 0.4 cells
    assert anchors_grid.shape == (3, 2)
    assert targets.obj_mask.sum() == 1 and targets.obj_mask[0, expected_anchor, 4, 2]
    assert targets.tx[0, expected_anchor, 4, 2] == pytest.approx(0.4, abs=1e-5)
    assert targets.ty[0, expected_anchor, 4, 2] == pytest.approx(0.8, abs=1e-5)
    log_size = torch.log(size / anchors_grid[expected_anchor])
    assert targets.tw[0, expected_anchor, 4, 2] == pytest.approx(float(log_size[0]), abs=1e-5)
    assert targets.th[0, expected_anchor, 4, 2] == pytest.approx(float(log_size[1]), abs=1e-5)
    # only the assigned anchor leaves the no-object mask (the others have shape IoU < 0.5 here)
    assert (~targets.noobj_mask).sum() == 1 and not targets.noobj_mask[0, expected_anchor, 4, 2]
    assert targets.noobj_mask[1].all()
    # anchors are E.2's, scaled from 224 to the image size
    assert torch.allclose(model.anchors_px, torch.tensor(ANCHORS_224) * IMAGE_SIZE / 224)


def test_ignore_threshold_removes_similar_anchors_from_noobj():
    anchors = torch.tensor([[1.0, 1.0], [1.1, 1.0], [3.0, 3.0]])
    targets = build_targets([torch.tensor([[0.0, 0.0, 0.25, 0.25]])], anchors, grid_size=4)  # 1 x 1 cells
    assert targets.obj_mask[0, 0, 0, 0] and targets.obj_mask.sum() == 1
    assert not targets.noobj_mask[0, 1, 0, 0]  # IoU 1 / 1.1 > 0.5: ignored, not a negative
    assert targets.noobj_mask[0, 2, 0, 0]  # IoU 1 / 9: still a negative


def test_loss_finite_and_decreases_when_overfitting_one_batch():
    torch.manual_seed(1)
    model = CGNSForObjectDetection(tiny_config("resnet18", image_size=IMAGE_SIZE))
    pixel_values = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    labels = [torch.tensor([[0.1, 0.2, 0.4, 0.5], [0.6, 0.6, 0.7, 0.8]]),
              torch.tensor([[0.3, 0.3, 0.9, 0.7]])]
    optimizer = torch.optim.AdamW(model.detection_head.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(6):
        outputs = model(pixel_values, labels=labels)
        for name in ("loss_x", "loss_y", "loss_w", "loss_h", "loss_conf", "loss_cls"):
            assert torch.isfinite(getattr(outputs, name)), name
        optimizer.zero_grad()
        outputs.loss.backward()
        optimizer.step()
        losses.append(outputs.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses


def test_decode_and_nms_known_answer(model):
    logits = [torch.zeros(1, 18, g, g) for g in (2, 4, 8)]
    for scale_logits in logits:
        scale_logits.view(1, 3, 6, *scale_logits.shape[-2:])[:, :, 4] = -10.0  # objectness ~ 0 everywhere
    fine = logits[2].view(1, 3, 6, 8, 8)
    anchors = torch.tensor(ANCHORS_224[2])
    fine[0, 2, 4, 4, 2] = 3.0  # anchor 2, cell (gj 4, gi 2): score sigmoid(3)
    fine[0, 1, 4, 4, 2] = 2.0  # anchor 1, same cell, resized to anchor 2's shape: suppressed by NMS
    fine[0, 1, 2, 4, 2] = math.log(anchors[2, 0] / anchors[1, 0])
    fine[0, 1, 3, 4, 2] = math.log(anchors[2, 1] / anchors[1, 1])
    fine[0, 0, 4, 0, 7] = 1.0  # another cell: kept
    fine[0, 0, 4, 7, 7] = -1.0  # below the 0.5 confidence threshold
    (boxes, scores), = model.decode(logits, conf_threshold=0.5, nms_iou=0.5)
    assert torch.allclose(scores, torch.sigmoid(torch.tensor([3.0, 1.0])))
    w, h = anchors[2] / 224
    cx, cy = 2.5 / 8, 4.5 / 8
    assert torch.allclose(boxes[0], torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]), atol=1e-6)
    w0, h0 = anchors[0] / 224
    assert torch.allclose(boxes[1], torch.tensor([7.5 / 8 - w0 / 2, 0.5 / 8 - h0 / 2, 7.5 / 8 + w0 / 2,
                                                  0.5 / 8 + h0 / 2]).clamp(0, 1), atol=1e-6)


def test_decode_inverts_the_targets(model):
    """Logits set to the training targets decode back to the ground-truth boxes (encode / decode agree)."""
    labels = [torch.tensor([[0.1, 0.15, 0.3, 0.4], [0.55, 0.5, 0.95, 0.9]]),
              torch.tensor([[0.4, 0.45, 0.45, 0.5]])]
    logits = []
    for scale, grid_size in enumerate((2, 4, 8)):
        targets = build_targets(labels, model.anchors_px[scale] * grid_size / IMAGE_SIZE, grid_size)
        per_anchor = torch.stack([torch.logit(targets.tx, eps=1e-6), torch.logit(targets.ty, eps=1e-6),
                                  targets.tw, targets.th, torch.where(targets.obj_mask, 10.0, -10.0),
                                  torch.full_like(targets.tx, 10.0)], dim=2)  # (B, A, 6, G, G)
        logits.append(per_anchor.reshape(2, 18, grid_size, grid_size))
    for (boxes, scores), expected in zip(model.decode(logits), labels):
        order = boxes[:, 0].argsort()
        assert torch.allclose(boxes[order], expected, atol=1e-4)


def test_vit_tower_is_refused():
    with pytest.raises(ValueError, match="ResNet"):
        CGNSForObjectDetection(tiny_config("vit_tiny_patch16_224", image_size=IMAGE_SIZE))


def test_from_pretrained_loads_the_export_tower(export_dir):
    source = CGNSModel.from_pretrained(export_dir)
    detector = CGNSForObjectDetection.from_pretrained(export_dir)
    for key, value in source.vision_model.state_dict().items():
        assert torch.equal(detector.vision_model.state_dict()[key], value), key
    assert not any(p.requires_grad for p in detector.vision_model.parameters())
    assert all(p.requires_grad for p in detector.detection_head.parameters())
    assert torch.allclose(detector.anchors_px, torch.tensor(ANCHORS_224) * IMAGE_SIZE / 224)


def test_random_init_keeps_the_architecture_and_freezes_the_tower(export_dir):
    detector = CGNSForObjectDetection.from_pretrained(export_dir, init="random")
    source = CGNSModel.from_pretrained(export_dir).vision_model.state_dict()
    assert any(not torch.equal(v, source[k]) for k, v in detector.vision_model.state_dict().items()
               if v.is_floating_point())
    assert not any(p.requires_grad for p in detector.vision_model.parameters())
    assert not detector.train().vision_model.training


# ------------------------------------------------------------------------------------------------ mAP

BOX_A = [0.1, 0.1, 0.3, 0.3]
BOX_B = [0.6, 0.6, 0.9, 0.8]


def pred(boxes, scores):
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores, dtype=torch.float32)


def gt(*boxes):
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def test_map_perfect_predictions_is_one():
    predictions = [pred([BOX_A, BOX_B], [0.9, 0.8]), pred([BOX_B], [0.7])]
    targets = [gt(BOX_A, BOX_B), gt(BOX_B)]
    assert mean_average_precision(predictions, targets) == pytest.approx(1.0)
    assert mean_average_precision(predictions, targets, mgca_quirks=True) == pytest.approx(1.0)


def test_map_false_positive_ranked_above_true_positive():
    # ranks: FP (precision 0), TP (precision 1/2 at recall 1) -> interpolated precision 0.5 everywhere
    predictions = [pred([BOX_B, BOX_A], [0.9, 0.8])]
    assert mean_average_precision(predictions, [gt(BOX_A)]) == pytest.approx(0.5)


def test_map_image_without_ground_truth_with_and_without_quirks():
    predictions = [pred([BOX_A], [0.5]), pred([BOX_B], [0.9])]  # the second image is negative
    targets = [gt(BOX_A), gt()]
    assert mean_average_precision(predictions, targets) == pytest.approx(0.5)
    assert mean_average_precision(predictions, targets, mgca_quirks=True) == pytest.approx(1.0)
    assert mean_average_precision([pred([], [])], [gt()]) is None  # nothing to find: undefined


def test_map_image_without_predictions_with_and_without_quirks():
    predictions = [pred([BOX_A], [0.5]), pred([], [])]
    targets = [gt(BOX_A), gt(BOX_B)]
    assert mean_average_precision(predictions, targets) == pytest.approx(51 / 101)  # recall reaches only 0.5
    assert mean_average_precision(predictions, targets, mgca_quirks=True) == pytest.approx(1.0)


def test_box_at_iou_half_counts_up_to_threshold_half():
    predictions = [pred([[0.0, 0.0, 0.5, 0.25]], [0.9])]
    targets = [gt([0.0, 0.0, 0.5, 0.5])]  # IoU exactly 0.5
    aps = average_precision_per_threshold(predictions, targets)
    assert list(aps) == pytest.approx([0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75])
    assert [aps[t] for t in aps] == pytest.approx([1.0, 1.0, 1.0, 0, 0, 0, 0, 0])
    assert mean_average_precision(predictions, targets) == pytest.approx(3 / 8)


def iou_oracle(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def map_oracle(predictions, targets, thresholds, quirks):
    """Plain-loop COCO AP: greedy matching per image, ranking over images, 101-point interpolation."""
    aps = []
    for t in thresholds:
        ranked, num_gt = [], 0
        for (boxes, scores), gts in zip(predictions, targets):
            boxes, scores, gts = boxes.tolist(), scores.tolist(), gts.tolist()
            if quirks and (not gts or not boxes):
                continue
            num_gt += len(gts)
            used = [False] * len(gts)
            for d in sorted(range(len(boxes)), key=lambda i: -scores[i]):
                best, best_iou = None, t
                for g, gt_box in enumerate(gts):
                    iou = iou_oracle(boxes[d], gt_box)
                    if not used[g] and iou >= best_iou:
                        best, best_iou = g, iou
                if best is not None:
                    used[best] = True
                ranked.append((scores[d], best is not None))
        if num_gt == 0:
            continue
        ranked.sort(key=lambda x: -x[0])
        tp = fp = 0
        recall, precision = [], []
        for _, hit in ranked:
            tp, fp = tp + hit, fp + (not hit)
            recall.append(tp / num_gt)
            precision.append(tp / (tp + fp))
        total = 0.0
        # COCO's recall points are np.linspace(0, 1, 101), compared exactly (35 * 0.01 > 7 / 20 in floats)
        for r in np.linspace(0.0, 1.0, 101).tolist():
            reached = [k for k in range(len(recall)) if recall[k] >= r]
            total += max(precision[reached[0]:]) if reached else 0.0
        aps.append(total / 101)
    return sum(aps) / len(aps) if aps else None


def random_detection_set(rng, num_images=15):
    predictions, targets = [], []
    for _ in range(num_images):
        gts = []
        for _ in range(rng.randint(0, 3)):
            x, y = rng.uniform(0, 0.7), rng.uniform(0, 0.7)
            gts.append([x, y, x + rng.uniform(0.05, 0.3), y + rng.uniform(0.05, 0.3)])
        boxes = [[v + rng.uniform(-0.04, 0.04) for v in g] for g in gts if rng.random() < 0.8]
        for _ in range(rng.randint(0, 3)):
            x, y = rng.uniform(0, 0.7), rng.uniform(0, 0.7)
            boxes.append([x, y, x + rng.uniform(0.05, 0.3), y + rng.uniform(0.05, 0.3)])
        predictions.append(pred(boxes, [rng.random() for _ in boxes]))
        targets.append(gt(*gts))
    return predictions, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_matches_loop_oracle_on_random_data(seed):
    predictions, targets = random_detection_set(random.Random(seed))
    thresholds = [round(0.40 + 0.05 * i, 2) for i in range(8)]
    for quirks in (False, True):
        expected = map_oracle(predictions, targets, thresholds, quirks)
        computed = mean_average_precision(predictions, targets, mgca_quirks=quirks)
        assert computed == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------------ class loss

@pytest.mark.parametrize("normalization", ["all_anchors", "object_anchors"])
def test_class_loss_normalization_known_answer(model, normalization):
    """all_anchors is MGCA's BCE(sigmoid(cls) * mask, tcls * mask) over every anchor; object_anchors its mean."""
    torch.manual_seed(3)
    anchors_grid = model.anchors_px[2] * 8 / IMAGE_SIZE
    labels = [torch.tensor([[0.25, 0.575, 0.35, 0.625], [0.6, 0.1, 0.9, 0.3]]), torch.zeros(0, 4)]
    targets = build_targets(labels, anchors_grid, grid_size=8)
    prediction = torch.randn(2, 3, 8, 8, 6, requires_grad=True)
    loss = yolo_scale_loss(prediction, targets, normalization)["loss_cls"]
    # the reference's form, on probabilities, over the whole (B, A, G, G, C) grid (masked entries give 0)
    mask = targets.obj_mask.float().unsqueeze(-1)
    reference = torch.nn.BCELoss()(torch.sigmoid(prediction[..., 5:]) * mask, mask)
    n_obj = int(targets.obj_mask.sum())
    assert n_obj == 2
    expected = reference if normalization == "all_anchors" else reference * mask.numel() / n_obj
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    grad, = torch.autograd.grad(loss, prediction)
    expected_grad, = torch.autograd.grad(expected, prediction)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="class_loss_normalization"):
        yolo_scale_loss(prediction, targets, "per_image")


def test_reference_class_loss_normalization_is_the_default(model):
    assert model.class_loss_normalization == "all_anchors"
    args = td.parse_args(["--task", "detection", "--dataset", "synthetic_cxr", "--model", "m", "--output_dir", "o"])
    assert (args.class_loss_normalization, args.selection_metric, args.min_epochs) == \
        ("all_anchors", "map_all_scores", 25)
    flagged = td.parse_args(["--task", "detection", "--dataset", "synthetic_cxr", "--model", "m", "--output_dir", "o",
                             "--class_loss_normalization", "object_anchors"])
    assert flagged.class_loss_normalization == "object_anchors"


# ------------------------------------------------------------------------------------------------ selection

def test_flat_zero_scores_keep_the_last_epoch_and_wait_for_min_epochs():
    """The defect: validation mAP 0 every epoch ended runs at epoch 11 with the epoch-1 head."""
    selector = det.EpochSelector(patience=2, min_epochs=5)
    stops = [selector.update(epoch, 0.0)[1] for epoch in range(1, 6)]
    assert stops == [False, False, False, False, True]   # patience ran out at epoch 3; min_epochs holds to 5
    assert selector.best_epoch == 5                      # the tie goes to the latest head, not epoch 1
    old_rule = det.EpochSelector(patience=2, min_epochs=0)
    assert [old_rule.update(epoch, 0.0)[1] for epoch in (1, 2, 3)] == [False, False, True]


def test_selector_improvements_ties_and_patience():
    selector = det.EpochSelector(patience=2, min_epochs=0)
    results = [selector.update(epoch, score) for epoch, score in enumerate([0.1, 0.3, 0.3, 0.2, 0.25], 1)]
    assert [is_best for is_best, _ in results] == [True, True, True, False, False]
    assert [stop for _, stop in results] == [False, False, False, True, True]
    assert selector.best_epoch == 3 and selector.best_score == 0.3
    assert det.selection_score("loss", {"loss": 2.0}) == -2.0
    assert det.selection_score("map", {"map": None}) == float("-inf")
    assert det.selection_score("map_all_scores", {"map_all_scores": float("nan")}) == float("-inf")


def test_threshold_free_predictions_contain_the_e2_detections(model):
    """Decoding at confidence 0 then keeping scores >= 0.5 gives exactly the detections decoded at 0.5."""
    torch.manual_seed(5)
    logits = tuple(torch.randn(2, 18, g, g) * 3 for g in (2, 4, 8))
    everything = model.decode(logits, conf_threshold=0.0)
    e2 = model.decode(logits, conf_threshold=0.5)
    assert sum(len(s) for _, s in e2) > 0 and sum(len(s) for _, s in everything) > sum(len(s) for _, s in e2)
    for (boxes, scores), (kept_boxes, kept_scores) in zip(det.above(everything), e2):
        torch.testing.assert_close(boxes, kept_boxes)
        torch.testing.assert_close(scores, kept_scores)


# ------------------------------------------------------------------------------------------------ end to end

def test_run_detection_end_to_end_on_synthetic(export_dir, tmp_path):
    output_dir = tmp_path / "detection"
    argv = ["--task", "detection", "--dataset", "synthetic_cxr",
            "--cache_dir", str(tmp_path / "cache"), "--model", export_dir, "--output_dir", str(output_dir),
            "--dataset_options", "num_images=60", f"image_size={IMAGE_SIZE}", "--max_epochs", "2", "--seeds", "0",
            "--lr", "1e-3", "--quiet"]
    args = td.parse_args(argv)
    assert (args.dataset_task, args.batch_size, args.weight_decay) == ("detection", 16, 1e-6)   # E.2 defaults
    results = td.main(argv)          # train_downstream.py --task detection dispatches to run_detection
    with open(output_dir / "results.json") as f:
        saved = json.load(f)
    assert saved["summary"] == results["summary"]
    test = saved["seeds"]["0"]["test"]
    assert 0.0 <= test["map"] <= 1.0
    assert test["map_mgca"] is None or 0.0 <= test["map_mgca"] <= 1.0
    assert saved["summary"]["map"]["mean"] == pytest.approx(test["map"])
    assert saved["seeds"]["0"]["epochs_trained"] == 2
    assert 0.0 <= test["map_all_scores"] <= 1.0 and math.isfinite(test["loss"])
    assert [h["epoch"] for h in saved["seeds"]["0"]["history"]] == [1, 2]
    assert (output_dir / "results.md").read_text().count("\n") == 3
