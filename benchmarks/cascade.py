"""DALL-E 2's cascade against one 64x64 decoder trained for the same wall time, on the scenes data.

    python benchmarks/cascade.py --data-dir ../shared/data/mnist --minutes 30
    python benchmarks/cascade.py --data-dir DIR --minutes 360 --device cuda --out benchmarks/results/cascade-6h

Both arms train from scratch on the same machine, data, batch and learning rate, and share the shipped scenes
pipeline's CLIP, prior and layout stage, so only how the image is drawn differs:

- **cascade**: configs/scenes.yaml's base decoder (32x32) for `--base-share` of the minutes, then its upsampler
  (32 -> 64, reading neither caption nor CLIP) for the rest;
- **one 64x64 decoder**: the same decoder with a level of its own at 32x32 in front, as wide as the next (patch 2,
  widths 64, 64, 128), so its 16x16 and 8x8 levels, their text cross-attention, its embedding width (4 times the
  first level's) and everything else are the base decoder's, for all of them.

Each run's steps are set from its training step (forward, backward, AdamW at the config's batch) timed here
first, so that it takes about its share; each run's real wall time is read back from its metrics.jsonl. Then
benchmarks/scenes.py scores, at the same sampling (configs/scenes.yaml's `sampling:`, the undistilled decoder's:
guidance 3, prior guidance 3, 10 DPM-Solver++ steps, the upsampler's 3), the base alone (enlarged bilinearly),
the cascade and the 64x64 decoder, `--prompts` a task. Writes OUT/cascade.json and OUT/cascade.md; the runs are
kept in OUT/runs (a run already finished there is not trained again).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import seconds_per_call, training_step  # noqa: E402
from t2i.stages.runs import read_metrics  # noqa: E402
from unclip.checkpoint import WEIGHTS_FILE, resolve_folder  # noqa: E402
from unclip.config import DecoderConfig, UpsamplerConfig, load_yaml, merge, stage_section  # noqa: E402
from unclip.data.scenes import COLOURS  # noqa: E402
from unclip.models.unet import UNet  # noqa: E402
from unclip.models.upsampler import Upsampler  # noqa: E402
from unclip.components.decoder import decoder_condition, decoder_diffusion  # noqa: E402
from unclip.components.upsampler import upsampler_diffusion  # noqa: E402
from unclip.layouts import no_layout  # noqa: E402

# the 64x64 decoder: configs/scenes.yaml's (patch 2, widths 64, 128 at 16x16 and 8x8, cross-attention at both) with a
# level at 32x32 in front, as wide as the next (widths [32, 64, 128] would also narrow the embedding, 4 x widths[0]);
# its text levels move up one with it
SINGLE_64 = {"image_size": 64, "widths": [64, 64, 128], "text_levels": [1, 2]}
LAYOUT_FIELDS = [10, len(COLOURS)]  # digit, colour: what the scenes data sets


def step_seconds(kind: str, raw: dict, model: dict, device: torch.device, repeats: int = 4) -> float:
    """Seconds of one training step (forward, backward, AdamW at the config's batch) of the config's decoder
    (`model` over its `model:`) or upsampler, with conditions of the real shapes: 16 caption tokens, layouts."""
    torch.manual_seed(0)
    if kind == "upsampler":
        cfg = merge(UpsamplerConfig(), stage_section(raw, "upsampler"))
        cfg.model.image_channels, cfg.model.low_size = 3, 32
        net = Upsampler(cfg.model)
        diffusion, size = upsampler_diffusion(net, cfg, device), cfg.model.image_size
        B = cfg.train.batch_size
        cond = (torch.randn(B, 3, size, size), torch.randint(0, 300, (B,)))
    else:
        cfg = merge(DecoderConfig(), stage_section(raw, "decoder"))
        cfg = merge(cfg, {"model": {**model, "image_channels": 3, "layout_fields": LAYOUT_FIELDS}})
        clip = stage_section(raw, "clip")["model"]
        net = UNet(cfg.model, clip["embed_dim"], text_width=clip["text_width"])
        diffusion, size = decoder_diffusion(net, cfg, device), cfg.model.image_size
        B = cfg.train.batch_size
        text = (torch.randn(B, 16, clip["text_width"]), torch.ones(B, 16, dtype=torch.bool))
        cond = decoder_condition(cfg, torch.randn(B, clip["embed_dim"]), text, no_layout(B, LAYOUT_FIELDS, size, device))
    net = net.to(device, memory_format=torch.channels_last)
    x = torch.randn(B, 3, size, size).to(device, memory_format=torch.channels_last)
    cond = tuple(c.to(device) for c in cond)
    step = training_step(diffusion, x, cond, torch.optim.AdamW(net.parameters(), 1e-3))
    return seconds_per_call(step, repeats, device, warmup=2)


def planned_steps(seconds: dict[str, float], minutes: float, base_share: float) -> dict[str, int]:
    """Each run's steps from its step's seconds: the base decoder `base_share` of the minutes, the upsampler the
    rest, the 64x64 decoder all of them."""
    budget = {"base": minutes * base_share, "upsampler": minutes * (1 - base_share), "single": minutes}
    return {k: max(1, round(budget[k] * 60 / seconds[k])) for k in budget}


def arm_config(cfg: dict, arm: str, steps: dict[str, int]) -> dict:
    """The pipeline config (configs/scenes.yaml's, parsed) of an arm: "cascade" (its base decoder and upsampler) or
    "single" (the 64x64 decoder), each stage trained for its planned steps."""
    decoder = cfg["decoder"]
    if arm == "single":
        decoder["model"] = {**decoder.get("model", {}), **SINGLE_64}
    decoder["train"] = {**decoder.get("train", {}), "max_steps": steps["base" if arm == "cascade" else "single"],
                        "sample_every": 0}
    upsampler = cfg.setdefault("upsampler", {})
    upsampler["train"] = {**upsampler.get("train", {}), "max_steps": steps["upsampler"]}
    return cfg


def run_minutes(run: Path) -> tuple[float, int]:
    """A finished run's wall minutes of training (its last logged time) and its steps."""
    steps, validations = read_metrics(run)
    last = max(steps + validations, key=lambda r: r["time"])
    return last["time"] / 60, max(r["step"] for r in steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None, help="MNIST IDX files")
    ap.add_argument("--minutes", type=float, default=30.0, help="training minutes of each arm")
    ap.add_argument("--base-share", type=float, default=0.8,
                    help="the cascade's share of the minutes for its base decoder (the shipped runs': 0.88)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "scenes.yaml")
    ap.add_argument("--pipeline", default="scenes", help="whose CLIP, prior and layout stage both arms share")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=25, help="prompts a task for benchmarks/scenes.py")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cascade")
    ap.add_argument("--arms", nargs="+", choices=("cascade", "single"), default=["cascade", "single"],
                    help="the arms to train and score: another --base-share changes the cascade's only")
    args = ap.parse_args()
    if not 0 < args.base_share < 1:
        ap.error("--base-share must lie between 0 and 1")
    device = torch.device(args.device)
    t2i = str(Path(sys.executable).parent / "t2i")
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    shared = resolve_folder(args.pipeline)
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    plan_file = runs / "plan.json"  # a rerun goes on with the runs as planned
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
        if (plan["minutes"], plan["base_share"]) != (args.minutes, args.base_share):
            sys.exit(f"{runs} holds runs of {plan['minutes']:g} minutes, base share {plan['base_share']:g}: "
                     f"give those, or another --out")
    else:
        raw = load_yaml(args.config)
        seconds = {"base": step_seconds("decoder", raw, {}, device),
                   "upsampler": step_seconds("upsampler", raw, {}, device),
                   "single": step_seconds("decoder", raw, SINGLE_64, device)}
        plan = {"minutes": args.minutes, "base_share": args.base_share, "step_seconds": seconds,
                "steps": planned_steps(seconds, args.minutes, args.base_share)}
        plan_file.write_text(json.dumps(plan, indent=2))
    seconds, steps = plan["step_seconds"], plan["steps"]
    print(json.dumps(plan), flush=True)

    configs = {}
    for arm in args.arms:
        configs[arm] = runs / f"{arm}.yaml"
        configs[arm].write_text(yaml.safe_dump(arm_config(yaml.safe_load(args.config.read_text()), arm, steps),
                                               sort_keys=False))
        pipe = runs / arm
        for stage in ("prior", "layout"):
            if not (pipe / stage).is_dir():
                shutil.copytree(shared / stage, pipe / stage)
        flags = [*data, "--device", args.device]
        if not (pipe / "decoder" / WEIGHTS_FILE).is_file():
            subprocess.run([t2i, "decoder-train", "--clip", str(shared / "clip"), "--config", str(configs[arm]),
                            "--out", str(pipe), "--stage", "decoder", *flags], check=True)
        if arm == "cascade" and not (pipe / "upsampler" / WEIGHTS_FILE).is_file():
            subprocess.run([t2i, "upsampler-train", "--pipeline", str(pipe), "--config", str(configs[arm]), *flags],
                           check=True)

    runs_of = {"base": ("cascade", "decoder"), "upsampler": ("cascade", "upsampler"), "single": ("single", "decoder")}
    trained = {k: run_minutes(runs.joinpath(*run)) for k, run in runs_of.items() if run[0] in args.arms}
    scored = {}
    for name, pipe, extra in (("base alone, enlarged", "cascade", ["--base-only"]), ("cascade", "cascade", []),
                              ("one 64x64 decoder", "single", [])):
        if pipe not in args.arms:
            continue
        out = args.out / name.split(",")[0].replace(" ", "-")
        if not (out / "scenes.json").is_file():
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scenes.py"), *data, "--checkpoints",
                            str(runs / pipe), "--only", "generation", "--prompts", str(args.prompts), "--out", str(out),
                            *extra], check=True)
        scored[name] = json.loads((out / "scenes.json").read_text())["generation"]

    report = {"minutes": args.minutes, "base_share": args.base_share, "device": args.device, "prompts": args.prompts,
              "step_seconds": seconds, "planned_steps": steps,
              "trained": {k: {"minutes": m, "steps": s} for k, (m, s) in trained.items()}, "scores": scored}
    (args.out / "cascade.json").write_text(json.dumps(report, indent=2))
    tasks = list(next(iter(scored.values())))
    arms = " ".join(args.arms)
    done = []
    if "cascade" in args.arms:
        (bm, bs), (um, us) = trained["base"], trained["upsampler"]
        done.append(f"the cascade's base decoder {bs} steps in {bm:.1f} min and its upsampler {us} steps in {um:.1f} min "
                    f"({bm + um:.1f} min)")
    if "single" in args.arms:
        done.append("the 64x64 decoder {1} steps in {0:.1f} min".format(*trained["single"]))
    lines = [f"Each arm {args.minutes:g} minutes of training on {args.device}, from scratch "
             f"(`python benchmarks/cascade.py --minutes {args.minutes:g} --base-share {args.base_share:g} --arms {arms}`):",
             "; ".join(done) + ". Step seconds timed first: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items())
             + f". {args.prompts} prompts a task, 4 images a prompt.",
             "", "| set | " + " | ".join(scored) + " |", "| --- |" + " --- |" * len(scored)]
    lines += [f"| {t} | " + " | ".join(f"{s[t]:.3f}" for s in scored.values()) + " |" for t in tasks]
    (args.out / "cascade.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
