"""Issue 44's measures of the latent stage on emoji at 64 px.

    python benchmarks/latent.py --data-dir ../shared/data/emoji --autoencoder runs/emoji/ae
    python benchmarks/latent.py --data-dir ../shared/data/emoji --arms
    python benchmarks/latent.py --data-dir ../shared/data/emoji --steps-sweep runs/emoji/latent runs/emoji/latent-flow

--autoencoder: reconstruction of the test split (every image the emoji contract holds out of training, so never
seen by the autoencoder): PSNR over the [0, 1] range, and the emoji evaluator's judge (benchmarks/emoji.py, cached)
on the originals and on their reconstructions: thing (top-1 among all identities), style and tone.

--arms: the cost of each decoder route at the sizes configs/emoji.yaml trains, in this process on one thread: the
seconds of a training step (forward, backward, AdamW) at batch 64 and of sampling 16 images with the library's
default steps (classifier-free guided: two branches a step), the autoencoder's decoding or the upsampler's chain
included. A flow-matching arm costs what its eps/v twin does (the same network and step), so it is one row each.

--steps-sweep: whether a pipeline (a flow-matching decoder against its v twin, say) keeps its quality in fewer
sampling steps: the emoji evaluator's seen prompts (--prompts, 4 images each) drawn at each of --steps, with the
pipeline's other defaults; the judge's thing and style rates and the Frechet distance to the real images they are
drawn from. Writes OUT/latent.json and OUT/latent.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.emoji import SIZE, judged, load_judge  # noqa: E402
from unclip.config import AutoencoderModelConfig, DecoderModelConfig, UpsamplerModelConfig, load_yaml  # noqa: E402
from unclip.data.emoji import STYLES, held_out_rules, rendered  # noqa: E402
from unclip.images import to_float, to_uint8  # noqa: E402
from unclip.models.autoencoder import Autoencoder, psnr  # noqa: E402

log = logging.getLogger(__name__)
BATCH, SAMPLES = 64, 16


@torch.no_grad()
def reconstruct(autoencoder: Autoencoder, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """uint8 images -> uint8 reconstructions through the autoencoder's latents."""
    return torch.cat([to_uint8(autoencoder.reconstruct(to_float(images[i:i + batch])))
                      for i in range(0, len(images), batch)])


