"""Does the pipeline draw the right digit? Judge generated samples with an independent classifier.

    python benchmarks/generation.py --data-dir ../shared/data/mnist            # shipped weights
    python benchmarks/generation.py --checkpoints runs/fast --no-sweep --no-timing

Reports, for the default sampling settings of `t2i generate`: per-prompt and mean accuracy for the
prompts "zero" ... "nine"; the Frechet distance between generated and real test images in the
judge's feature space, next to the floor (real training images vs the same test images); a
diversity ratio (mean pairwise feature distance within a prompt over the same for real digits of
that class: 1 is as varied as real data, 0 is ten copies of one image); the prior on its own (cosine
similarity against the text-embedding baseline, and how widely its samples spread in CLIP space);
the wall time of `t2i generate --prompt six --num-samples 64`; and a sweep over samplers, steps, both
guidance scales and prior candidates. Writes `OUT/generation.md`, `OUT/generation.json` and
`OUT/digits.png` (ten samples of each digit). `--device cuda` samples on a GPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.judge import diversity, features_and_logits, frechet_distance, judge_accuracy, load_judge  # noqa: E402
from benchmarks.overhead import wall  # noqa: E402
from unclip.data import load_dataset  # noqa: E402
from unclip.images import grid, save_png  # noqa: E402
from unclip.images import to_uint8  # noqa: E402
from unclip.api import UnCLIPPipeline  # noqa: E402
from t2i.folders import generate_images  # noqa: E402
from unclip.checkpoint import check_fingerprint, fingerprint  # noqa: E402
from unclip.components import STAGES  # noqa: E402
from unclip.components.clip import load_clip  # noqa: E402
from unclip.components.decoder import decode  # noqa: E402
from unclip.components.prior import prior_cosine, prior_diffusion, sample_image_embeddings  # noqa: E402
from unclip.device import resolve_device  # noqa: E402
from unclip.options import SamplingOptions, load_sampling  # noqa: E402
from unclip.pipeline import Pipeline  # noqa: E402
from unclip.tokenizer import Tokenizer  # noqa: E402
from unclip.components.clip import encode_images  # noqa: E402
from unclip.zeroshot import dataset_class_names  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def draw(pipe: Pipeline, options: SamplingOptions, per_prompt: int, seed: int, prompts: list[str],
         batch_size: int = 100) -> torch.Tensor:
    """uint8 (10, per_prompt, C, H, W): samples for each class prompt ("zero" ... "nine", or "t-shirt" ...)."""
    out = []
    for k, word in enumerate(prompts):
        out.append(generate_images(UnCLIPPipeline(pipe), word, per_prompt, options, seed + k, batch_size))
    return torch.stack(out)


class Scorer:
    """Accuracy, Frechet distance and diversity of generated digits against real ones, in judge features."""

    def __init__(self, judge, data_dir, dataset: str = "mnist"):
        self.judge = judge
        self.test = load_dataset(dataset, "test", data_dir)
        self.train = load_dataset(dataset, "train", data_dir, val_size=0)
        self.references: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def real(self, data, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
        return features_and_logits(self.judge, data.images[idx])[0], data.labels[idx]

    def reference(self, n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """n real test images' features and labels, and the floor: real training images vs those test images,
        the best a generator can do. Computed once per n (every row of a sweep uses the same)."""
        if n not in self.references:
            test_feats, test_labels = self.real(self.test, n, 0)
            self.references[n] = test_feats, test_labels, frechet_distance(self.real(self.train, n, 1)[0], test_feats)
        return self.references[n]

    def __call__(self, samples: torch.Tensor) -> dict:
        """samples: uint8 (10, per_prompt, C, H, W), row k drawn for the prompt of class k."""
        n = samples.shape[0] * samples.shape[1]
        feats, logits = features_and_logits(self.judge, samples.flatten(0, 1))
        per_prompt = (logits.argmax(-1).view(samples.shape[:2]) == torch.arange(10)[:, None]).float().mean(1)
        test_feats, test_labels, floor = self.reference(n)
        per = feats.view(10, -1, feats.shape[-1])
        return {
            "per_prompt": per_prompt.tolist(), "accuracy": per_prompt.mean().item(), "min_prompt": per_prompt.min().item(),
            "frechet": frechet_distance(feats, test_feats), "frechet_floor": floor,
            "diversity_ratio": statistics.mean(diversity(per[k]) / diversity(test_feats[test_labels == k]) for k in range(10)),
        }


def decoder_alone(pipe: Pipeline, score: "Scorer", options: SamplingOptions, per_class: int, seed: int) -> dict:
    """The decoder without the prior: decode the true CLIP embeddings of real training digits (row k: digit k).
    Where this scores far better than text -> prior -> decoder, the gap is the prior's."""
    g = torch.Generator(pipe.device).manual_seed(seed)
    rows = []
    for k in range(10):
        idx = (score.train.labels == k).nonzero()[:per_class, 0]
        emb = encode_images(pipe.clip, score.train.images[idx])
        rows.append(to_uint8(decode(pipe.decoder, pipe.decoder_config, emb, options.sampler, options.steps,
                                    options.guidance, g)))
    return score(torch.stack(rows))


