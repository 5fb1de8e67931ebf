"""Deterministic synthetic chest radiographs with reports and labels for every downstream task.

This is the embedded default dataset of the repository: nothing is downloaded, everything is
rendered from a seed. Each study is a square grayscale "PA chest radiograph" (uint8, default
224 px) with

* anatomy: body outline and soft tissue, two lung fields with radial vascular markings, mediastinum,
  spine, heart, posterior and anterior ribs, clavicles; patient pose (shift / rotation), body size,
  film response, exposure window, gamma, heel-effect gradient and film grain vary per image;
* findings with side / zone / size: cardiomegaly, pleural effusion (with meniscus), focal
  consolidation, bilateral peripheral lower-zone multifocal opacities ("COVID-19 pattern"),
  band-like atelectasis, perihilar edema, pneumothorax (lucent rim, no lung markings, thin pleural
  line) and small nodules, drawn with co-occurrence scenarios (heart failure, pneumonia, ...),
  and about 35 % normal studies;
* a MIMIC-like report ("FINDINGS: ... IMPRESSION: ...") written from what was drawn: several
  phrasings per finding whose side / zone / size words match the image, negations of some absent
  findings, normal statements only when true, and irrelevant sentences (technique, comparison,
  bones, a central line that *is* drawn when mentioned);
* labels: CheXpert-5 multi-label, RSNA-style binary opacity, COVIDx-style 3 classes, boxes of
  opacities and nodules (from the drawn masks), pneumothorax and opacity masks (exactly the drawn
  regions).

Conventions: images are displayed like a PA radiograph, so the patient's **right is the image
left** (x < 0.5). Coordinates are normalised to [0, 1] with pixel centres at (j + 0.5) / S.

Determinism: every study ``index`` draws from its own ``numpy.random.Generator(PCG64)`` streams
spawned from ``SeedSequence([seed, index])`` (separate streams for scenario, anatomy, lesions, text
and noise, so calibrating ``DIFFICULTY`` changes pixels but not which findings a study has or its
report). PCG64 and the draw methods used are stable across platforms; all image arithmetic is
element-wise numpy (float32 for IEEE-exact operations, float64 for transcendental functions; no
BLAS, no threads, no fonts) quantised to uint8 at the end, so an image is the same bytes on every
machine and independent of how many studies are generated.

Splits are fixed by index: the first 80 % of ``num_images`` is train, the next 10 % validation,
the rest test (``split_sizes``). The ``pretraining`` task has train and validation only (the
contract's pretraining splits); its test indices are held out so downstream test images are never
seen in pretraining.

Speed (measured on this repo's 2-core AMD EPYC dev box, one thread, 224 px, generation only,
before PNG encoding)::

    OMP_NUM_THREADS=1 python -c "import time; from data_scripts.synthetic_cxr import generate; \
        t = time.perf_counter(); n = sum(1 for _ in generate(500, 0, 224)); \
        print(n / (time.perf_counter() - t))"

gave 167 images/s when the core was free (65-70 images/s while other jobs kept the load
average at 5 on the two cores).

Calibration: all lesion contrasts and noise levels live in the module-level ``DIFFICULTY`` dict;
``DIFFICULTY["lesion_contrast_scale"]`` scales every lesion contrast at once; the load option
``lesion_contrast_scale`` (default 1.0, cached under its own config id) multiplies it for one dataset,
e.g. ``lesion_contrast_scale=3`` for easier lesions (the synthetic detection run of docs/detection.md).
"""
import hashlib
import os
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import datasets  # only the builder / load() use it; generate_study() is plain numpy

import numpy as np

from modeling_cgns.sentences import report_text, split_sentences

from .builder import CGNSBuilder, CliFlag, TaskSpec, check_options, prepare_and_load, run_cli

DATASET_NAME = "synthetic_cxr"

#: Lesion contrasts (attenuation units; lung ~0.2, soft tissue ~0.55, heart ~0.85) and noise
#: levels. Ranges are sampled uniformly per lesion. Edit here to recalibrate the difficulty.
DIFFICULTY: Dict[str, object] = {
    "lesion_contrast_scale": 1.0,  # multiplies every lesion contrast below
    "consolidation_contrast": (0.10, 0.22),
    "multifocal_contrast": (0.07, 0.15),  # COVID-19 ground-glass pattern, per blob
    "atelectasis_contrast": (0.10, 0.20),
    "nodule_contrast": (0.10, 0.22),
    "effusion_contrast": (0.20, 0.32),
    "edema_contrast": (0.05, 0.10),  # times 1 / 1.5 / 2 for small / moderate / large
    "pneumothorax_lucency": (0.04, 0.08),  # attenuation removed inside the rim
    "pleural_line_contrast": (0.05, 0.10),
    "normal_ctr": (0.40, 0.49),  # cardiothoracic ratio of normal hearts
    "cardiomegaly_ctr": {"small": (0.53, 0.57), "moderate": (0.57, 0.62), "large": (0.62, 0.68)},
    "anatomy_noise": 0.05,  # low-frequency soft-tissue thickness variation
    "texture_noise": 0.03,  # mid-frequency parenchymal texture
    "marking_contrast": (0.04, 0.07),  # radial vascular markings
    "rib_contrast": (0.05, 0.09),
    "grain_sigma": (0.015, 0.035),  # film grain, display units
    "exposure_jitter": 0.12,  # random window shift, display units
    "film_gain": (1.5, 2.6),  # I = 1 - exp(-gain * attenuation)
    "gamma": (0.8, 1.25),
    "pose_shift": 0.03,
    "pose_rotation_deg": 4.0,
    "body_scale": (0.92, 1.06),
}

#: Scenario probabilities (co-occurrence structure). "normal" studies have no finding at all.
SCENARIOS: Dict[str, float] = {
    "normal": 0.35,
    "heart_failure": 0.15,
    "pneumonia": 0.15,
    "covid": 0.10,
    "pneumothorax": 0.08,
    "other": 0.17,
}

FINDING_NAMES = ("cardiomegaly", "pleural_effusion", "consolidation", "multifocal_opacity",
                 "atelectasis", "edema", "pneumothorax", "nodule")
CHEXPERT_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
_CHEXPERT_FINDINGS = ["atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion"]
MULTICLASS_NAMES = ["normal", "pneumonia", "COVID-19"]
SIZES = ("small", "moderate", "large")
ZONES = ("upper", "mid", "lower")

# Per-lung geometry in the anatomical frame (u, v): centre, half-width, half-height. "right" is
# the patient's right lung, drawn on the image left.
_LUNGS = {"right": (0.31, 0.47, 0.165, 0.30), "left": (0.69, 0.48, 0.155, 0.29)}
_MIN_SIZE = 32
# Pixel arithmetic is float32 (half the memory traffic of float64, ~1.5x faster). Only + - * /,
# sqrt, floor, clip, min/max touch float32 arrays: these are IEEE correctly rounded, so bit-exact
# on every CPU; transcendental functions go through float64 (``_exp``). Python float scalars keep
# arrays float32 under numpy's promotion rules, so rng scalars are converted with ``float``.
_F = np.float32


# ----------------------------------------------------------------------------------------------
# small numpy helpers (all element-wise)
# ----------------------------------------------------------------------------------------------
def _ramp(x: np.ndarray) -> np.ndarray:
    """Clip to [0, 1]: a cheap soft edge (no exp) for masks defined by a signed distance."""
    return np.clip(x, 0.0, 1.0)