def autoencoder_report(data_dir: Path, folder: Path, judge_epochs: int) -> dict:
    from unclip.components import STAGES

    emoji, images = rendered(data_dir, SIZE)
    test = [i for i, rule in enumerate(held_out_rules(emoji)) if rule is not None]
    autoencoder, cfg = STAGES["autoencoder"].load(folder, None, torch.device("cpu"))
    if cfg.model.image_size != SIZE:
        raise SystemExit(f"{folder} encodes {cfg.model.image_size} px images; this measures {SIZE} px")
    originals = images[test]
    rebuilt = reconstruct(autoencoder, originals)
    judge, things = load_judge(emoji, images, judge_epochs)
    index = {t: i for i, t in enumerate(things)}
    truth = [torch.tensor(v) for v in ([index[emoji[i].identity] for i in test], [STYLES.index(emoji[i].style) for i in test],
                                      [emoji[i].tone for i in test])]
    read = {}
    for name, x in (("originals", originals), ("reconstructions", rebuilt)):
        _, *said = judged(judge, x)
        read[name] = {k: round((s == y).float().mean().item(), 4) for k, s, y in zip(("thing", "style", "tone"), said, truth)}
    scores = psnr(to_float(rebuilt), to_float(originals))
    return {"autoencoder": str(folder), "test_images": len(test), "psnr": round(scores.mean().item(), 2),
            "psnr_p10": round(scores.quantile(0.1).item(), 2), "latent": [cfg.model.latent_channels, autoencoder.latent_size,
                                                                       autoencoder.latent_size],
            "parameters": sum(p.numel() for p in autoencoder.parameters()), "judge": read}


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def arms(config: Path, repeats: int) -> list[dict]:
    """Per route: seconds of a training step at batch 64 and of drawing 16 images (default steps, guided)."""
    from unclip.config import merge
    from unclip.diffusion.process import Diffusion
    from unclip.models.unet import UNet
    from unclip.models.upsampler import Upsampler
    from unclip.options import SamplingOptions

    torch.set_num_threads(1)
    recipe = load_yaml(config)
    decoder = merge(DecoderModelConfig(), recipe.get("decoder", {}).get("model", {}))
    ae_cfg = merge(AutoencoderModelConfig(), recipe.get("autoencoder", {}).get("model", {}))
    autoencoder = Autoencoder(ae_cfg).eval()
    options, embed = SamplingOptions(), 128
    routes = {  # name: (the decoder's model config, what turns its drawing into 64 px)
        "pixel 64": (merge(decoder, {"image_size": SIZE, "image_channels": 3}), None),
        "cascade 32 -> 64": (merge(decoder, {"image_size": 32, "image_channels": 3}), "upsampler"),
        "latent 16x16x4": (merge(decoder, {"image_size": autoencoder.latent_size, "image_channels": ae_cfg.latent_channels,
                                           "patch": 1, "latent": True}), "autoencoder"),
    }
    upsampler_cfg = merge(UpsamplerModelConfig(), {"image_channels": 3, "low_size": 32})
    upsampler = Diffusion.build(Upsampler(upsampler_cfg).eval(), upsampler_cfg, torch.device("cpu"), clip_x0=1.0)
    rows = []
    for name, (m, finish) in routes.items():
        net = UNet(m, embed)
        diffusion = Diffusion.build(net, m, torch.device("cpu"))
        opt = torch.optim.AdamW(net.parameters(), 1e-4)
        x0 = torch.randn(BATCH, m.image_channels, m.image_size, m.image_size)
        emb = torch.nn.functional.normalize(torch.randn(BATCH, embed), dim=-1)

        def step():
            loss = diffusion.loss(x0, (emb,), 0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()

        net.eval()
        g = torch.Generator().manual_seed(0)

        @torch.no_grad()
        def draw():
            noise = torch.randn(SAMPLES, m.image_channels, m.image_size, m.image_size, generator=g)
            x = diffusion.sample(options.sampler, diffusion.denoiser((emb[:SAMPLES],), 3.0), noise, options.steps,
                                 generator=g)
            if finish == "autoencoder":
                autoencoder.decode(x)
            elif finish == "upsampler":
                low = torch.nn.functional.interpolate(x, size=SIZE, mode="bilinear")
                s = torch.zeros(SAMPLES, dtype=torch.long)
                upsampler.sample(options.sampler, upsampler.denoiser((low, s), 1.0), torch.randn_like(low),
                                 options.upsampler_steps)

        net.train()
        train_s = seconds(step, repeats)
        rows.append({"route": name, "network": f"{m.image_channels}x{m.image_size}x{m.image_size}, patch {m.patch}",
                     "train_step_s": round(train_s, 3), "sample_16_s": round(seconds(draw, 1), 2)})
        log.info("%s: %.3f s a step, %.2f s for 16 images", name, train_s, rows[-1]["sample_16_s"])
    return rows


def steps_sweep(data_dir: Path, pipelines: list[Path], steps: list[int], prompts: int, judge_epochs: int) -> list[dict]:
    from dataclasses import replace

    from benchmarks.emoji import generate, prompt_sets, rates, seen_images
    from benchmarks.judge import frechet_distance
    from unclip.options import sampling_options
    from unclip.pipeline import Pipeline

    emoji, images = rendered(data_dir, SIZE)
    judge, things = load_judge(emoji, images, judge_epochs)
    seen = prompt_sets(emoji, prompts)["seen"]
    reference = judged(judge, images[seen_images(emoji, held_out_rules(emoji))])[0]
    rows = []
    for folder in pipelines:
        pipe = Pipeline.load(folder, "cpu")
        defaults = sampling_options(pipe.defaults)
        for n in steps:
            start = time.perf_counter()
            drawn = generate(pipe, [p.text for p in seen], 4, replace(defaults, steps=n))
            f, thing, style, tone = judged(judge, drawn)
            rows.append({"pipeline": str(folder), "steps": n, **rates([p for p in seen for _ in range(4)], thing, style, tone,
                                                                      things),
                         "fd": round(frechet_distance(f, reference), 3), "minutes": round((time.perf_counter() - start) / 60, 2)})
            log.info("%s", rows[-1])
    return rows


def markdown(report: dict) -> str:
    lines = ["# The latent stage (benchmarks/latent.py)", ""]
    if "autoencoder" in report:
        a = report["autoencoder"]
        lines += [f"Autoencoder `{a['autoencoder']}` ({a['parameters']:,} parameters, latents {'x'.join(map(str, a['latent']))}) "
                  f"on the {a['test_images']:,} test images: PSNR {a['psnr']} dB (10th percentile {a['psnr_p10']}).", "",
                  "| judged | thing | style | tone |", "| --- | --- | --- | --- |"]
        lines += [f"| {k} | {v['thing']} | {v['style']} | {v['tone']} |" for k, v in a["judge"].items()]
        lines.append("")
    if "arms" in report:
        lines += [f"Routes, one thread ({report['machine']}): a training step at batch {BATCH}, and {SAMPLES} images with "
                  "the default steps.", "", "| route | network | training step (s) | 16 images (s) |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['route']} | {r['network']} | {r['train_step_s']} | {r['sample_16_s']} |" for r in report["arms"]]
        lines.append("")
    if "steps_sweep" in report:
        lines += ["Seen prompts (4 images each) drawn in fewer sampling steps, the pipelines' other defaults:", "",
                  "| pipeline | steps | thing | style | Frechet distance | minutes |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['pipeline']} | {r['steps']} | {r['thing']} | {r['style']} | {r['fd']} | {r['minutes']} |"
                  for r in report["steps_sweep"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, help="the emoji folder (../shared/data/emoji)")
    ap.add_argument("--autoencoder", type=Path, help="an autoencoder folder to measure on the test split")
    ap.add_argument("--arms", action="store_true", help="time each decoder route's training step and sampling")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "emoji.yaml", help="the recipe the routes take sizes from")
    ap.add_argument("--repeats", type=int, default=5, help="timed training steps a route")
    ap.add_argument("--steps-sweep", type=Path, nargs="+", default=[], help="emoji pipelines to draw in fewer steps")
    ap.add_argument("--steps", default="2,4,10", help="--steps-sweep: the sampling steps, comma-separated")
    ap.add_argument("--prompts", type=int, default=100, help="--steps-sweep: seen prompts")
    ap.add_argument("--judge-epochs", type=int, default=32, help="epochs of the emoji judge (cached per value)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latent")
    args = ap.parse_args(argv)
    if args.autoencoder is None and not args.arms and not args.steps_sweep:
        ap.error("give --autoencoder DIR, --arms or --steps-sweep DIR...")
    if (args.autoencoder is not None or args.steps_sweep) and args.data_dir is None:
        ap.error("--autoencoder and --steps-sweep need --data-dir")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report: dict = {}
    if args.autoencoder is not None:
        report["autoencoder"] = autoencoder_report(args.data_dir, args.autoencoder, args.judge_epochs)
    if args.arms:
        import platform

        report["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
        report["arms"] = arms(args.config, args.repeats)
    if args.steps_sweep:
        steps = [int(n) for n in args.steps.split(",")]
        report["steps_sweep"] = steps_sweep(args.data_dir, args.steps_sweep, steps, args.prompts, args.judge_epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latent.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "latent.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
