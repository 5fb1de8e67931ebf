"""Object-CXR (foreign objects on chest X-rays, JPEG): the ``detection`` task.

Published layout (docs/data_contract.md, docs/method.md E.2)::

    <data_dir>/train.csv, <data_dir>/dev.csv   columns image_name, annotation
    <data_dir>/train/<image_name>, <data_dir>/dev/<image_name>   (JPEG, sizes vary)

``annotation`` is empty for an image without foreign objects; otherwise objects separated by
``;``, each ``<type> x1 y1 x2 y2 ...`` in pixels:

* type 0 (rectangle) and 1 (ellipse): the bounding rectangle of the listed points;
* type 2 (polygon): ``polylabel`` (tolerance 10) of the closed polygon outline buffered by 100 px
  gives a centre ``c`` (as the reference does: ``LineString(points + first point).buffer(100)``);
  with ``polygon_box="square"`` (default, docs/method.md E.2) the box is the square centred at ``c``
  whose half-side is the largest distance from ``c`` to the polygon's bounds; with
  ``polygon_box="mgca"`` it is the reference code's box, half-width and half-height taken per axis
  (``max(|xmin - cx|, |xmax - cx|)``, same for y). Both always cover the polygon's bounds.

Boxes are ``[x_min, y_min, x_max, y_max]`` normalised by the image's real size and clipped to
[0, 1]. Splits: ``train.csv`` 90/10 into train/validation, sklearn-compatible
(``train_test_split(test_size=0.1, random_state=split_seed=0)`` in file order: 8,000 -> 7,200 / 800);
test = ``dev.csv``. Images are stored as 8-bit grayscale PNG, downsized to ``max_size``.

Bad input in ``manifest.json``: skipped images ``malformed_annotation:odd_coordinate_count``,
``...:unknown_type``, ``...:non_numeric``, ``...:too_few_points`` (an image with any malformed object
is skipped whole, because keeping it would teach missing boxes as background),
``positive_without_usable_box`` (objects listed, none usable: every box outside the image or of
non-positive size -- kept, it would be a positive stored as a negative), ``missing_image``,
``unreadable_image``, ``absolute path in list file`` / ``path outside the data folder`` (an
``image_name`` that names a file outside ``data_dir``; never opened); skipped rows ``duplicate_row``
(identical repeat), ``conflicting_duplicate`` (one name, different annotations: every row of it),
``missing_image_name``; skipped boxes ``box_outside_image``, ``box_nonpositive_size``; repaired
``box_clipped``, ``empty_object`` (a stray ``;``). Accounting: for each CSV,
``inputs["<csv> rows"]`` = its images in the splits + its row- and image-level skips.

Polygon boxes need ``shapely`` (``shapely.ops.polylabel``), imported only when a polygon occurs.
"""
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

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
    resolve_listed_path,
    run_cli,
    sklearn_holdout_split,
)

NAME = "object_cxr"
COLUMNS = ("image_name", "annotation")
SOURCES = (("train.csv", "train"), ("dev.csv", "dev"))
POLYGON_BOX_MODES = ("square", "mgca")
OBJECT_SEP = ";"

TASKS = {"detection": TaskSpec("detection", ("foreign_object",), "map")}


