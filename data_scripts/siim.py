"""SIIM-ACR Pneumothorax (stage 1, DICOM + RLE): the ``segmentation`` task.

Published layout (docs/data_contract.md, docs/method.md E.3)::

    <data_dir>/train-rle.csv                    header "ImageId, EncodedPixels" (note the space);
                                                several rows per image for several regions;
                                                "-1" (often " -1") for a negative image
    <data_dir>/dicom-images-train/**/<ImageId>.dcm   (searched recursively; if that folder is
                                                absent, anywhere under data_dir)

RLE (``rle_decode``): whitespace-separated integer pairs (offset, length); each offset is relative
to the end of the previous run (the first to pixel 0), over the *column-major* flattened image
(decode into a (width, height) array, then transpose). The mask is the union of an image's rows,
stored as an ``Image()`` (mode L, 0/255) at the stored image size.

Fixes relative to the reference (docs/method.md E.3, G.23): column names and values are
``strip()``-ed, so ``" -1"`` and ``"-1"`` are both negative; the split is made by **ImageId**
(70/15/15, sklearn-compatible with ``split_seed=0`` on the sorted ids), never by row, so no image
is in two splits. ``balance_train=True`` (default) keeps every positive training image plus as many
negatives, drawn with ``RandomState(balance_seed=42)``; validation and test are not balanced.

Bad input in ``manifest.json``: skipped rows ``duplicate_row``, ``missing_image_id``; skipped
images ``malformed_rle`` (odd count, non-integers, negative numbers, runs past the image end, empty
value), ``missing_image``, ``unreadable_dicom``, ``train_negative_not_sampled`` (balancing);
repaired ``negative_row_with_rle_rows`` (a ``-1`` row next to RLE rows: the RLE wins),
``duplicate_dicom`` (several files with one ImageId: the first by path is used); skipped images
``absolute path in list file`` / ``path outside the data folder`` (an ImageId that is a path: DICOMs are
found by walking the folder, so nothing outside it is read). Accounting: ``inputs["rows"]`` =
row-level skips + the rows of ``inputs["images"]`` ImageIds, and ``inputs["images"]`` = images in the
splits + image-level skips.
"""
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Tuple

import datasets
import numpy as np

from .builder import (
    CGNSBuilder,
    MAX_SIZE_FLAG,
    CliFlag,
    DatasetFormatError,
    Manifest,
    TaskSpec,
    png_image,
    prepare_and_load,
    read_csv_table,
    resize_longest,
    resolve_listed_path,
    run_cli,
    sklearn_holdout_split,
)
from .dicom import SCALINGS, DicomReadError, read_dicom

NAME = "siim"
RLE_CSV = "train-rle.csv"
IMAGES_DIR = "dicom-images-train"
COLUMNS = ("ImageId", "EncodedPixels")
NEGATIVE = "-1"

TASKS = {"segmentation": TaskSpec("segmentation", ("Pneumothorax",), "dice")}


class RLEError(ValueError):
    """A malformed run-length encoding; ``str(e)`` says what is wrong."""


# ------------------------------------------------------------------------------------------------
# RLE
# ------------------------------------------------------------------------------------------------
def parse_rle(rle: str) -> List[Tuple[int, int]]:
    """``"o1 l1 o2 l2 ..."`` -> [(o1, l1), ...]; raises ``RLEError`` (odd count, non-integer, < 0)."""
    tokens = str(rle).split()
    if not tokens:
        raise RLEError("empty RLE")
    if len(tokens) % 2:
        raise RLEError(f"odd number of values ({len(tokens)})")
    try:
        values = [int(t) for t in tokens]
    except ValueError:
        bad = next(t for t in tokens if not t.lstrip("+-").isdigit())
        raise RLEError(f"non-integer value {bad!r}") from None
    if any(v < 0 for v in values):
        raise RLEError("negative offset or length")
    return list(zip(values[0::2], values[1::2]))


def rle_decode(rle: str, width: int, height: int) -> np.ndarray:
    """Relative-offset, column-major RLE -> uint8 mask (height x width), 255 inside the runs."""
    flat = np.zeros(width * height, dtype=np.uint8)
    pos = 0
    for offset, length in parse_rle(rle):
        pos += offset
        if pos + length > flat.size:
            raise RLEError(f"run [{pos}, {pos + length}) runs past the image end ({flat.size} pixels)")
        flat[pos:pos + length] = 255
        pos += length
    return flat.reshape(width, height).T.copy()