@torch.no_grad()
def prior_spread(pipe: Pipeline, score: "Scorer", options: SamplingOptions, per_prompt: int, seed: int,
                 prompts: list[str]) -> dict:
    """The prior alone, in CLIP space: do its samples for "zero" ... "nine" spread as widely as the true image
    embeddings of each digit? Ratio of mean distances to the class centroid (1: as varied as real digits), and
    the Frechet distance to the test embeddings next to the same for training embeddings (the floor)."""
    true = encode_images(pipe.clip, score.test.images).cpu()
    labels = score.test.labels

    def spread(e: torch.Tensor) -> float:
        return (e - e.mean(0)).norm(dim=-1).mean().item()

    sampled = []
    for k, word in enumerate(prompts):
        g = torch.Generator(pipe.device).manual_seed(seed + k)
        sampled.append(sample_image_embeddings(pipe.clip, pipe.tokenizer, pipe.prior, [word] * per_prompt,
                                               options.sampler, options.steps, options.prior_guidance, g,
                                               options.prior_candidates).cpu())
    reference = true[torch.randperm(len(true), generator=torch.Generator().manual_seed(0))[:10 * per_prompt]]
    train = encode_images(pipe.clip, score.train.images[:10 * per_prompt]).cpu()
    return {
        "spread_ratio": statistics.mean(spread(sampled[k]) / spread(true[labels == k]) for k in range(10)),
        "embedding_frechet": frechet_distance(torch.cat(sampled), reference),
        "embedding_frechet_floor": frechet_distance(train, reference),
    }


def score_prior_alone(args, prompts: list[str], judge) -> None:
    """`--prior-alone`: the prior's figures of the report (cosine against the text baseline, spread, Frechet in
    CLIP space) for a folder with clip/ and prior/ only, e.g. a `--stage prior` run; writes OUT/prior.json."""
    device = resolve_device(args.device)
    clip, clip_cfg = load_clip(args.checkpoints / "clip", device)
    net, prior_cfg = STAGES["prior"].load(args.checkpoints / "prior", clip_cfg, device)
    check_fingerprint(args.checkpoints / "prior", prior_cfg.clip_fingerprint, fingerprint(clip.state_dict()))
    pipe = SimpleNamespace(clip=clip, tokenizer=Tokenizer(clip_cfg.model.text_context), device=device,
                           prior=prior_diffusion(net, prior_cfg, device))
    options = load_sampling(args.checkpoints)
    score = Scorer(judge, args.data_dir, args.dataset)
    idx = torch.arange(1000)
    result = prior_cosine(clip, pipe.tokenizer, pipe.prior, score.test.images[idx], score.test.captions(idx, seed=0))
    result.update(prior_spread(pipe, score, options, 200, args.seed, prompts))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prior.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def timing(checkpoints: Path, runs: int = 3) -> list[float]:
    """Wall seconds of `t2i generate --prompt six --num-samples 64`, from process start to exit."""
    t2i = Path(sys.executable).parent / "t2i"
    with tempfile.TemporaryDirectory() as tmp:
        return wall([str(t2i), "generate", "--prompt", "six", "--num-samples", "64", "--checkpoints", str(checkpoints),
                     "--out", tmp], runs)