class AnnotationError(ValueError):
    """A malformed object annotation; ``reason`` is the manifest key suffix."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# ------------------------------------------------------------------------------------------------
# Annotation parsing
# ------------------------------------------------------------------------------------------------
def polygon_box(points: np.ndarray, mode: str = "square") -> Tuple[float, float, float, float]:
    """Pixel box ``(x0, y0, x1, y1)`` for a polygon given as an (N, 2) array (module docstring)."""
    try:
        from shapely.geometry import LineString
        from shapely.ops import polylabel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Object-CXR polygon annotations need shapely (pip install shapely)") from e
    if mode not in POLYGON_BOX_MODES:
        raise ValueError(f"polygon_box must be one of {POLYGON_BOX_MODES}, got {mode!r}")
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    ring = LineString(np.vstack([pts, pts[:1]]))
    centre = polylabel(ring.buffer(100), tolerance=10)
    c = np.array([centre.x, centre.y])
    bounds = np.asarray(ring.bounds, dtype=np.float64).reshape(2, 2)  # [[xmin, ymin], [xmax, ymax]]
    dist = np.abs(bounds - c).max(axis=0)  # per-axis half extents (the reference)
    half = dist if mode == "mgca" else np.array([dist.max(), dist.max()])
    return float(c[0] - half[0]), float(c[1] - half[1]), float(c[0] + half[0]), float(c[1] + half[1])


def parse_object(text: str, polygon_mode: str = "square") -> Tuple[float, float, float, float]:
    """One ``<type> x1 y1 x2 y2 ...`` object -> pixel box; raises ``AnnotationError``."""
    tokens = text.split()
    kind, coords = tokens[0], tokens[1:]
    if kind not in ("0", "1", "2"):
        raise AnnotationError("unknown_type", f"type {kind!r}")
    try:
        values = [float(t) for t in coords]
    except ValueError:
        raise AnnotationError("non_numeric", " ".join(coords[:8])) from None
    if not all(math.isfinite(v) for v in values):
        raise AnnotationError("non_numeric", "non-finite coordinate")
    if len(values) % 2:
        raise AnnotationError("odd_coordinate_count", f"{len(values)} values")
    pts = np.asarray(values, dtype=np.float64).reshape(-1, 2)
    if len(pts) < (3 if kind == "2" else 2):
        raise AnnotationError("too_few_points", f"type {kind} with {len(pts)} point(s)")
    if kind == "2":
        return polygon_box(pts, polygon_mode)
    (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
    return float(x0), float(y0), float(x1), float(y1)


def parse_annotation(annotation: str, polygon_mode: str = "square") -> Tuple[List[Tuple[float, ...]], int]:
    """Annotation string -> (pixel boxes, number of empty objects); raises ``AnnotationError``."""
    annotation = (annotation or "").strip()
    if not annotation:
        return [], 0
    boxes, empty = [], 0
    for obj in annotation.split(OBJECT_SEP):
        obj = obj.strip()
        if not obj:
            empty += 1
            continue
        boxes.append(parse_object(obj, polygon_mode))
    return boxes, empty


def normalise_box(box, width: int, height: int) -> Tuple[Optional[List[float]], Optional[str]]:
    """Pixel ``(x0, y0, x1, y1)`` -> normalised clipped box and a status (see ``rsna.normalise_box``)."""
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return None, "box_nonpositive_size"
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return None, "box_outside_image"
    c = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    status = "box_clipped" if c != (x0, y0, x1, y1) else None
    return [c[0] / width, c[1] / height, c[2] / width, c[3] / height], status


# ------------------------------------------------------------------------------------------------
# Reading the folder
# ------------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One image with its normalised boxes."""

    image_name: str
    path: str
    boxes: List[List[float]] = field(default_factory=list)


def read_csv_rows(path: str, manifest: Manifest) -> "OrderedDict[str, str]":
    """``train.csv``/``dev.csv`` -> image_name -> annotation; every other row is skipped by reason.

    One manifest entry per row left out: ``missing_image_name``, ``duplicate_row`` (an identical
    repeat; the first row is used) and ``conflicting_duplicate`` (one name, different annotations:
    every row of that name, since none can be trusted). ``manifest.inputs["<csv> rows"]`` counts
    the rows read.
    """
    df = read_csv_table(path, COLUMNS, "Object-CXR")
    csv_name = os.path.basename(path)
    manifest.inputs[f"{csv_name} rows"] = len(df)
    by_name: "OrderedDict[str, List[Tuple[int, str]]]" = OrderedDict()
    for i, (name, ann) in enumerate(df[list(COLUMNS)].itertuples(index=False, name=None)):
        name, ann = str(name).strip(), str(ann).strip()
        if not name:
            manifest.skip("missing_image_name", f"{csv_name} row {i + 2}")
        else:
            by_name.setdefault(name, []).append((i + 2, ann))  # +2: header line, 1-based numbering
    rows: "OrderedDict[str, str]" = OrderedDict()
    for name, entries in by_name.items():
        if len({ann for _, ann in entries}) > 1:
            for line, _ in entries:
                manifest.skip("conflicting_duplicate", f"{csv_name} row {line}: {name}")
            continue
        for line, _ in entries[1:]:
            manifest.skip("duplicate_row", f"{csv_name} row {line}: {name}")
        rows[name] = entries[0][1]
    return rows


def collect_items(csv_path: str, image_dir: str, manifest: Manifest, polygon_mode: str = "square",
                  data_dir: Optional[str] = None) -> List[Item]:
    """Validate one CSV's images (inside ``data_dir``, present, readable header) and annotations;
    normalise the boxes. An image whose annotation lists objects none of which is usable is
    skipped (``positive_without_usable_box``): kept, it would be a positive stored as a negative."""
    from PIL import Image

    data_dir = data_dir or os.path.dirname(os.path.abspath(csv_path))
    items = []
    for name, ann in read_csv_rows(csv_path, manifest).items():
        path, refused = resolve_listed_path(data_dir, name, [os.path.join(image_dir, name)])
        if refused:
            manifest.skip(refused, name)
            continue
        if not os.path.isfile(path):
            manifest.skip("missing_image", name)
            continue
        try:
            pixel_boxes, empty = parse_annotation(ann, polygon_mode)
        except AnnotationError as e:
            manifest.skip(f"malformed_annotation:{e.reason}", f"{name} ({e})")
            continue
        if empty:
            manifest.repair("empty_object", name)
        try:
            with Image.open(path) as im:
                width, height = im.size
        except Exception as e:
            manifest.skip("unreadable_image", f"{name} ({type(e).__name__}: {e})")
            continue
        boxes = []
        for b in pixel_boxes:
            nb, status = normalise_box(b, width, height)
            if status == "box_clipped":
                manifest.repair(status, f"{name} {tuple(round(v, 2) for v in b)}")
            elif status is not None:
                manifest.skip(status, f"{name} {tuple(round(v, 2) for v in b)}")
            if nb is not None:
                boxes.append(nb)
        if pixel_boxes and not boxes:
            manifest.skip("positive_without_usable_box", name)
            continue
        items.append(Item(name, path, boxes))
    return items