def rle_encode(mask: np.ndarray) -> str:
    """Inverse of ``rle_decode`` for a (height x width) mask (non-zero = foreground); "-1" if empty."""
    flat = (np.asarray(mask).T.reshape(-1) > 0).astype(np.int8)
    edges = np.diff(np.concatenate([[0], flat, [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if not len(starts):
        return NEGATIVE
    out, prev_end = [], 0
    for s, e in zip(starts, ends):
        out += [int(s - prev_end), int(e - s)]
        prev_end = e
    return " ".join(map(str, out))


# ------------------------------------------------------------------------------------------------
# Reading the folder
# ------------------------------------------------------------------------------------------------
def read_rle_csv(data_dir: str, manifest: Manifest) -> "OrderedDict[str, List[str]]":
    """``train-rle.csv`` -> ImageId -> list of stripped EncodedPixels values (in file order)."""
    path = os.path.join(data_dir, RLE_CSV)
    if not os.path.isfile(path):
        found = sorted(os.listdir(data_dir))[:20] if os.path.isdir(data_dir) else "no such folder"
        raise DatasetFormatError(f"SIIM: expected {RLE_CSV} in {data_dir!r}; found: {found}")
    df = read_csv_table(path, COLUMNS, "SIIM", hint=" (header 'ImageId, EncodedPixels')")
    manifest.inputs["rows"] = len(df)
    out: "OrderedDict[str, List[str]]" = OrderedDict()
    seen = set()
    for i, (image_id, rle) in enumerate(df[list(COLUMNS)].itertuples(index=False, name=None)):
        image_id, rle = str(image_id).strip(), str(rle).strip()
        if not image_id:
            manifest.skip("missing_image_id", f"row {i + 2}")
            continue
        if (image_id, rle) in seen:
            manifest.skip("duplicate_row", f"row {i + 2}: {image_id}")
            continue
        seen.add((image_id, rle))
        out.setdefault(image_id, []).append(rle)
    return out


def find_dicoms(data_dir: str, manifest: Manifest) -> Dict[str, str]:
    """ImageId -> path of ``<ImageId>.dcm``, searched under ``dicom-images-train/`` (else data_dir)."""
    root = os.path.join(data_dir, IMAGES_DIR)
    if not os.path.isdir(root):
        root = data_dir
    found: Dict[str, List[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in filenames:
            if f.lower().endswith(".dcm"):
                found.setdefault(f[:-4], []).append(os.path.join(dirpath, f))
    paths = {}
    for image_id, ps in found.items():
        ps.sort()
        if len(ps) > 1:
            manifest.repair("duplicate_dicom", f"{image_id}: using {ps[0]} of {len(ps)}")
        paths[image_id] = ps[0]
    return paths


@dataclass
class Item:
    """One image: its DICOM path and the stripped RLE strings of its rows (empty list = negative)."""

    image_id: str
    path: str
    rles: List[str]

    @property
    def positive(self) -> bool:
        return bool(self.rles)


def collect_items(data_dir: str, manifest: Manifest) -> List[Item]:
    """Validate every image before splitting: DICOM present and readable header, RLE well-formed."""
    import pydicom

    rows = read_rle_csv(data_dir, manifest)
    paths = find_dicoms(data_dir, manifest)
    if not paths:
        raise DatasetFormatError(f"SIIM: expected DICOMs <ImageId>.dcm under {IMAGES_DIR}/ in {data_dir!r}; found none")
    manifest.inputs["images"] = len(rows)
    items = []
    for image_id, values in rows.items():
        listed = os.path.join(data_dir, IMAGES_DIR, image_id + ".dcm")
        _, refused = resolve_listed_path(data_dir, image_id, [listed])
        if refused:  # DICOMs are only found by walking the folder; say why this id is not used
            manifest.skip(refused, image_id)
            continue
        if image_id not in paths:
            manifest.skip("missing_image", image_id)
            continue
        rles = [v for v in values if v != NEGATIVE]
        if rles and len(rles) != len(values):
            manifest.repair("negative_row_with_rle_rows", image_id)
        try:
            ds = pydicom.dcmread(paths[image_id], stop_before_pixels=True)
            width, height = int(ds.Columns), int(ds.Rows)
        except Exception as e:
            manifest.skip("unreadable_dicom", f"{image_id} ({type(e).__name__}: {e})")
            continue
        try:
            for rle in rles:
                rle_decode(rle, width, height)
        except RLEError as e:
            manifest.skip("malformed_rle", f"{image_id} ({e})")
            continue
        items.append(Item(image_id, paths[image_id], rles))
    if not items:
        raise DatasetFormatError(f"SIIM: no usable image in {data_dir!r}: {len(rows)} ImageIds in {RLE_CSV}, "
                                 f"{len(paths)} DICOMs found, none both present and valid")
    return items


def split_items(items: List[Item], split_seed: int = 0, balance_train: bool = True, balance_seed: int = 42,
                manifest: Manifest = None) -> Dict[str, List[Item]]:
    """Image-level 70/15/15 split (sorted ImageIds; sklearn-compatible), then optional train balancing."""
    by_id = {it.image_id: it for it in items}
    ids = sorted(by_id)
    if len(ids) < 3:
        raise DatasetFormatError(f"SIIM: need at least 3 usable images to split, found {len(ids)}")
    train, held = sklearn_holdout_split(ids, 0.3, split_seed)
    test, validation = sklearn_holdout_split(held, 0.5, split_seed)
    if balance_train:
        pos = [i for i in train if by_id[i].positive]
        neg = sorted(i for i in train if not by_id[i].positive)
        k = min(len(pos), len(neg))
        chosen = set(np.random.RandomState(balance_seed).choice(neg, size=k, replace=False).tolist()) if k else set()
        if manifest is not None:
            for i in neg:
                if i not in chosen:
                    manifest.skip("train_negative_not_sampled", i)
        train = [i for i in train if by_id[i].positive or i in chosen]
    return {s: [by_id[i] for i in v] for s, v in (("train", train), ("validation", validation), ("test", test))}


# ------------------------------------------------------------------------------------------------
# Builder
# ------------------------------------------------------------------------------------------------
@dataclass
class SIIMConfig(datasets.BuilderConfig):
    """Options: ``max_size``, ``split_seed``, ``balance_train``, ``balance_seed``, ``scaling``."""

    max_size: int = 1024
    split_seed: int = 0
    balance_train: bool = True
    balance_seed: int = 42
    scaling: str = "minmax"


class SIIM(CGNSBuilder):
    """SIIM-ACR Pneumothorax segmentation builder (see the module docstring)."""

    NAME, TASKS = NAME, TASKS
    READS_DICOM = True
    BUILDER_CONFIG_CLASS = SIIMConfig
    BUILDER_CONFIGS = [SIIMConfig(name="segmentation", version=datasets.Version("1.0.0"))]
    DEFAULT_CONFIG_NAME = "segmentation"

    def _split_generators(self, dl_manager):
        cfg = self.config
        if cfg.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {cfg.scaling!r}")
        items = collect_items(self._data_dir(), self.manifest)
        splits = split_items(items, cfg.split_seed, cfg.balance_train, cfg.balance_seed, self.manifest)
        if not splits["train"]:
            raise DatasetFormatError("SIIM: the training split is empty (no positive image to balance on?)")
        return self.split_generators(splits)

    def _examples(self, items):
        import PIL.Image

        cfg = self.config
        for it in items:
            try:
                dcm = read_dicom(it.path, cfg.scaling)
                mask = np.zeros((dcm.height, dcm.width), dtype=np.uint8)
                for rle in it.rles:
                    mask |= rle_decode(rle, dcm.width, dcm.height)
            except DicomReadError as e:
                self.manifest.skip("unreadable_dicom", f"{it.image_id} ({e})")
                continue
            except RLEError as e:  # header and pixel sizes disagree
                self.manifest.skip("malformed_rle", f"{it.image_id} ({e})")
                continue
            mask_img = resize_longest(PIL.Image.fromarray(mask, mode="L"), cfg.max_size, PIL.Image.NEAREST)
            yield it.image_id, {"image": png_image(dcm.to_pil(), cfg.max_size),
                                "mask": mask_img,  # a PIL image: datasets stores it as PNG
                                "image_id": it.image_id}


def load(data_dir=None, task: str = "segmentation", data_pct: float = 1.0, seed: int = 0,
         cache_dir=None, **options) -> datasets.DatasetDict:
    """Prepare (once, Arrow-cached) and load SIIM segmentation; ``data_pct`` samples train ImageIds.

    ``options``: ``max_size`` (1024), ``split_seed`` (0), ``balance_train`` (True), ``balance_seed``
    (42), ``scaling`` (``"minmax"``/``"max"``), ``download_mode``, ``verbose``.
    """
    return prepare_and_load(SIIM, task, data_dir, data_pct, seed, cache_dir, **options)


def main(argv=None) -> int:
    """CLI: ``python -m data_scripts.siim --data_dir D --output_dir O [--task segmentation]``."""
    no_balance = CliFlag("--no_balance_train", "balance_train",
                         dict(action="store_false", help="keep every training negative"))
    return run_cli(NAME, load, TASKS, argv, "Prepare SIIM-ACR Pneumothorax segmentation for CGNS.",
                   flags=[MAX_SIZE_FLAG, no_balance])


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = ["NAME", "TASKS", "SIIM", "SIIMConfig", "RLEError", "Item", "load", "main", "parse_rle", "rle_decode",
           "rle_encode", "read_rle_csv", "find_dicoms", "collect_items", "split_items"]