def grid_point(text: str) -> SamplingOptions:
    """SAMPLER:STEPS:GUIDANCE:CANDIDATES[:PRIOR_GUIDANCE] -> sampling options (prior guidance: the default)."""
    sampler, steps, guidance, candidates, *prior_guidance = text.split(":")
    options = SamplingOptions(sampler, int(steps), float(guidance), prior_candidates=int(candidates))
    return replace(options, prior_guidance=float(prior_guidance[0])) if prior_guidance else options


def default_grid(d: SamplingOptions) -> list[SamplingOptions]:
    """Samplers and steps at the default guidance, then the guidance knobs one at a time at the default sampler."""
    points = [replace(d, sampler="ddpm", steps=1000)]
    points += [replace(d, sampler=s, steps=k) for s, ks in (("ddim", (10, 20, 50)), ("dpmpp", (8, 10, 15, 20, 25)))
               for k in ks]
    points += [replace(d, guidance=w) for w in (1.0, 1.5, 2.0, 3.0)]
    points += [replace(d, prior_guidance=w) for w in (1.0, 1.5, 2.0, 3.0)]
    points += [replace(d, prior_candidates=c) for c in (1, 2, 4, 8)]
    return list({tuple(vars(p).values()): p for p in points}.values())  # each point once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints" / "mnist")
    ap.add_argument("--data-dir", default=None, help="folder of the dataset's IDX files")
    ap.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"], help="what the pipeline draws")
    ap.add_argument("--per-prompt", type=int, default=100)
    ap.add_argument("--sweep-per-prompt", type=int, default=30)
    ap.add_argument("--ddpm-per-prompt", type=int, default=20, help="1000-step DDPM is slow: fewer samples")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--decoder-alone", action="store_true", help="only score the decoder on true image embeddings")
    ap.add_argument("--prior-alone", action="store_true",
                    help="only score the prior, in CLIP space (CHECKPOINTS needs clip/ and prior/ only)")
    ap.add_argument("--grid", type=grid_point, nargs="*",
                    help="sweep only these SAMPLER:STEPS:GUIDANCE:CANDIDATES[:PRIOR_GUIDANCE]")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cpu", help="where to sample: cpu, cuda or auto (the timing runs t2i as is)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)

    judge = load_judge(args.data_dir, args.dataset)
    prompts = dataset_class_names(args.dataset)
    if args.prior_alone:
        return score_prior_alone(args, prompts, judge)
    pipe = Pipeline.load(args.checkpoints, args.device)
    defaults = pipe.defaults  # the library's, or the pipeline's sampling.yaml
    report: dict = {"checkpoints": str(args.checkpoints), "dataset": args.dataset, "prompts": prompts,
                    "judge_test_accuracy": judge_accuracy(args.dataset), "defaults": vars(defaults)}

    score = Scorer(judge, args.data_dir, args.dataset)
    if args.decoder_alone:
        result = decoder_alone(pipe, score, defaults, args.per_prompt, args.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decoder_alone.json").write_text(json.dumps(result, indent=2))
        print(f"decoder alone on true CLIP embeddings: accuracy {result['accuracy']:.4f}, Frechet "
              f"{result['frechet']:.2f} (floor {result['frechet_floor']:.2f}), diversity {result['diversity_ratio']:.3f}")
        return
    start = time.perf_counter()
    samples = draw(pipe, defaults, args.per_prompt, args.seed, prompts)
    report["sampling_seconds"] = time.perf_counter() - start
    report["default"] = score(samples)
    save_png(grid(samples[:, :10].flatten(0, 1), ncol=10), args.out / ("digits.png" if args.dataset == "mnist" else "samples.png"),
             scale=2)
    test = score.test

    cap_idx = torch.arange(1000)
    captions = test.captions(cap_idx, seed=0)
    report["prior"] = prior_cosine(pipe.clip, pipe.tokenizer, pipe.prior, test.images[cap_idx], captions)
    report["prior"].update(prior_spread(pipe, score, defaults, 200, args.seed, prompts))

    if not args.no_timing:
        report["generate_six_64_seconds"] = timing(args.checkpoints)

    if not args.no_sweep:
        rows = []
        grid_points = args.grid or default_grid(defaults)
        for options in grid_points:
            per = args.ddpm_per_prompt if options.sampler == "ddpm" else args.sweep_per_prompt
            t0 = time.perf_counter()
            result = score(draw(pipe, options, per, args.seed, prompts))
            seconds = time.perf_counter() - t0
            rows.append({**vars(options), "samples": 10 * per, **result, "seconds_per_64": seconds / (10 * per) * 64})
            logging.info("%s", rows[-1])
        report["sweep"] = rows

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generation.json").write_text(json.dumps(report, indent=2))
    (args.out / "generation.md").write_text(markdown(report, args))
    print((args.out / "generation.md").read_text())


def markdown(r: dict, args) -> str:
    d = r["defaults"]
    lines = [
        f"Defaults: sampler {d['sampler']}, {d['steps']} steps, guidance {d['guidance']}, "
        f"prior guidance {d['prior_guidance']}, {d['prior_candidates']} prior candidates; {args.per_prompt} samples a prompt.",
        "",
        "| prompt | " + " | ".join(r["prompts"]) + " | mean |",
        "| --- | " + " | ".join("---" for _ in r["prompts"]) + " | --- |",
        "| accuracy | " + " | ".join(f"{a:.2f}" for a in r["default"]["per_prompt"]) + f" | **{r['default']['accuracy']:.4f}** |",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| the judge's own accuracy on real test images | {r['judge_test_accuracy']:.4f} |",
        f"| judged accuracy / the judge's own | {r['default']['accuracy'] / r['judge_test_accuracy']:.4f} |",
        f"| Frechet distance, generated vs real test (judge features) | {r['default']['frechet']:.2f} |",
        f"| floor: real train vs real test, same count | {r['default']['frechet_floor']:.2f} |",
        f"| ratio to the floor | {r['default']['frechet'] / r['default']['frechet_floor']:.2f} |",
        f"| diversity ratio (generated / real, within a digit) | {r['default']['diversity_ratio']:.3f} |",
        f"| prior: cosine(sampled, true image embedding) | {r['prior']['prior_cosine']:.4f} |",
        f"| baseline: cosine(text embedding, true image embedding) | {r['prior']['text_cosine']:.4f} |",
        f"| prior: spread of its samples around each digit's centroid / real spread | {r['prior']['spread_ratio']:.3f} |",
        f"| prior: Frechet distance in CLIP space (floor: real train) | {r['prior']['embedding_frechet']:.4f} "
        f"({r['prior']['embedding_frechet_floor']:.4f}) |",
    ]
    if "generate_six_64_seconds" in r:
        t = r["generate_six_64_seconds"]
        lines.append(f"| `t2i generate --prompt six --num-samples 64`, wall s (median of {len(t)}) | {statistics.median(t):.2f} |")
    if "sweep" in r:
        lines += ["", "| sampler | steps | guidance | prior guidance | prior candidates | samples | accuracy | "
                  "worst prompt | Frechet / floor | diversity ratio | s per 64 images |", "| --- " * 11 + "|"]
        lines += [f"| {x['sampler']} | {x['steps']} | {x['guidance']} | {x['prior_guidance']} | "
                  f"{x['prior_candidates']} | {x['samples']} | "
                  f"{x['accuracy']:.4f} | {x['min_prompt']:.2f} | {x['frechet']:.1f} / {x['frechet_floor']:.1f} | "
                  f"{x['diversity_ratio']:.3f} | {x['seconds_per_64']:.2f} |" for x in r["sweep"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