def _exp(x: np.ndarray) -> np.ndarray:
    """exp evaluated in float64 and rounded to float32.

    numpy picks different SIMD exp kernels per CPU; evaluating in float64 and rounding makes a
    last-ulp difference between kernels (practically) never reach the float32 result.
    """
    return np.exp(np.asarray(x, dtype=np.float64)).astype(_F)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Smooth (smoothstep-weighted bilinear) upsampling of a (g, g) grid to (size, size).

    Gathers and element-wise products only (no matmul), so it is bit-reproducible.
    """
    g = grid.shape[0]
    pos = (np.arange(size) + 0.5) / size * (g - 1)
    i0 = np.minimum(np.floor(pos).astype(np.int64), g - 2)
    w = pos - i0
    w = w * w * (3.0 - 2.0 * w)  # smoothstep hides the bilinear creases
    w0, w1 = (1.0 - w).astype(_F), w.astype(_F)
    cols = grid.astype(_F)
    cols = cols[:, i0] * w0 + cols[:, i0 + 1] * w1  # (g, size): small column gather first
    return cols[i0] * w0[:, None] + cols[i0 + 1] * w1[:, None]  # then contiguous row gathers


def _uniform(rng: np.random.Generator, lo_hi: Sequence[float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _contrast(rng: np.random.Generator, key: str) -> float:
    return _uniform(rng, DIFFICULTY[key]) * float(DIFFICULTY["lesion_contrast_scale"])


def _bbox(mask: np.ndarray) -> Optional[List[float]]:
    """Normalised [x_min, y_min, x_max, y_max] of the pixels of a bool (S, S) mask (pixel edges)."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        return None
    s = mask.shape[0]
    return [xs[0] / s, ys[0] / s, (xs[-1] + 1) / s, (ys[-1] + 1) / s]


