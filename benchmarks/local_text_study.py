"""Which settings let the local terms train? (issue: "the local text loss has to be able to move")

At the reference local-text temperature 1 the sentence-level InfoNCE's logits are cosines in [-1, 1],
so with N candidate sentences in a batch the loss cannot fall below about ``ln(N - 1) - 2`` nats
(the positive at cosine 1, every negative at -1). This script pretrains the demo configuration
(the packaged demo config) with the local-text temperature at the reference 1 and at 0.1, each with the
reference head initialisation (PyTorch defaults, ``head_init=pytorch``) and with N(0, 0.02)
(``head_init=normal``), and reports per run: the local text and local image losses at the start and
the end of training, the validation retrieval acc@1, and the
pointing game of the exported model on the synthetic test split (docs/evaluation.md).

    python benchmarks/local_text_study.py                       # the demo config, 4 runs
    python benchmarks/local_text_study.py --temperatures 1 0.1 --head_inits pytorch \\
        --pretrain_args --stage1_epochs 2 --stage2_epochs 0

Results: a markdown table on stdout and ``<output_dir>/local_text_study.json``; recorded in
BENCHMARKS.md.
"""
import argparse
import json
import os



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="demo", help="a packaged config by name or a JSON file")
    p.add_argument("--output_dir", default=os.path.abspath(os.path.join("outputs", "local_text_study")))
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.1])
    p.add_argument("--head_inits", nargs="+", default=["pytorch", "normal"], choices=["pytorch", "normal"])
    p.add_argument("--pretrain_args", nargs=argparse.REMAINDER, default=[])
    return p.parse_args(argv)


def first_last(records, key):
    values = [r[key] for r in records if r.get(key) is not None]
    return (values[0], values[-1]) if values else (None, None)


def main(argv=None):
    from cgns.configs import config_path, read_config
    from cgns.experiments import demo

    args = parse_args(argv)
    args.config = os.path.abspath(config_path(args.config))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    config = read_config(args.config)
    cache_dir = os.path.join(args.output_dir, "data")
    data = demo.generate_data(config, cache_dir, args.pretrain_args)
    rows = []
    for temperature in args.temperatures:
        for head_init in args.head_inits:
            name = f"t{temperature:g}_{head_init}"
            run_dir = os.path.join(args.output_dir, name)
            extra = args.pretrain_args + ["--local_text_temperature", str(temperature), "--head_init", head_init]
            export = demo.pretrain(args.config, os.path.join(run_dir, "pretrain"), cache_dir, extra, 1, False,
                                   os.path.join(run_dir, "pretrain.log"))
            files = demo.evaluate_encoder(export, os.path.join(run_dir, "evaluation"), cache_dir, data["options"])
            summary = demo.encoder_summary(files)
            train = demo.training_records(os.path.join(run_dir, "pretrain"))
            evals = demo.training_records(os.path.join(run_dir, "pretrain"), "eval")
            row = {"temperature": temperature, "head_init": head_init,
                   "local_text": first_last(train, "local_text_loss"),
                   "local_image": first_last(train, "local_image_loss"),
                   "global": first_last(train, "global_loss"),
                   "val_i2t_acc1": evals[-1].get("i2t_acc1") if evals else None,
                   "pointing_game": summary["pointing_game"], "uniform_pointing_game": summary["uniform_pointing_game"],
                   "i2t_R@1": summary["i2t_R@1"], "t2i_R@1": summary["t2i_R@1"],
                   "zero_shot_auroc": summary["zero_shot_auroc"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "local_text_study.json"), "w") as f:
        json.dump({"config": args.config, "pretrain_args": args.pretrain_args, "rows": rows}, f, indent=2)
    print("| local-text temperature | head init | local text loss first → last | local image loss first → last | "
          "global loss first → last | val i2t acc@1 | test R@1 i2t / t2i | zero-shot AUROC | pointing game (uniform) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def fl(pair):
            return "n/a" if pair[0] is None else f"{pair[0]:.2f} → {pair[1]:.2f}"
        print(f"| {r['temperature']:g} | {r['head_init']} | {fl(r['local_text'])} | {fl(r['local_image'])} | "
              f"{fl(r['global'])} | {100 * (r['val_i2t_acc1'] or 0):.1f} % | {100 * r['i2t_R@1']:.1f} / "
              f"{100 * r['t2i_R@1']:.1f} % | {100 * r['zero_shot_auroc']:.1f} | {100 * r['pointing_game']:.1f} % "
              f"({100 * r['uniform_pointing_game']:.1f} %) |")


if __name__ == "__main__":
    main()
