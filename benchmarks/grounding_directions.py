"""Pointing game of both local cross-attention maps for a set of CGNS exports (docs/evaluation.md).

For each export matched by ``--models`` (glob patterns) and each split in ``--splits``, scores the grounding
queries (report sentences naming a drawn finding with a box, as ``cgns evaluate --task grounding`` does)
with the ``image_to_text`` map (the sentence attends to the image tokens when T~ is built) and the
``text_to_image`` map (each image token takes in the sentence when V~ is built), beside the uniform baseline,
and the sentence specificity of each (``cgns.downstream.grounding.sentence_specificity``).
This is the measurement behind the default ``--attention_direction``:

    python benchmarks/grounding_directions.py --cache_dir outputs/demo/data \\
        --models 'outputs/demo/ablation/*/seed_*/pretrain/final' 'outputs/demo/ablation/random_init/seed_*/untrained' \\
        --dataset_options num_images=2000 image_size=146 lesion_contrast_scale=3 --output_json directions.json
"""
import argparse
import glob
import json


def main(argv=None) -> dict:
    import torch

    import data_scripts
    from cgns.downstream import grounding
    from cgns.downstream.arguments import parse_option
    from cgns.downstream.embeddings import load_model_and_processor
    from modeling_cgns.modeling_cgns import ATTENTION_DIRECTIONS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True, help="export folders or glob patterns")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--splits", nargs="+", default=["validation", "test"])
    p.add_argument("--dataset_options", nargs="*", default=[])
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    paths = []
    for pattern in args.models:
        matched = sorted(glob.glob(pattern))
        if not matched:
            raise SystemExit(f"--models {pattern!r}: no such export")
        paths.extend(m for m in matched if m not in paths)
    options = dict(parse_option(item) for item in args.dataset_options)
    dataset = data_scripts.load_cgns_dataset("synthetic_cxr", task="grounding", cache_dir=args.cache_dir, **options)
    rows = []
    print("| model | split | queries | uniform (%) | "
          + " | ".join(f"{d} pointing (%) | {d} specificity (points)" for d in ATTENTION_DIRECTIONS) + " |")
    print("|---|---|---|---|" + "---|---|" * len(ATTENTION_DIRECTIONS))
    for path in paths:
        model, processor = load_model_and_processor(path)
        model.eval()
        for split in args.splits:
            row = {"model": path, "split": split}
            for direction in ATTENTION_DIRECTIONS:
                image_ids = []
                with torch.no_grad():
                    maps, boxes = grounding.report_sentence_queries(model, processor, dataset[split], args.batch_size,
                                                                    direction, grounding.new_query_counts(), image_ids)
                scores = grounding.grounding_scores(maps, boxes, resolution=processor.image_processor.image_size)
                scores.update(grounding.sentence_specificity(maps, boxes, image_ids))
                row[direction] = scores
            first = row[ATTENTION_DIRECTIONS[0]]
            rows.append(row)
            print(f"| {path} | {split} | {first['num_queries']} | {100 * first['uniform_pointing_game']:.1f} | "
                  + " | ".join(f"{100 * row[d]['pointing_game']:.1f} | {grounding.format_specificity(row[d])}"
                               for d in ATTENTION_DIRECTIONS) + " |",
                  flush=True)
    result = {"dataset_options": options, "rows": rows}
    if args.output_json:
        with open(args.output_json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