def _rngs(seed: int, index: int) -> Dict[str, np.random.Generator]:
    """Independent per-study streams: the study depends only on (seed, index)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed} index={index}")
    children = np.random.SeedSequence([int(seed), int(index)]).spawn(5)
    names = ("scenario", "anatomy", "lesion", "text", "noise")
    return {n: np.random.Generator(np.random.PCG64(c)) for n, c in zip(names, children)}


# ----------------------------------------------------------------------------------------------
# scenario: which findings a study has (side / zone / size), before anything is drawn
# ----------------------------------------------------------------------------------------------
def _side(rng, bilateral_p: float = 0.0) -> str:
    if bilateral_p and rng.random() < bilateral_p:
        return "bilateral"
    return "right" if rng.random() < 0.5 else "left"


def _size(rng, p=(0.45, 0.35, 0.20)) -> str:
    return SIZES[int(rng.choice(3, p=p))]


def _zone(rng, p=(0.3, 0.3, 0.4)) -> str:
    return ZONES[int(rng.choice(3, p=p))]


def _sample_findings(rng: np.random.Generator) -> Tuple[str, List[dict]]:
    """Draw a scenario and its findings (list of dicts with name, side, zone, size).

    Consolidation and the multifocal (COVID) pattern never co-occur, which keeps the 3-class
    label unambiguous.
    """
    names = list(SCENARIOS)
    scenario = names[int(rng.choice(len(names), p=np.array([SCENARIOS[n] for n in names])))]
    f: List[dict] = []

    def add(name, side=None, zone=None, size=None):
        f.append({"name": name, "side": side, "zone": zone, "size": size or _size(rng)})

    if scenario == "heart_failure":
        if rng.random() < 0.85:
            add("cardiomegaly")
        if rng.random() < 0.75:
            add("edema", side="bilateral", zone="mid")
        if rng.random() < 0.7:
            add("pleural_effusion", side=_side(rng, 0.6), zone="lower")
        if rng.random() < 0.3:
            add("atelectasis", side=_side(rng, 0.4), zone="lower")
        if not f:
            add("cardiomegaly")
    elif scenario == "pneumonia":
        side = _side(rng)
        add("consolidation", side=side, zone=_zone(rng))
        if rng.random() < 0.25:
            add("pleural_effusion", side=side, zone="lower", size="small")
        if rng.random() < 0.15:
            add("atelectasis", side=_side(rng), zone=_zone(rng, (0.0, 0.4, 0.6)))
    elif scenario == "covid":
        add("multifocal_opacity", side="bilateral", zone="lower")
        if rng.random() < 0.1:
            add("atelectasis", side=_side(rng), zone="lower")
    elif scenario == "pneumothorax":
        side = _side(rng)
        add("pneumothorax", side=side, zone="upper")
        if rng.random() < 0.1:
            add("pleural_effusion", side=side, zone="lower", size="small")
        if rng.random() < 0.1:
            add("atelectasis", side=side, zone=_zone(rng, (0.0, 0.5, 0.5)))
    elif scenario == "other":
        if rng.random() < 0.35:
            add("nodule", side=_side(rng), zone=_zone(rng, (0.4, 0.35, 0.25)))
            if rng.random() < 0.2:
                add("nodule", side=_side(rng), zone=_zone(rng, (0.4, 0.35, 0.25)))
        if rng.random() < 0.35:
            add("atelectasis", side=_side(rng, 0.3), zone=_zone(rng, (0.0, 0.4, 0.6)))
        if rng.random() < 0.25:
            add("pleural_effusion", side=_side(rng, 0.3), zone="lower")
        if rng.random() < 0.25:
            add("cardiomegaly")
        if rng.random() < 0.1:
            add("edema", side="bilateral", zone="mid")
        if not f:
            add("nodule", side=_side(rng), zone=_zone(rng))
    if scenario not in ("normal", "other") and rng.random() < 0.08:
        add("nodule", side=_side(rng), zone=_zone(rng, (0.4, 0.35, 0.25)))
    # ensure at most one finding per name except nodules (which may be several)
    seen, unique = set(), []
    for item in f:
        if item["name"] != "nodule" and item["name"] in seen:
            continue
        seen.add(item["name"])
        unique.append(item)
    return scenario, unique


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------
class _Canvas:
    """Per-study geometry: pixel coords (x, y), anatomical coords (u, v) and lung fields.

    All arrays are (S, S) float64 / bool except ``x`` (1, S) and ``y`` (S, 1).
    """

    def __init__(self, size: int, rng: np.random.Generator):
        self.size = s = size
        self.x = ((np.arange(s) + 0.5) / s).astype(_F)[None, :]
        self.y = ((np.arange(s) + 0.5) / s).astype(_F)[:, None]
        shift = float(DIFFICULTY["pose_shift"])
        sx, sy = (float(t) for t in rng.uniform(-shift, shift, size=2))
        theta = float(np.deg2rad(rng.uniform(-1.0, 1.0) * float(DIFFICULTY["pose_rotation_deg"])))
        scale = _uniform(rng, DIFFICULTY["body_scale"])
        c, si = float(np.cos(theta)), float(np.sin(theta))
        dx, dy = self.x - 0.5 - sx, self.y - 0.5 - sy
        # anatomical frame: the patient's own coordinates, whatever the pose
        self.u = 0.5 + (c * dx + si * dy) / scale
        self.v = 0.5 + (-si * dx + c * dy) / scale
        self.lungs: Dict[str, dict] = {}
        for side, (cx, cy, a, b) in _LUNGS.items():
            cx = cx + rng.uniform(-0.01, 0.01)
            cy = cy + rng.uniform(-0.01, 0.01)
            a = a * rng.uniform(0.95, 1.05)
            b = b * rng.uniform(0.95, 1.05)
            self.lungs[side] = self._lung(side, cx, cy, a, b)

    def _lung(self, side: str, cx: float, cy: float, a: float, b: float) -> dict:
        """Lung field: ellipse narrowing to the apex, cut by a diaphragm dome.

        Returns dict with parameters, ``f`` (ellipse level, < 1 inside), ``hard`` (bool) and
        ``soft`` ([0, 1]) masks, ``base`` (v of the dome at the lung centre).
        """
        u, v = self.u, self.v
        lateral = -1.0 if side == "right" else 1.0  # sign of u towards the chest wall
        t = np.clip((v - cy) / b, -1.0, 1.0)
        a_v = a * (0.82 + 0.25 * t)  # narrow apex, wide base
        f = ((u - cx) / a_v) ** 2 + ((v - cy) / b) ** 2
        base = cy + 0.86 * b
        dome = base + 0.05 * ((u - cx) * lateral / a + 0.2) ** 2  # lateral costophrenic angle is lowest
        soft = _ramp((1.0 - f) / 0.12) * _ramp((dome - v) / 0.015)
        hard = (f < 1.0) & (v < dome)
        return {"side": side, "cx": cx, "cy": cy, "a": a, "b": b, "f": f, "dome": dome,
                "hard": hard, "soft": soft, "base": base, "lateral": lateral}


def _bands(phase: np.ndarray, half_width: float) -> np.ndarray:
    """Periodic smooth bumps in [0, 1], centred on half-integer ``phase``, ``half_width`` in periods.

    A cheap replacement for ``max(cos(2 pi phase), 0) ** k`` (no transcendental functions).
    """
    d = np.abs(phase - np.floor(phase) - 0.5) / half_width
    return _ramp(1.0 - d * d)


def _render_anatomy(cv: _Canvas, rng: np.random.Generator, ctr: float, catheter: bool):
    """Attenuation map (S, S) of the normal anatomy plus pieces lesions need.

    Returns (density, markings, lesion_lung) where ``markings`` is the vascular pattern (kept
    separate so a pneumothorax can remove it) and ``lesion_lung`` maps side -> bool (S, S) mask of
    lung not hidden by heart / mediastinum (where lesions are placed).
    """
    u, v, s = cv.u, cv.v, cv.size
    adu = np.abs(u - 0.5)
    # body: boxy superellipse torso with soft edges; tissue is thicker near the edges
    aw = rng.uniform(0.43, 0.49)
    bu, bv = adu / aw, (v - 0.62) / 0.62
    bu, bv = bu * bu, bv * bv
    r = bu * bu + bv * bv
    body = _ramp((1.0 - r) / 0.08)
    neck = _ramp((0.09 - adu) / 0.02) * _ramp((0.12 - v) / 0.02 + 1.0)
    body = np.maximum(body, neck)
    density = body * (0.38 + 0.10 * np.minimum(r, 1.0))
    # mediastinum, spine (vertebral bodies as faint periodic bands) and heart
    base = 0.5 * (cv.lungs["left"]["base"] + cv.lungs["right"]["base"])
    med_w = 0.055 + 0.03 * _ramp((v - 0.2) / 0.3)
    mediastinum = _ramp((med_w - adu) / 0.02) * _ramp((v - 0.06) / 0.05) * _ramp((base + 0.03 - v) / 0.03)
    # below the diaphragm: liver / abdomen, dense enough that the heart merges into it
    abdomen = _ramp((v - base - 0.01) / 0.05) * body
    spine = _ramp((0.035 - adu) / 0.008) * (0.7 + 0.3 * _bands(v / 0.055, 0.35))
    left, right = cv.lungs["left"], cv.lungs["right"]
    thorax_w = (left["cx"] + left["a"]) - (right["cx"] - right["a"])
    hw = 0.5 * ctr * thorax_w  # cardiothoracic ratio = heart width / thoracic width
    hh = 0.12 * (1.0 + 1.5 * (ctr - 0.45))
    hcx = 0.5 + 0.22 * hw  # the heart sits to the patient's left
    hcy = cv.lungs["left"]["base"] - 0.55 * hh
    hf = ((u - hcx) / hw) ** 2 + ((v - hcy) / hh) ** 2
    heart = _ramp((1.0 - hf) / 0.12)
    # lungs: air lowers attenuation, except where the heart / mediastinum lies in front
    cover = np.maximum(heart, mediastinum)
    lungs_soft = (cv.lungs["right"]["soft"] + cv.lungs["left"]["soft"]) * (1.0 - cover)
    density += 0.27 * cover + 0.04 * spine + 0.17 * abdomen - 0.25 * lungs_soft
    # hila: faint dense blobs, and radial vascular markings fanning out of them
    markings = np.zeros((s, s), dtype=_F)
    broken = _ramp(0.5 + 1.5 * _upsample(rng.standard_normal((20, 20)), s))
    mk = _uniform(rng, DIFFICULTY["marking_contrast"])
    for side, hx in (("right", 0.41), ("left", 0.59)):
        lung = cv.lungs[side]
        hy = lung["cy"] + 0.02
        ddx, ddy = u - hx, v - hy
        rr = np.sqrt(ddx * ddx + ddy * ddy)
        density += 0.06 * _ramp((0.04 - rr) / 0.03)
        # "diamond angle" in [-1, 3): a monotone, periodic (period 4) stand-in for atan2 that
        # costs a few IEEE ops instead of a slow transcendental
        t = ddy / (np.abs(ddx) + np.abs(ddy) + 1e-6)
        ang = np.where(ddx >= 0, t, 2.0 - t)
        # two sets of rays with random counts / phases: irregular, vessel-like streaks
        n1, n2 = int(rng.integers(7, 10)), int(rng.integers(3, 6))
        streak = _bands(ang * n1 + rng.random(), 0.3) * (0.3 + 0.7 * _bands(ang * n2 + rng.random(), 0.45))
        streak = streak * broken  # vessels branch and fade: break the rays into segments
        markings += mk * streak * _ramp(1.0 - rr / 0.30) * lung["soft"]
    texture = _upsample(rng.standard_normal((24, 24)), s) * float(DIFFICULTY["texture_noise"])
    markings += texture * lungs_soft
    markings *= 1.0 - cover
    # ribs: posterior ribs descend laterally, anterior ribs descend medially (periodic bands)
    cage = _ramp((0.42 - adu) / 0.03) * _ramp((v - 0.10) / 0.03) * _ramp((0.86 - v) / 0.05)
    spacing = rng.uniform(0.075, 0.085)
    post = np.sqrt(np.maximum(v + 0.12 - 1.1 * adu * adu, 0.0))  # spacing widens downwards
    ribs = _bands(post / (spacing * 1.25) - rng.uniform(0.0, 1.0), 0.32) * _ramp((adu - 0.03) / 0.03)
    am = adu - 0.1
    ant_ribs = _bands((v - 0.10 + 0.55 * am * am) / (spacing * 1.3), 0.25)
    rib_c = _uniform(rng, DIFFICULTY["rib_contrast"])
    density += cage * (rib_c * ribs + 0.4 * rib_c * ant_ribs)
    # clavicles: oblique bands from the sternal notch outwards and slightly up
    clav_y = 0.17 + rng.uniform(-0.015, 0.015) - 0.14 * (adu - 0.06)
    cd = (v - clav_y) / 0.018
    clav = _ramp(1.0 - cd * cd) * _ramp((adu - 0.05) / 0.02) * _ramp((0.33 - adu) / 0.03)
    density += 0.12 * clav
    # a right internal jugular central line, drawn only when the report mentions it
    if catheter:
        tt = _ramp(v / 0.34)
        line_u = 0.39 + 0.085 * np.sqrt(tt)
        line = _ramp(1.0 - np.abs(u - line_u) / (1.2 / s)) * (v < 0.34)
        density += 0.20 * line
    # lesions go into lung not hidden by the heart or the mediastinum
    heart_hard = hf < 1.1
    lesion_lung = {side: lung["hard"] & ~heart_hard & (adu > 0.08) for side, lung in cv.lungs.items()}
    return density, markings, lesion_lung


def _zone_mask(cv: _Canvas, lung: dict, zone: str) -> np.ndarray:
    """Bool mask of one vertical third (upper / mid / lower) of a lung field."""
    top = lung["cy"] - lung["b"]
    h = (lung["base"] - top) / 3.0
    k = ZONES.index(zone)
    return (cv.v >= top + k * h) & (cv.v < top + (k + 1) * h)


def _pick_pixel(rng, mask: np.ndarray) -> Optional[Tuple[float, float]]:
    """Centre (x, y) of a uniformly drawn True pixel of ``mask``; None if it is empty."""
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return None
    k = int(idx[int(rng.integers(len(idx)))])
    s = mask.shape[1]
    return ((k % s + 0.5) / s, (k // s + 0.5) / s)


def _blob(cv: _Canvas, rng, cx: float, cy: float, radius: float, lobes: int) -> np.ndarray:
    """Irregular blob profile in [0, 1], equal to 1 at (cx, cy): max of jittered Gaussians."""
    x, y = cv.x, cv.y

    def gauss(gx, gy, sigma):  # separable: outer product of two 1-D Gaussians (cheap)
        k = -0.5 / (sigma * sigma)
        return _exp(k * (x - gx) ** 2) * _exp(k * (y - gy) ** 2)

    p = gauss(cx, cy, 0.6 * radius)
    for _ in range(lobes - 1):
        ox, oy = (float(t) * radius for t in rng.uniform(-0.6, 0.6, size=2))
        p = np.maximum(p, gauss(cx + ox, cy + oy, rng.uniform(0.35, 0.55) * radius))
    return p


def _draw_focal(cv, rng, mask_region, radius, contrast, lobes, lung_hard, mottle, thr=0.35):
    """Draw one focal opacity centred on a random pixel of ``mask_region``.

    Returns (density (S, S), mask bool (S, S)) or None if the region is empty. The density is
    exactly zero outside the mask (``p > thr`` inside the lung), so the mask is the drawn region.
    """
    c = _pick_pixel(rng, mask_region)
    if c is None:
        return None
    radius = max(radius, 1.6 / cv.size)  # at least a few pixels at small image sizes
    p = _blob(cv, rng, c[0], c[1], radius, lobes)
    mask = (p > thr) & lung_hard
    dens = contrast * _ramp((p - thr) / 0.3) * (1.0 + mottle) * mask
    return dens, mask


def _render_findings(cv: _Canvas, rng: np.random.Generator, findings: List[dict], lesion_lung,
                     density: np.ndarray, markings: np.ndarray):
    """Draw every finding into ``density`` / ``markings`` (in place) and fill geometry fields.

    Findings that cannot be placed (empty candidate region at tiny sizes) are removed from the
    returned list, so labels and reports only ever describe what was drawn. Returns
    (kept findings, boxes, box_labels, box_findings, pneumothorax mask, opacity mask) where
    ``box_findings[k]`` is the index in the kept list of the finding box k outlines.
    """
    s = cv.size
    u, v = cv.u, cv.v
    kept, boxes, box_labels, box_findings = [], [], [], []
    ptx_mask = np.zeros((s, s), dtype=bool)
    opa_mask = np.zeros((s, s), dtype=bool)
    size_k = {"small": 0, "moderate": 1, "large": 2}
    mottle = _upsample(rng.standard_normal((16, 16)), s) * 0.25
    for fd in findings:
        name, side, zone, k = fd["name"], fd["side"], fd["zone"], size_k[fd["size"]]
        sides = ["right", "left"] if side == "bilateral" else [side]
        ok = True
        if name == "cardiomegaly":
            pass  # drawn by the anatomy (heart width from the cardiothoracic ratio)
        elif name == "pleural_effusion":
            c = _contrast(rng, "effusion_contrast")
            for sd in sides:
                lung = cv.lungs[sd]
                h = lung["b"] * rng.uniform(*((0.22, 0.32), (0.32, 0.48), (0.48, 0.65))[k])
                lat = np.maximum((u - lung["cx"]) * lung["lateral"] / lung["a"], 0.0)
                top = lung["base"] - h - 0.08 * lat ** 2  # meniscus: fluid climbs the chest wall
                # fluid fills the lung field (slightly beyond it: the pleural space) below ``top``
                inside = _ramp((1.1 - lung["f"]) / 0.1) * _ramp((lung["dome"] + 0.015 - v) / 0.015)
                density += c * _ramp((v - top) / 0.04) * inside
        elif name in ("consolidation", "nodule"):
            lung = cv.lungs[sides[0]]
            zone_m = _zone_mask(cv, lung, zone)
            inner = lesion_lung[sides[0]] & zone_m & (lung["f"] < 0.7)
            if name == "consolidation":
                radius = rng.uniform(*((0.035, 0.05), (0.05, 0.07), (0.07, 0.095))[k])
                out = _draw_focal(cv, rng, inner, radius, _contrast(rng, "consolidation_contrast"), 4,
                                  lesion_lung[sides[0]], mottle)
            else:
                radius = rng.uniform(*((0.008, 0.013), (0.013, 0.019), (0.019, 0.026))[k])
                out = _draw_focal(cv, rng, inner, radius, _contrast(rng, "nodule_contrast"), 1,
                                  lesion_lung[sides[0]], 0.0, thr=0.45)
                fd["mm"] = int(round(2 * radius * 380))  # a ~380 mm wide field of view
            if out is None:
                ok = False
            else:
                dens, m = out
                density += dens
                boxes.append(_bbox(m))
                box_labels.append("opacity" if name == "consolidation" else "nodule")
                box_findings.append(len(kept))
                if name == "consolidation":
                    opa_mask |= m
        elif name == "multifocal_opacity":
            n_blobs = 0
            for sd in sides:
                lung = cv.lungs[sd]
                lat = (u - lung["cx"]) * lung["lateral"] / lung["a"]
                region = lesion_lung[sd] & _zone_mask(cv, lung, "lower") & (lat > 0.3) & (lung["f"] < 0.9)
                for _ in range(int(rng.integers(2, 4))):
                    radius = rng.uniform(*((0.03, 0.045), (0.045, 0.06), (0.06, 0.075))[k])
                    out = _draw_focal(cv, rng, region, radius, _contrast(rng, "multifocal_contrast"), 3,
                                      lesion_lung[sd], mottle)
                    if out is None:
                        continue
                    dens, m = out
                    density += dens
                    boxes.append(_bbox(m))
                    box_labels.append("opacity")
                    box_findings.append(len(kept))
                    opa_mask |= m
                    n_blobs += 1
            ok = n_blobs > 0
        elif name == "atelectasis":
            c = _contrast(rng, "atelectasis_contrast")
            drawn = 0
            for sd in sides:
                lung = cv.lungs[sd]
                region = lesion_lung[sd] & _zone_mask(cv, lung, zone) & (lung["f"] < 0.6)
                ctr = _pick_pixel(rng, region)
                if ctr is None:
                    continue
                half = rng.uniform(*((0.03, 0.05), (0.05, 0.07), (0.07, 0.09))[k])
                thick = max(rng.uniform(0.006, 0.012) * (1 + 0.3 * k), 1.0 / s)
                phi = float(np.deg2rad(rng.uniform(-25, 25)))
                cp, sp = float(np.cos(phi)), float(np.sin(phi))
                along = (cv.x - ctr[0]) * cp + (cv.y - ctr[1]) * sp
                across = (cv.y - ctr[1]) * cp - (cv.x - ctr[0]) * sp
                band = _ramp(1.0 - (across / thick) ** 2) * _ramp(1.0 - (along / half) ** 2)
                density += c * band * lesion_lung[sd]
                drawn += 1
            ok = drawn > 0
        elif name == "edema":
            c = _contrast(rng, "edema_contrast") * (1.0, 1.5, 2.0)[k]
            for sd, hx in (("right", 0.40), ("left", 0.60)):
                lung = cv.lungs[sd]
                haze = _exp(-((u - hx) / 0.13) ** 2 - ((v - lung["cy"] - 0.03) / 0.17) ** 2)
                density += c * haze * lung["soft"]
            markings *= 0.7  # vessels blur into the haze
        elif name == "pneumothorax":
            lung = cv.lungs[side]
            w = rng.uniform(*((0.02, 0.035), (0.035, 0.06), (0.06, 0.09))[k])
            w = max(w, 2.5 / s)
            # collapsed lung: chest-wall edge moves medially by w, apex down by ~1.3 w
            cx2 = lung["cx"] - lung["lateral"] * 0.5 * w
            a2 = lung["a"] - 0.5 * w
            cy2 = lung["cy"] + 0.65 * w
            b2 = lung["b"] - 0.65 * w
            t2 = np.clip((v - cy2) / b2, -1.0, 1.0)
            f2 = ((u - cx2) / (a2 * (0.82 + 0.25 * t2))) ** 2 + ((v - cy2) / b2) ** 2
            lat_or_up = ((u - cx2) * lung["lateral"] > 0) | (v < cy2)
            region = lung["hard"] & (f2 >= 1.0) & lat_or_up & (v < lung["base"] - 0.02)
            if not region.any():
                ok = False
            else:
                region_f = region.astype(_F)
                density -= _contrast(rng, "pneumothorax_lucency") * region_f
                markings *= 1.0 - region_f  # no lung markings beyond the pleural line
                # thin visceral pleural line on the collapsed lung edge (about one pixel)
                grad = 2.0 / a2
                line = _ramp(1.0 - np.abs(f2 - 1.0) / (grad / s))
                line = line * (f2 < 1.0) * lat_or_up * lung["hard"]
                density += _contrast(rng, "pleural_line_contrast") * line
                ptx_mask |= region
        if ok:
            kept.append(fd)
    return kept, boxes, box_labels, box_findings, ptx_mask, opa_mask


def _expose(density: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Film response, random window / gamma / heel gradient and grain -> uint8 (S, S).

    The window is drawn per image so that mean brightness says little about the findings.
    """
    s = density.shape[0]
    gain = _uniform(rng, DIFFICULTY["film_gain"])
    img = 1.0 - np.exp(-gain * np.maximum(density, 0.0).astype(np.float64))  # float64 from here on
    lo_ref, hi_ref = 0.0, 1.0 - np.exp(-gain * 1.3)  # air outside the body is black
    jit = float(DIFFICULTY["exposure_jitter"])
    lo = lo_ref + rng.uniform(-jit, jit) * (hi_ref - lo_ref)
    hi = hi_ref + rng.uniform(-jit, jit) * (hi_ref - lo_ref)
    img = np.clip((img - lo) / (hi - lo), 0.0, 1.0) ** _uniform(rng, DIFFICULTY["gamma"])
    heel = rng.uniform(-0.05, 0.05)
    img = img + heel * ((np.arange(s) + 0.5) / s - 0.5)[:, None]
    # grain: triangular noise (sum of two uniforms) with the requested standard deviation; ~4x
    # cheaper than Gaussian draws and indistinguishable after quantisation
    sigma = _uniform(rng, DIFFICULTY["grain_sigma"]) * np.sqrt(6.0)
    img = img + (rng.random((s, s), dtype=_F) + rng.random((s, s), dtype=_F) - 1.0) * sigma
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# report writing
# ----------------------------------------------------------------------------------------------
_SEVERITY = {"small": "mild", "moderate": "moderate", "large": "severe"}
_EXTENT = {"small": "mild", "moderate": "moderate", "large": "extensive"}
_ATEL = {"small": "minimal", "moderate": "mild", "large": "moderate"}

