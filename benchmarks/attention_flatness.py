"""How local is a CGNS export's sentence -> image attention? Statistics of the grounding maps.

For the grounding queries of a split (report sentences naming a drawn finding with a box, as
``cgns evaluate --task grounding`` uses them) prints the mean attention map over the grid, its standard
deviation over queries, the most frequent arg-max cells and the cells the box centres fall in. A flat map (every
cell near sigmoid(0) = 0.5, a small spread) means the pointing game measures a tilt, not localisation.

    python benchmarks/attention_flatness.py --model outputs/demo/cgns/pretrain/final \\
        --cache_dir outputs/demo/data --dataset_options num_images=2000 image_size=146 lesion_contrast_scale=3
"""
import argparse
import collections
import json

import numpy as np


def main(argv=None) -> dict:
    import data_scripts
    from cgns.downstream import grounding
    from cgns.downstream.arguments import parse_option
    from cgns.downstream.embeddings import load_model_and_processor
    from modeling_cgns.modeling_cgns import ATTENTION_DIRECTIONS, DEFAULT_ATTENTION_DIRECTION

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--direction", default=DEFAULT_ATTENTION_DIRECTION, choices=ATTENTION_DIRECTIONS)
    p.add_argument("--dataset_options", nargs="*", default=[])
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    options = dict(parse_option(item) for item in args.dataset_options)
    split = data_scripts.load_cgns_dataset("synthetic_cxr", task="grounding", cache_dir=args.cache_dir,
                                           **options)[args.split]
    model, processor = load_model_and_processor(args.model)
    maps, boxes = grounding.report_sentence_queries(model, processor, split, 32, args.direction,
                                                    grounding.new_query_counts())
    stack = np.stack([np.asarray(m, dtype=np.float64) for m in maps])
    grid = stack.shape[1]
    argmax = collections.Counter(int(np.argmax(m)) for m in stack)
    centres = collections.Counter()
    for query_boxes in boxes:
        for x0, y0, x1, y1 in np.asarray(query_boxes).reshape(-1, 4):
            row = min(grid - 1, int((y0 + y1) / 2 * grid))
            col = min(grid - 1, int((x0 + x1) / 2 * grid))
            centres[row * grid + col] += 1
    result = {"queries": len(maps), "grid": grid, "mean_map": stack.mean(0).round(4).tolist(),
              "std_over_queries": stack.std(0).round(4).tolist(),
              "min": float(stack.min()), "max": float(stack.max()),
              "argmax_cells": argmax.most_common(), "box_centre_cells": centres.most_common()}
    print(json.dumps(result, indent=1))
    if args.output_json:
        with open(args.output_json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
