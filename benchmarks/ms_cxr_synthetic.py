"""Write synthetic studies in MS-CXR's published layout, to run the MS-CXR grounding command without PhysioNet data.

Every report sentence of a synthetic study (``data_scripts.synthetic_cxr.generate_study``) that names a drawn
finding with a box becomes MS-CXR rows (one per box: ``dicom_id, category_name, label_text, path, x, y, w, h,
image_width, image_height, split``, pixels, top-left corner + extent) in ``<out>/ms_cxr/
MS_CXR_Local_Alignment_v1.1.0.csv``; the images go into a MIMIC-CXR-JPG tree ``<out>/mimic`` (``files/p<xx>/
p<subject>/s<study>/<dicom_id>.jpg`` + ``mimic-cxr-2.0.0-metadata.csv``). Studies are drawn from ``--start``
on, so with a start past the pretraining set's ``num_images`` none of them was seen in pretraining.
The numbers in docs/evaluation.md ("Phrase grounding on MS-CXR") were measured with:

    python benchmarks/ms_cxr_synthetic.py --output_dir runs/ms_cxr_synthetic --num_studies 200 --start 100000 \\
        --image_size 128 --lesion_contrast_scale 3
    cgns evaluate --task grounding --dataset ms_cxr --data_dir runs/ms_cxr_synthetic/ms_cxr \\
        --dataset_options mimic_cxr_dir=runs/ms_cxr_synthetic/mimic --model EXPORT --random_init_baseline \\
        --output_dir runs/ms_cxr_synthetic/grounding
"""
import argparse
import csv
import os

from PIL import Image

COLUMNS = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height",
           "split"]


def write_layout(output_dir: str, num_studies: int, start: int, image_size: int, lesion_contrast_scale: float,
                 seed: int = 0) -> dict:
    """Writes the two folders; returns ``{"ms_cxr", "mimic", "rows", "phrases"}``."""
    from data_scripts.ms_cxr import CSV_FILES
    from data_scripts.synthetic_cxr import generate_study

    ms_cxr, mimic = os.path.join(output_dir, "ms_cxr"), os.path.join(output_dir, "mimic")
    os.makedirs(ms_cxr, exist_ok=True)
    os.makedirs(mimic, exist_ok=True)
    rows, metadata, phrases = [], [], 0
    for index in range(start, start + num_studies):
        study = generate_study(index, seed, image_size, lesion_contrast_scale=lesion_contrast_scale)
        subject, study_id, dicom = f"{10000000 + index}", f"{50000000 + index}", f"synth{index:08d}"
        named = [(s, study["findings"][tag]["name"], boxes)
                 for s, tag, boxes in zip(study["sentences"], study["sentence_findings"], study["sentence_boxes"])
                 if boxes]
        if not named:
            continue
        folder = os.path.join(mimic, "files", f"p{subject[:2]}", f"p{subject}", f"s{study_id}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(study["image"]).save(os.path.join(folder, f"{dicom}.jpg"), quality=95)
        metadata.append([dicom, subject, study_id, "PA"])
        for sentence, finding, boxes in named:
            phrases += 1
            for x0, y0, x1, y1 in boxes:
                rows.append([dicom, finding.replace("_", " ").capitalize(), sentence,
                             f"files/p{subject[:2]}/p{subject}/s{study_id}/{dicom}.dcm",
                             round(x0 * image_size), round(y0 * image_size), round((x1 - x0) * image_size),
                             round((y1 - y0) * image_size), image_size, image_size, "test"])
    with open(os.path.join(ms_cxr, CSV_FILES["1.1.0"]), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    with open(os.path.join(mimic, "mimic-cxr-2.0.0-metadata.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dicom_id", "subject_id", "study_id", "ViewPosition"])
        writer.writerows(metadata)
    return {"ms_cxr": ms_cxr, "mimic": mimic, "rows": len(rows), "phrases": phrases}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_studies", type=int, default=200)
    p.add_argument("--start", type=int, default=100000, help="first study index (past the pretraining set)")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--lesion_contrast_scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="the generator seed (synthetic_cxr's generator_seed)")
    args = p.parse_args(argv)
    out = write_layout(args.output_dir, args.num_studies, args.start, args.image_size, args.lesion_contrast_scale,
                       args.seed)
    print(f"{out['phrases']} phrases, {out['rows']} boxes: --data_dir {out['ms_cxr']} "
          f"--dataset_options mimic_cxr_dir={out['mimic']}")
    return out


if __name__ == "__main__":
    main()