#: Words whose presence in a sentence means the sentence talks about a finding (used by tests).
KEYWORDS = {
    "cardiomegaly": ("cardiomegaly", "enlarge"),
    "pleural_effusion": ("effusion",),
    "consolidation": ("consolidation",),
    "multifocal_opacity": ("peripheral",),
    "atelectasis": ("atelecta",),
    "edema": ("edema",),
    "pneumothorax": ("pneumothorax",),
    "nodule": ("nodul",),
}
#: The size word every positive sentence of a finding carries, per size.
SIZE_WORDS = {
    "cardiomegaly": _SEVERITY, "edema": _SEVERITY, "multifocal_opacity": _EXTENT, "atelectasis": _ATEL,
    "pleural_effusion": {s: s for s in SIZES}, "consolidation": {s: s for s in SIZES},
    "pneumothorax": {s: s for s in SIZES}, "nodule": {s: s for s in SIZES},
}


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _location(rng, side: str, zone: str) -> str:
    """Anatomical location phrase whose side and zone words match the drawn position."""
    if zone == "mid":
        opts = [f"{side} mid lung", f"{side} mid zone",
                "right middle lobe" if side == "right" else "lingula"]
    elif zone == "upper":
        opts = [f"{side} upper lobe", f"{side} upper zone", f"{side} upper lung"]
    else:
        opts = [f"{side} lower lobe", f"{side} lung base", f"{side} lower zone"]
    return opts[int(rng.integers(len(opts)))]