# ------------------------------------------------------------------------------------------------
# Builder
# ------------------------------------------------------------------------------------------------
@dataclass
class ObjectCXRConfig(datasets.BuilderConfig):
    """Options: ``max_size`` (longest stored side), ``split_seed``, ``polygon_box`` (square|mgca)."""

    max_size: int = 1024
    split_seed: int = 0
    polygon_box: str = "square"


class ObjectCXR(CGNSBuilder):
    """Object-CXR detection builder (see the module docstring)."""

    NAME, TASKS = NAME, TASKS
    BUILDER_CONFIG_CLASS = ObjectCXRConfig
    BUILDER_CONFIGS = [ObjectCXRConfig(name="detection", version=datasets.Version("1.0.0"))]
    DEFAULT_CONFIG_NAME = "detection"

    def _split_generators(self, dl_manager):
        cfg = self.config
        if cfg.polygon_box not in POLYGON_BOX_MODES:
            raise ValueError(f"polygon_box must be one of {POLYGON_BOX_MODES}, got {cfg.polygon_box!r}")
        data_dir = self._data_dir()
        found = sorted(os.listdir(data_dir))[:20] if os.path.isdir(data_dir) else "no such folder"
        sources = {}
        for csv_name, folder in SOURCES:
            csv_path, image_dir = os.path.join(data_dir, csv_name), os.path.join(data_dir, folder)
            if not os.path.isfile(csv_path):
                raise DatasetFormatError(f"Object-CXR: expected {csv_name} in {data_dir!r}; found: {found}")
            if not os.path.isdir(image_dir) or not os.listdir(image_dir):
                raise DatasetFormatError(f"Object-CXR: expected images in {folder}/ under {data_dir!r}; "
                                         f"found: {found}")
            sources[folder] = collect_items(csv_path, image_dir, self.manifest, cfg.polygon_box, data_dir)
        if len(sources["train"]) < 2 or not sources["dev"]:
            raise DatasetFormatError(f"Object-CXR: too few usable images in {data_dir!r}: "
                                     f"{len(sources['train'])} from train.csv, {len(sources['dev'])} from dev.csv")
        train, validation = sklearn_holdout_split(sources["train"], 0.1, cfg.split_seed)
        return self.split_generators({"train": train, "validation": validation, "test": sources["dev"]})

    def _examples(self, items):
        from PIL import Image

        for it in items:
            try:
                with Image.open(it.path) as im:
                    im.load()
                    image = im.convert("L")
            except Exception as e:  # truncated or corrupt JPEG whose header was fine
                self.manifest.skip("unreadable_image", f"{it.image_name} ({type(e).__name__}: {e})")
                continue
            yield it.image_name, {"image": png_image(image, self.config.max_size),
                                  "boxes": it.boxes, "image_id": it.image_name}


def load(data_dir=None, task: str = "detection", data_pct: float = 1.0, seed: int = 0,
         cache_dir=None, **options) -> datasets.DatasetDict:
    """Prepare (once, Arrow-cached) and load Object-CXR detection as a DatasetDict.

    ``options``: ``max_size`` (1024), ``split_seed`` (0), ``polygon_box`` (``"square"``/``"mgca"``),
    ``download_mode``, ``verbose``.
    """
    return prepare_and_load(ObjectCXR, task, data_dir, data_pct, seed, cache_dir, **options)


def main(argv=None) -> int:
    """CLI: ``python -m data_scripts.object_cxr --data_dir D --output_dir O [--task detection]``."""
    return run_cli(NAME, load, TASKS, argv, description="Prepare Object-CXR detection for CGNS.",
                   flags=[MAX_SIZE_FLAG, CliFlag.for_option("polygon_box", choices=POLYGON_BOX_MODES,
                                                            help="polygon box rule (square)")])


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = ["NAME", "TASKS", "ObjectCXR", "ObjectCXRConfig", "AnnotationError", "Item", "load", "main",
           "parse_annotation", "parse_object", "polygon_box", "normalise_box", "read_csv_rows", "collect_items"]
