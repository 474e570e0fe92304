"""Few-step sampling: distilled decoders (or priors) against their teacher, judged like the shipped weights.

    python benchmarks/distill.py --data-dir ../shared/data/mnist --distilled runs/mnist-distill runs/mnist-distill2
    python benchmarks/distill.py --data-dir ../shared/data/mnist --stage prior --distilled runs/mnist-prior2

Rows, each 100 samples a prompt ("zero" ... "nine"), the same seeds, each pipeline with its own default sampling
(`t2i generate`'s): the teacher (`--teacher`, the shipped pipeline by default); the teacher's `--stage` with
plain DDIM in N steps on the trailing chain a distilled network uses, at the teacher's guidance (what the
distillation starts from, and what it has to beat); then each distilled pipeline. Targets (issue 14): judged
accuracy >= 0.99 and Frechet <= 1.5x the default's. Writes OUT/distill.md and OUT/distill.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.generation import Scorer, draw  # noqa: E402
from benchmarks.judge import load_judge  # noqa: E402
from unclip.pipeline import Pipeline  # noqa: E402
from unclip.zeroshot import dataset_class_names  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def steps(pipe: Pipeline, stage: str) -> int:
    """The network calls a chain of `stage` makes with the pipeline's default sampling (a distilled one's own)."""
    return len(getattr(pipe, stage).timesteps(pipe.defaults.sampler, pipe.defaults.steps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="mnist")
    ap.add_argument("--distilled", nargs="*", default=[], help="pipeline folders written by t2i distill")
    ap.add_argument("--stage", choices=["decoder", "prior"], default="decoder", help="the stage distilled")
    ap.add_argument("--ddim-steps", type=int, nargs="*", default=[16, 4, 2], help="undistilled trailing DDIM rows")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--per-prompt", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distill")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    score = Scorer(load_judge(args.data_dir, "mnist"), args.data_dir, "mnist")
    prompts = dataset_class_names("mnist")
    teacher = Pipeline.load(args.teacher, "cpu")
    chains = lambda pipe: ", ".join(f"{stage} {steps(pipe, stage)} steps" for stage in ("prior", "decoder"))  # noqa: E731
    cases = [(f"teacher `{args.teacher}`, default ({teacher.defaults.sampler}; {chains(teacher)})", teacher)]
    cases += [(f"teacher, {args.stage} DDIM {n} steps (trailing), not distilled",
               replace(teacher, **{args.stage: replace(getattr(teacher, args.stage), distilled_steps=n)}))
              for n in args.ddim_steps]
    cases += [(f"distilled `{folder}` ({chains(pipe)})", pipe)
              for folder, pipe in ((folder, Pipeline.load(folder, "cpu")) for folder in args.distilled)]
    rows = []
    for name, pipe in cases:
        start = time.perf_counter()
        result = score(draw(pipe, pipe.defaults, args.per_prompt, args.seed, prompts))
        seconds = time.perf_counter() - start
        rows.append({"name": name, f"{args.stage}_steps": steps(pipe, args.stage), **result,
                     "seconds_per_64": seconds / (10 * args.per_prompt) * 64})
        logging.info("%s", rows[-1])
    base = rows[0]["frechet"]
    lines = [f"`python benchmarks/distill.py --teacher {args.teacher} --stage {args.stage} --distilled "
             f"{' '.join(args.distilled)}` ({args.per_prompt} samples a prompt; Frechet floor {rows[0]['frechet_floor']:.2f})",
             "", f"| pipeline | {args.stage} steps | accuracy | worst prompt | Frechet | / default's | diversity | "
             "s per 64 images |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['name']} | {r[f'{args.stage}_steps']} | {r['accuracy']:.4f} | {r['min_prompt']:.2f} | {r['frechet']:.2f} | "
              f"{r['frechet'] / base:.2f} | {r['diversity_ratio']:.3f} | {r['seconds_per_64']:.2f} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill.json").write_text(json.dumps(rows, indent=2))
    (args.out / "distill.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