def _choose(rng, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _positive(rng, fd: dict) -> Tuple[str, str]:
    """(findings-section sentence, short impression sentence) for one drawn finding."""
    name, side, zone = fd["name"], fd["side"], fd["zone"]
    sw = SIZE_WORDS[name][fd["size"]]
    if name == "cardiomegaly":
        long = _choose(rng, [f"{_cap(sw)} cardiomegaly.", f"The heart is {sw}ly enlarged.",
                             f"{_cap(sw)} enlargement of the cardiac silhouette."])
        return long, f"{_cap(sw)} cardiomegaly."
    if name == "pleural_effusion":
        if side == "bilateral":
            long = _choose(rng, [f"{_cap(sw)} bilateral pleural effusions.",
                                 f"There are {sw} bilateral pleural effusions.",
                                 f"{_cap(sw)} bilateral basilar effusions with blunting of the costophrenic "
                                 f"angles."])
            return long, f"{_cap(sw)} bilateral pleural effusions."
        long = _choose(rng, [f"{_cap(sw)} {side} pleural effusion.",
                             f"There is a {sw} {side} pleural effusion.",
                             f"{_cap(sw)} {side} basilar effusion with a meniscus."])
        return long, f"{_cap(sw)} {side} pleural effusion."
    if name == "consolidation":
        loc = _location(rng, side, zone)
        long = _choose(rng, [f"{_cap(sw)} focal consolidation in the {loc}.",
                             f"There is a {sw} area of consolidation in the {loc}, concerning for pneumonia.",
                             f"{_cap(sw)} consolidation in the {loc}, compatible with pneumonia in the "
                             f"correct clinical setting."])
        return long, f"{_cap(sw)} {loc} consolidation, concerning for pneumonia."
    if name == "multifocal_opacity":
        long = _choose(rng, [f"{_cap(sw)} bilateral peripheral patchy opacities in the lower lungs.",
                             f"{_cap(sw)} multifocal peripheral ground-glass opacities at both lung bases.",
                             f"There are {sw} peripheral patchy opacities in both lower zones."])
        return long, (f"{_cap(sw)} bilateral peripheral lower lung opacities, which can be seen with viral "
                      f"pneumonia including COVID-19.")
    if name == "atelectasis":
        if side == "bilateral":
            long = _choose(rng, [f"{_cap(sw)} bibasilar atelectasis.",
                                 f"{_cap(sw)} linear atelectasis at both lung bases."])
            return long, f"{_cap(sw)} bibasilar atelectasis."
        loc = _location(rng, side, zone)
        long = _choose(rng, [f"{_cap(sw)} linear atelectasis in the {loc}.",
                             f"{_cap(sw)} plate-like atelectasis in the {loc}.",
                             f"{_cap(sw)} band-like opacity in the {loc}, likely subsegmental atelectasis."])
        return long, f"{_cap(sw)} {loc} atelectasis."
    if name == "edema":
        long = _choose(rng, [f"{_cap(sw)} pulmonary edema.",
                             f"{_cap(sw)} interstitial edema with perihilar haziness.",
                             f"Perihilar haziness consistent with {sw} pulmonary edema."])
        return long, f"{_cap(sw)} pulmonary edema."
    if name == "pneumothorax":
        long = _choose(rng, [f"{_cap(sw)} {side} pneumothorax.",
                             f"There is a {sw} {side} apical pneumothorax.",
                             f"{_cap(sw)} {side} pneumothorax with a visible pleural line."])
        return long, f"{_cap(sw)} {side} pneumothorax."
    if name == "nodule":
        loc = _location(rng, side, zone)
        long = _choose(rng, [f"{_cap(sw)} {fd['mm']} mm nodule in the {loc}.",
                             f"There is a {sw} nodule measuring {fd['mm']} mm in the {loc}."])
        return long, f"{_cap(sw)} {loc} nodule, recommend CT for further evaluation."
    raise ValueError(name)


_NEGATIONS = {
    "pneumothorax": ["No pneumothorax.", "There is no pneumothorax."],
    "pleural_effusion": ["No pleural effusion.", "There is no pleural effusion."],
    "consolidation": ["No focal consolidation.", "There is no focal consolidation."],
    "edema": ["No pulmonary edema.", "There is no pulmonary edema."],
    "nodule": ["No suspicious pulmonary nodules."],
}
_TECHNIQUE = ["PA and lateral views of the chest.", "PA and lateral chest radiographs were obtained.",
              "Single frontal view of the chest."]
_COMPARISON = ["Comparison is made to the prior radiograph.",
               "No prior studies are available for comparison.",
               "Compared with the previous study, the patient has been repositioned."]
_BONES = ["Osseous structures are unremarkable.", "Mild degenerative changes of the thoracic spine.",
          "No acute osseous abnormality."]
_CATHETER = ["Right internal jugular central venous catheter terminates in the mid SVC.",
             "A right IJ line ends at the cavoatrial region."]

# Sentence meanings (the clustering's ground truth, docs/clustering.md "Ground truth"): a coarse meaning
# is the finding(s) a sentence states with their polarity ("pleural_effusion+", "pneumothorax-"), or,
# for a sentence that states no finding, the statement it makes ("lungs_clear", "technique_pa_lateral");
# the fine meaning adds side / zone / size to a positive finding. Phrasings of one statement share it.
_NORMAL_MEANINGS = {
    "Heart size is normal.": "cardiomegaly-",
    "The cardiomediastinal silhouette is within normal limits.": "cardiomegaly-",
    "Cardiac and mediastinal contours are normal.": "cardiomegaly-",
    "The lungs are clear.": "lungs_clear",
    "The lungs are well expanded and clear.": "lungs_clear",
    "No pleural effusion or pneumothorax.": "pleural_effusion-,pneumothorax-",
    "No acute cardiopulmonary process.": "no_acute_process",
    "No acute intrathoracic abnormality.": "no_acute_process",
    "PA and lateral views of the chest.": "technique_pa_lateral",
    "PA and lateral chest radiographs were obtained.": "technique_pa_lateral",
    "Single frontal view of the chest.": "technique_frontal",
    "Comparison is made to the prior radiograph.": "comparison_prior",
    "No prior studies are available for comparison.": "comparison_none",
    "Compared with the previous study, the patient has been repositioned.": "comparison_repositioned",
    "Osseous structures are unremarkable.": "bones_normal",
    "No acute osseous abnormality.": "bones_normal",
    "Mild degenerative changes of the thoracic spine.": "bones_degenerative",
}
_NORMAL_MEANINGS.update({t: "catheter" for t in _CATHETER})
_NORMAL_MEANINGS.update({t: f"{name}-" for name, texts in _NEGATIONS.items() for t in texts})


def positive_meaning(fd: dict) -> Tuple[str, str]:
    """(coarse, fine) meaning of a sentence that states drawn finding ``fd``."""
    coarse = f"{fd['name']}+"
    parts = [coarse] + [str(fd[k]) for k in ("side", "zone", "size") if fd.get(k) is not None]
    return coarse, "|".join(parts)


def statement_meaning(text: str) -> str:
    """Meaning of a written sentence that states no drawn finding (a negation, a normal statement, technique,
    comparison, bones, a line); a ``ValueError`` for text the generator does not write."""
    try:
        return _NORMAL_MEANINGS[text]
    except KeyError:
        raise ValueError(f"synthetic report: no meaning for sentence {text!r}") from None


def _write_report(rng: np.random.Generator, findings: List[dict], catheter: bool
                  ) -> Tuple[str, str, List[Tuple[str, int]]]:
    """(findings section text, impression section text, written sentences) describing exactly ``findings``.

    The written sentences are ``(text, finding index)`` pairs in ``report_text`` order (impression
    items first, then the findings section); the index points into ``findings`` for a sentence
    that names a drawn finding and is -1 otherwise. Tagging draws nothing from ``rng``.
    """
    present = {f["name"] for f in findings}
    lung_findings = present - {"cardiomegaly"}
    body, impression = [], []
    body_tags, impression_tags = [], []
    if rng.random() < 0.6:
        body.append(_choose(rng, _TECHNIQUE))
    if rng.random() < 0.5:
        body.append(_choose(rng, _COMPARISON))
    if catheter:
        body.append(_choose(rng, _CATHETER))
    order = sorted(range(len(findings)), key=lambda i: FINDING_NAMES.index(findings[i]["name"]))
    for i in order:
        long, short = _positive(rng, findings[i])
        body.append(long)
        impression.append(short)
        body_tags.append((len(body) - 1, i))
        impression_tags.append(i)
    if "cardiomegaly" not in present and rng.random() < 0.8:
        body.append(_choose(rng, ["Heart size is normal.",
                                  "The cardiomediastinal silhouette is within normal limits.",
                                  "Cardiac and mediastinal contours are normal."]))
    if not lung_findings:
        body.append(_choose(rng, ["The lungs are clear.", "The lungs are well expanded and clear."]))
    # "no focal consolidation" is not said next to multifocal opacities (true, but confusing)
    absent = [n for n in _NEGATIONS
              if n not in present and not (n == "consolidation" and "multifocal_opacity" in present)]
    if "pleural_effusion" in absent and "pneumothorax" in absent and rng.random() < 0.5:
        body.append("No pleural effusion or pneumothorax.")
        absent = [n for n in absent if n not in ("pleural_effusion", "pneumothorax")]
    for n in absent:
        if rng.random() < 0.6:
            body.append(_choose(rng, _NEGATIONS[n]))
    if rng.random() < 0.4:
        body.append(_choose(rng, _BONES))
    if not impression:
        impression = [_choose(rng, ["No acute cardiopulmonary process.",
                                    "No acute intrathoracic abnormality."])]
    if len(impression) > 1:
        imp = " ".join(f"{i + 1}. {t}" for i, t in enumerate(impression))
    else:
        imp = impression[0]
    tag_of_body = dict(body_tags)
    impression_tags += [-1] * (len(impression) - len(impression_tags))
    written = list(zip(impression, impression_tags)) + [(t, tag_of_body.get(k, -1)) for k, t in enumerate(body)]
    return " ".join(body), imp, written


def _written_meanings(written: List[Tuple[str, int]], findings: List[dict]) -> List[Tuple[str, str]]:
    """(coarse, fine) meaning of every written sentence (see ``positive_meaning`` / ``statement_meaning``)."""
    out = []
    for text, tag in written:
        if tag >= 0:
            out.append(positive_meaning(findings[tag]))
        else:
            meaning = statement_meaning(text)
            out.append((meaning, meaning))
    return out


def _sentence_findings(written: List[Tuple[str, int]], sentences: List[str], values: Optional[list] = None
                       ) -> list:
    """Finding index (or the given per-written-sentence ``values``) of each sentence of
    ``split_sentences(text)``, from the written sentences.

    Each written sentence is split on its own; the pieces concatenate to the split of the whole
    text because written sentences end at a full stop (checked: a mismatch is a generator bug).
    """
    tags: list = []
    for k, (text, tag) in enumerate(written):
        tags += [tag if values is None else values[k]] * len(split_sentences(text))
    if len(tags) != len(sentences):
        raise RuntimeError(f"synthetic report: {len(tags)} tagged sentences for {len(sentences)} split sentences")
    return tags


# ----------------------------------------------------------------------------------------------
# public pure-Python API
# ----------------------------------------------------------------------------------------------
def split_sizes(n: int) -> Dict[str, int]:
    """Fixed 80 / 10 / 10 split sizes of ``n`` studies: validation and test get ``n // 10`` each,
    train the rest (so the sizes always add up to ``n``)."""
    n_val = n // 10
    n_test = n // 10
    return {"train": n - n_val - n_test, "validation": n_val, "test": n_test}


def split_of(index: int, n: int) -> str:
    """Split of study ``index`` among ``n``: indices are in train, then validation, then test order."""
    sz = split_sizes(n)
    if index < sz["train"]:
        return "train"
    if index < sz["train"] + sz["validation"]:
        return "validation"
    return "test"


def generate_study(index: int, seed: int = 0, image_size: int = 224, lesion_contrast_scale: float = 1.0) -> dict:
    """Render study ``index`` of the synthetic dataset with generator ``seed``.

    ``lesion_contrast_scale`` multiplies every lesion contrast (``DIFFICULTY``) for this study; the
    random draws are the same, so only the lesions' intensity changes (findings, report, masks and boxes
    are those of the default: a mask is a threshold of the blob's shape, not of its contrast).

    Returns a dict with
      ``image``: uint8 (S, S); ``study_id``: str;
      ``findings``: list of dicts (name, side, zone, size[, mm]) actually drawn; ``scenario``: str;
      ``findings_text`` / ``impression_text``: section bodies; ``report``: the full report with
      "FINDINGS:" / "IMPRESSION:" headers; ``text``: ``report_text(impression, findings)``;
      ``sentences``: ``split_sentences(text)``; ``sentence_findings``: per sentence, the index in
      ``findings`` of the drawn finding it names, or -1; ``sentence_boxes``: per sentence, the
      boxes of that finding (empty for sentences without a boxed finding);
      ``sentence_meanings`` / ``sentence_meanings_fine``: per sentence, its coarse meaning (finding(s) and
      polarity, or the statement: ``positive_meaning`` / ``statement_meaning``) and its fine meaning (with
      side / zone / size for a positive finding);
      ``chexpert``: float32 (5,) in ``CHEXPERT_LABELS`` order; ``opacity``: float32 (1,);
      ``multiclass``: int index into ``MULTICLASS_NAMES``;
      ``boxes``: float32 (K, 4) normalised [x_min, y_min, x_max, y_max]; ``box_labels``: K str
      ("opacity" / "nodule"); ``box_findings``: K indices into ``findings``;
      ``pneumothorax_mask`` / ``opacity_mask``: uint8 (S, S) with 0 / 255.
    """
    image_size = int(image_size)
    if image_size < _MIN_SIZE:
        raise ValueError(f"image_size must be >= {_MIN_SIZE}, got {image_size}")
    if not float(lesion_contrast_scale) > 0:
        raise ValueError(f"lesion_contrast_scale must be > 0, got {lesion_contrast_scale}")
    if float(lesion_contrast_scale) != 1.0:
        base = DIFFICULTY["lesion_contrast_scale"]
        DIFFICULTY["lesion_contrast_scale"] = float(base) * float(lesion_contrast_scale)
        try:
            return generate_study(index, seed, image_size)
        finally:
            DIFFICULTY["lesion_contrast_scale"] = base
    rngs = _rngs(seed, index)
    scenario, findings = _sample_findings(rngs["scenario"])
    catheter = bool(rngs["scenario"].random() < 0.15)
    sizes = {f["name"]: f["size"] for f in findings}
    arng = rngs["anatomy"]
    cv = _Canvas(image_size, arng)
    ctr_range = (DIFFICULTY["cardiomegaly_ctr"][sizes["cardiomegaly"]] if "cardiomegaly" in sizes
                 else DIFFICULTY["normal_ctr"])
    ctr = _uniform(arng, ctr_range)
    density, markings, lesion_lung = _render_anatomy(cv, arng, ctr, catheter)
    soft_noise = _upsample(arng.standard_normal((6, 6)), image_size) * float(DIFFICULTY["anatomy_noise"])
    findings, boxes, box_labels, box_findings, ptx, opa = _render_findings(cv, rngs["lesion"], findings,
                                                                           lesion_lung, density, markings)
    density += markings + soft_noise * (density > 0.05)
    image = _expose(density, rngs["noise"])

    findings_text, impression_text, written = _write_report(rngs["text"], findings, catheter)
    text = report_text(impression_text, findings_text)
    sentences = split_sentences(text)
    sentence_findings = _sentence_findings(written, sentences)
    meanings = _sentence_findings(written, sentences, _written_meanings(written, findings))
    present = {f["name"] for f in findings}
    chexpert = np.array([float(n in present) for n in _CHEXPERT_FINDINGS], dtype=np.float32)
    has_opacity = "consolidation" in present or "multifocal_opacity" in present
    multiclass = 2 if "multifocal_opacity" in present else 1 if "consolidation" in present else 0
    return {
        "index": int(index),
        "study_id": f"synth-{int(seed)}-{int(index):06d}",
        "image": image,
        "scenario": scenario,
        "findings": findings,
        "catheter": catheter,
        "findings_text": findings_text,
        "impression_text": impression_text,
        "report": f"FINDINGS: {findings_text}\n\nIMPRESSION: {impression_text}",
        "text": text,
        "sentences": sentences,
        "sentence_findings": sentence_findings,
        "sentence_meanings": [m[0] for m in meanings],
        "sentence_meanings_fine": [m[1] for m in meanings],
        "chexpert": chexpert,
        "opacity": np.array([float(has_opacity)], dtype=np.float32),
        "multiclass": multiclass,
        "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
        "box_labels": box_labels,
        "box_findings": box_findings,
        "sentence_boxes": [[[float(v) for v in boxes[k]] for k in range(len(boxes)) if box_findings[k] == tag]
                           if tag >= 0 else [] for tag in sentence_findings],
        "pneumothorax_mask": ptx.astype(np.uint8) * 255,
        "opacity_mask": opa.astype(np.uint8) * 255,
    }


def generate(n: int, seed: int = 0, image_size: int = 224, start: int = 0) -> Iterator[dict]:
    """Yield ``generate_study(i, seed, image_size)`` for i in [start, start + n)."""
    for i in range(start, start + n):
        yield generate_study(i, seed, image_size)


def study_digest(study: dict) -> str:
    """sha256 over a study's image bytes, report and labels (for determinism checks)."""
    h = hashlib.sha256()
    h.update(study["image"].tobytes())
    h.update(study["report"].encode())
    h.update(study["chexpert"].tobytes())
    h.update(study["boxes"].tobytes())
    h.update(study["pneumothorax_mask"].tobytes())
    h.update(study["opacity_mask"].tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# datasets builder (docs/data_contract.md)
# ----------------------------------------------------------------------------------------------
TASKS: Dict[str, TaskSpec] = {
    "pretraining": TaskSpec("pretraining", (), None),
    "classification": TaskSpec("multi_label_classification", tuple(CHEXPERT_LABELS), "auroc"),
    "classification_binary": TaskSpec("multi_label_classification", ("Lung Opacity",), "auroc"),
    "classification_multiclass": TaskSpec("single_label_classification", tuple(MULTICLASS_NAMES), "accuracy"),
    "detection": TaskSpec("detection", ("opacity_or_nodule",), "map"),
    "segmentation": TaskSpec("segmentation", ("pneumothorax",), "dice"),
    "segmentation_opacity": TaskSpec("segmentation", ("opacity",), "dice"),
    "grounding": TaskSpec("grounding", ("opacity_or_nodule",), "pointing_game"),
}


def _row(task: str, st: dict) -> dict:
    """One dataset row of ``task`` from a generated study."""
    if task == "pretraining":
        return {"image": st["image"], "report": st["text"], "sentences": st["sentences"],
                "study_id": st["study_id"], "sentence_meanings": st["sentence_meanings"],
                "sentence_meanings_fine": st["sentence_meanings_fine"]}
    row = {"image": st["image"], "image_id": st["study_id"]}
    if task == "classification":
        row["labels"] = st["chexpert"].tolist()
    elif task == "classification_binary":
        row["labels"] = st["opacity"].tolist()
    elif task == "classification_multiclass":
        row["labels"] = st["multiclass"]
    elif task == "detection":
        row["boxes"] = st["boxes"].tolist()
    elif task == "segmentation":
        row["mask"] = st["pneumothorax_mask"]
    elif task == "segmentation_opacity":
        row["mask"] = st["opacity_mask"]
    elif task == "grounding":
        row["sentences"] = st["sentences"]
        row["sentence_boxes"] = st["sentence_boxes"]
        row["sentence_meanings"] = st["sentence_meanings"]
        row["sentence_meanings_fine"] = st["sentence_meanings_fine"]
    return row


MEANING_TASKS = ("pretraining", "grounding")


def meaning_features() -> Dict[str, object]:
    """The ground-truth meaning columns of the pretraining and grounding rows (one string per sentence)."""
    return {"sentence_meanings": datasets.List(datasets.Value("string")),
            "sentence_meanings_fine": datasets.List(datasets.Value("string"))}


class SyntheticCXRConfig(datasets.BuilderConfig):
    """BuilderConfig with the generator options: ``num_images``, ``image_size``, ``generator_seed``,
    ``lesion_contrast_scale``."""

    def __init__(self, num_images: int = 2000, image_size: int = 224, generator_seed: int = 0,
                 lesion_contrast_scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.num_images = int(num_images)
        self.image_size = int(image_size)
        self.generator_seed = int(generator_seed)
        self.lesion_contrast_scale = float(lesion_contrast_scale)


class SyntheticCXR(CGNSBuilder):
    """Builder of the synthetic chest X-ray dataset, one config per task (``TASKS``)."""

    NAME, TASKS = DATASET_NAME, TASKS
    NEEDS_DATA_DIR = False
    BUILDER_CONFIG_CLASS = SyntheticCXRConfig
    # 1.1.0: the pretraining and grounding rows carry sentence meanings
    BUILDER_CONFIGS = [SyntheticCXRConfig(name=t, version=datasets.Version("1.1.0" if t in MEANING_TASKS else "1.0.0"))
                       for t in TASKS]
    DEFAULT_CONFIG_NAME = "pretraining"
    DEFAULT_WRITER_BATCH_SIZE = None  # the datasets default: rows are small
    VERSION = datasets.Version("1.0.0")

    def _info(self):
        info = super()._info()
        if self.config.name in MEANING_TASKS:
            info.features = datasets.Features({**info.features, **meaning_features()})
        return info

    def _split_generators(self, dl_manager):
        n = self.config.num_images
        sz = split_sizes(n)
        bounds = {"train": (0, sz["train"]), "validation": (sz["train"], sz["train"] + sz["validation"]),
                  "test": (sz["train"] + sz["validation"], n)}
        # pretraining: train + validation only (contract); test studies stay unseen for downstream
        splits = ["train", "validation"] + ([] if self.config.name == "pretraining" else ["test"])
        return self.split_generators({s: range(*bounds[s]) for s in splits})

    def _examples(self, indices: range):
        cfg = self.config
        for i in indices:
            yield i, _row(cfg.name, _cached_study(i, cfg.generator_seed, cfg.image_size, cfg.lesion_contrast_scale))


# Preparing several tasks of the same studies in one process (the demo prepares pretraining,
# classification and grounding) renders each study once: a study is a pure function of
# (index, seed, size, contrast), and the rows built from it do not modify it. Bounded by bytes.
_STUDY_CACHE: "OrderedDict[tuple, dict]" = OrderedDict()
_STUDY_CACHE_BYTES = [0]
STUDY_CACHE_LIMIT_BYTES = 256 * 2 ** 20


def _study_bytes(study: dict) -> int:
    return sum(v.nbytes for v in study.values() if isinstance(v, np.ndarray))


def _cached_study(index: int, seed: int, image_size: int, lesion_contrast_scale: float) -> dict:
    key = (int(index), int(seed), int(image_size), float(lesion_contrast_scale))
    study = _STUDY_CACHE.get(key)
    if study is not None:
        _STUDY_CACHE.move_to_end(key)
        return study
    study = generate_study(index, seed, image_size, lesion_contrast_scale)
    size = _study_bytes(study)
    if size <= STUDY_CACHE_LIMIT_BYTES:
        _STUDY_CACHE[key] = study
        _STUDY_CACHE_BYTES[0] += size
        while _STUDY_CACHE_BYTES[0] > STUDY_CACHE_LIMIT_BYTES:
            _, old = _STUDY_CACHE.popitem(last=False)
            _STUDY_CACHE_BYTES[0] -= _study_bytes(old)
    return study


def _config_id(task: str, num_images: int, image_size: int, generator_seed: int,
               lesion_contrast_scale: float = 1.0) -> str:
    # the default keeps the ids (and caches) of datasets prepared before the option existed
    contrast = "" if float(lesion_contrast_scale) == 1.0 else f"-c{float(lesion_contrast_scale):g}"
    return f"{task}-n{int(num_images)}-s{int(image_size)}-seed{int(generator_seed)}{contrast}"


# The 224 px protocol resizes to 256 before its crops; pretraining renders at that size (as mimic_cxr stores
# 256 px), so a `cgns prepare synthetic_cxr` folder is the one `cgns pretrain` reads.
PRETRAINING_IMAGE_SIZE = 256


def default_image_size(task: str) -> int:
    """The rendered side when ``image_size`` is not given: 256 for ``pretraining``, 224 otherwise."""
    return PRETRAINING_IMAGE_SIZE if task == "pretraining" else 224


def _cache_root(cache_dir: Optional[str]) -> str:
    return cache_dir if cache_dir is not None else os.path.join(os.path.expanduser("~"), ".cache", "cgns")


def load(data_dir=None, task: str = "classification", data_pct: float = 1.0, seed: int = 0,
         cache_dir: Optional[str] = None, num_images: int = 2000, image_size: Optional[int] = None,
         generator_seed: int = 0, lesion_contrast_scale: float = 1.0, download_mode=None, verbose: bool = True,
         force_prepare: bool = False, verify: str = "quick", max_failed_share: Optional[float] = None,
         **options) -> "datasets.DatasetDict":
    """Build (or reuse) the synthetic dataset for ``task`` and return its DatasetDict.

    ``data_dir`` is ignored (nothing is read); any other option is an error, as for the real
    builders (a mistyped ``num_image=50`` would otherwise silently give 2000 studies). Data is
    cached under ``<cache_dir or ~/.cache/cgns>/synthetic_cxr/`` in a config id that encodes
    num_images / image_size / generator_seed; ``manifest.json`` goes to ``<...>/synthetic_cxr/<task>/``.
    ``force_prepare`` regenerates it; ``verify`` is the check of a reused cache (``prepare_and_load``).
    ``data_pct`` subsamples the train split only (``subsample_train(dd, data_pct, seed)``). ``image_size``
    defaults to ``default_image_size(task)``.
    """
    check_options(DATASET_NAME, SyntheticCXR, options)
    if image_size is None:
        image_size = default_image_size(task)
    if task in TASKS and int(num_images) < 10:
        raise ValueError(f"num_images must be >= 10 (80/10/10 splits), got {num_images}")
    if not float(lesion_contrast_scale) > 0:
        raise ValueError(f"lesion_contrast_scale must be > 0, got {lesion_contrast_scale}")
    return prepare_and_load(SyntheticCXR, task, None, data_pct, seed, _cache_root(cache_dir),
                            download_mode=download_mode, verbose=verbose, force_prepare=force_prepare,
                            verify=verify, max_failed_share=max_failed_share,
                            config_id=_config_id(task, num_images, image_size, generator_seed,
                                                 lesion_contrast_scale),
                            num_images=int(num_images), image_size=int(image_size),
                            generator_seed=int(generator_seed), lesion_contrast_scale=float(lesion_contrast_scale))


def _save_png(array: np.ndarray, path: str) -> None:
    from PIL import Image as PILImage

    PILImage.fromarray(array, mode="L").save(path)


def _write_samples(args, options) -> None:
    """``run_cli`` hook: the first ``--num_samples`` studies (image, non-empty masks, report) as
    files in ``output_dir/samples``, generated with the options the data was prepared with."""
    n, seed, size = (int(options.get(k, d)) for k, d in (("num_images", 2000), ("generator_seed", 0),
                                                          ("image_size", 224)))
    sample_dir = os.path.join(args.output_dir, "samples")
    os.makedirs(sample_dir, exist_ok=True)
    for st in generate(min(args.num_samples, n), seed, size):
        stem = os.path.join(sample_dir, st["study_id"])
        _save_png(st["image"], stem + ".png")
        if st["pneumothorax_mask"].any():
            _save_png(st["pneumothorax_mask"], stem + "_pneumothorax.png")
        if st["opacity_mask"].any():
            _save_png(st["opacity_mask"], stem + "_opacity.png")
        with open(stem + ".txt", "w") as f:
            f.write(st["report"] + "\n")
    print(f"samples: {sample_dir}")


def main(argv: Optional[List[str]] = None) -> int:
    """CLI (``data_scripts.builder.run_cli``): prepare the data, print rows per split and label
    balance, write the manifest and a few sample studies (PNG + report) to ``output_dir/samples``."""
    flags = [CliFlag.for_option("num_images", type=int, help="number of studies (2000)"),
             CliFlag.for_option("image_size", type=int, help="image side in px (224; pretraining 256)"),
             CliFlag.for_option("generator_seed", type=int, help="generator seed (0)"),
             CliFlag("--num_samples", None, dict(type=int, default=6, help="studies saved as samples/"))]
    return run_cli(DATASET_NAME, load, TASKS, argv, description=__doc__.splitlines()[0], needs_data_dir=False,
                   flags=flags, after=_write_samples)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "DIFFICULTY", "SCENARIOS", "FINDING_NAMES", "CHEXPERT_LABELS", "MULTICLASS_NAMES", "KEYWORDS",
    "SIZE_WORDS", "TASKS", "MEANING_TASKS", "meaning_features", "positive_meaning", "statement_meaning",
    "SyntheticCXR", "SyntheticCXRConfig", "generate_study", "generate", "PRETRAINING_IMAGE_SIZE",
    "default_image_size",
    "study_digest", "split_sizes",
    "split_of", "load", "main",
]
