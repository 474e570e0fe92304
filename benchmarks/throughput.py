"""Training throughput: steps per second of each stage, measured by the real training loop.

    python benchmarks/throughput.py --config configs/mnist-fast.yaml --data-dir ../shared/data/mnist
    python benchmarks/throughput.py --set train.precision=bf16 --out benchmarks/results/throughput-bf16
    python benchmarks/throughput.py --config configs/mnist-gpu.yaml --device cuda --kernels --data-dir DIR

Each stage runs `t2i clip-train` / `t2i decoder-train --stage prior|decoder` for `--steps` steps from the
config (a fresh run folder each), and its steps per second are read from the run's metrics.jsonl between
the end of step `--skip` and the last step (so start-up, data loading, CLIP's embedding of the training set
and the final validation are left out). `--set SECTION.KEY=VALUE` overrides a field of every stage's
section (e.g. `train.batch_size=128`), so variants are measured with one script.

`--kernels` also times one training step (forward, backward, AdamW) of the config's decoder and prior in this
process, as they are and with the CPU speed-ups the issue lists: bf16 autocast, channels_last memory format,
`torch.compile` (inductor), and other thread counts; with `--device cuda`, on the GPU (bf16 autocast,
channels_last, `torch.compile`, and the last two with bf16). Writes OUT/throughput.json and OUT/throughput.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2i.stages.runs import read_metrics  # noqa: E402
STAGES = ("clip", "prior", "decoder")


def overridden(config: Path, sets: list[str], folder: Path) -> Path:
    """The config with `section.key=value` applied to every stage's section, written into `folder`."""
    cfg = yaml.safe_load(config.read_text()) or {}
    for item in sets:
        path, _, value = item.partition("=")
        section, _, key = path.partition(".")
        for stage in STAGES:
            cfg.setdefault(stage, {}).setdefault(section, {})[key] = yaml.safe_load(value)
    out = folder / "config.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def steps_per_second(run: Path, skip: int) -> float:
    times = {r["step"]: r["time"] for r in read_metrics(run)[0]}
    last = max(times)
    return (last - skip) / (times[last] - times[skip])


def seconds_per_call(fn, repeats: int, device: torch.device, warmup: int = 0) -> float:
    """The mean seconds of `repeats` calls of `fn` after `warmup` untimed ones, a GPU's queue drained at each clock read."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def training_step(diffusion, x: torch.Tensor, cond: tuple, opt: torch.optim.Optimizer, autocast=nullcontext()):
    """One training step of a diffusion stage as a call: the loss (captions dropped 10% of the time), backward, `opt`."""
    def step():
        with autocast:
            loss = diffusion.loss(x, cond, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def kernel_variants(config: Path, device: torch.device, repeats: int = 10, compiled: bool = True) -> list[dict]:
    """Milliseconds per training step of the decoder and the prior at the config's batch size, per variant."""
    from unclip.config import ClipConfig, DecoderConfig, PriorConfig, load_yaml, merge, stage_section
    from unclip.models.prior import DiffusionPrior
    from unclip.models.unet import UNet
    from unclip.components.decoder import decoder_diffusion
    from unclip.components.prior import prior_diffusion

    raw = load_yaml(config)
    clip = merge(ClipConfig(), stage_section(raw, "clip")).model
    dec = merge(DecoderConfig(), stage_section(raw, "decoder"))
    dec.model.image_size, dec.model.image_channels = dec.model.image_size or clip.image_size, clip.image_channels
    pri = merge(PriorConfig(), stage_section(raw, "prior"))
    g = torch.Generator().manual_seed(0)
    B, D, L = dec.train.batch_size, clip.embed_dim, 8
    image = torch.randn(B, clip.image_channels, dec.model.image_size, dec.model.image_size, generator=g)
    P = pri.train.batch_size
    prior_x = torch.randn(P, D, generator=g)
    prior_cond = (torch.randn(P, D, generator=g), torch.randn(P, L, clip.text_width, generator=g),
                  torch.ones(P, L, dtype=torch.bool))
    image, prior_x = image.to(device), prior_x.to(device)
    prior_cond = tuple(c.to(device) for c in prior_cond)

    def stage(kind: str, channels_last: bool, compiled: bool):
        torch.manual_seed(0)
        if kind == "decoder":
            net = UNet(dec.model, D, text_width=clip.text_width).to(device)
            x, cond = image, (torch.randn(B, D, generator=g).to(device),)
            if channels_last:
                net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            diffusion = decoder_diffusion(net, dec, device)
        else:
            net = DiffusionPrior(pri.model, D, clip.text_width, clip.text_context).to(device)
            x, cond, diffusion = prior_x, prior_cond, prior_diffusion(net, pri, device)
        if compiled:
            diffusion = replace(diffusion, net=torch.compile(net))
        return net, diffusion, x, cond

    rows = []
    variants = [("fp32", {}), ("bf16 autocast", {"bf16": True}), ("channels_last", {"channels_last": True})]
    if device.type == "cuda":  # the compiled ones last: they take longest
        variants += [("channels_last + bf16", {"channels_last": True, "bf16": True}), ("torch.compile", {"compiled": True}),
                     ("torch.compile + bf16", {"compiled": True, "bf16": True})]
    else:
        variants += [("torch.compile", {"compiled": True}), ("1 thread", {"threads": 1})]
    variants = [(name, v) for name, v in variants if compiled or not v.get("compiled")]
    for kind in ("decoder", "prior"):
        for name, v in variants:
            if name.startswith("channels_last") and kind == "prior":
                continue
            threads = torch.get_num_threads()
            torch.set_num_threads(v.get("threads", threads))
            try:
                net, diffusion, x, cond = stage(kind, v.get("channels_last", False), v.get("compiled", False))
                opt = torch.optim.AdamW(net.parameters(), 1e-3, fused=device.type == "cuda" or None)
                autocast = torch.autocast(device.type, dtype=torch.bfloat16) if v.get("bf16") else nullcontext()
                step = training_step(diffusion, x, cond, opt, autocast)
                warm = 3 * seconds_per_call(step, 3, device)
                # caches and allocator warm first: the first variant timed is not the slower for it
                ms = seconds_per_call(step, repeats, device, warmup=5) * 1000
                rows.append({"stage": kind, "variant": name, "ms_per_step": ms, "first_3_steps_s": warm})
            except Exception as e:  # a variant this machine cannot run (no C++ compiler for inductor, say)
                rows.append({"stage": kind, "variant": name, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            finally:
                torch.set_num_threads(threads)
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "mnist-fast.yaml")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the rate")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--kernels", action="store_true", help="also time one step per speed-up variant")
    ap.add_argument("--kernels-only", action="store_true", help="only that: no training loops")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants (minutes to compile)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where every stage trains")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "throughput")
    args = ap.parse_args()
    t2i = str(Path(sys.executable).parent / "t2i")
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    rates: dict[str, float] = {}
    args.kernels |= args.kernels_only
    if args.kernels_only:
        args.stages = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = overridden(args.config, args.sets, tmp)
        common = ["--config", str(config), *data, "--max-steps", str(args.steps), "--device", args.device]
        clip = tmp / "clip"
        # CLIP is trained (briefly) whenever a loop is timed: the prior and decoder need one to stand on
        if args.stages:
            subprocess.run([t2i, "clip-train", *common, "--out", str(clip)], check=True, stdout=subprocess.DEVNULL)
        if "clip" in args.stages:
            rates["clip"] = steps_per_second(clip, args.skip)
        for stage in ("prior", "decoder"):
            if stage in args.stages:
                out = tmp / stage
                subprocess.run([t2i, "decoder-train", "--clip", str(clip), *common, "--stage", stage, "--out", str(out)],
                               check=True, stdout=subprocess.DEVNULL)
                rates[stage] = steps_per_second(out / stage, args.skip)
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    report = {"config": str(args.config), "sets": args.sets, "steps": args.steps, "skip": args.skip, "device": args.device,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": machine,
              "steps_per_second": rates}
    if args.kernels:
        report["kernels"] = kernel_variants(args.config, device, compiled=not args.no_compile)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(report, indent=2))
    lines = [f"Config `{args.config.name}`" + (f" with {', '.join(args.sets)}" if args.sets else "") +
             (f"; steps {args.skip + 1}-{args.steps} of each stage" if rates else "") + f" on {machine} ({args.device}), "
             f"{report['threads']} threads, torch {torch.__version__}."]
    if rates:
        lines += ["", "| stage | steps per second |", "| --- | --- |", *(f"| {k} | {v:.2f} |" for k, v in rates.items())]
    if args.kernels:
        base = {r["stage"]: r["ms_per_step"] for r in report["kernels"] if r["variant"] == "fp32"}
        lines += ["", "One training step in process (ms; first three steps in s, compilation included):", "",
                  "| stage | variant | ms per step | vs fp32 | first 3 steps (s) |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['stage']} | {r['variant']} | " + (f"{r['ms_per_step']:.0f} | {base[r['stage']] / r['ms_per_step']:.2f}x | "
                                                        f"{r['first_3_steps_s']:.1f} |" if "error" not in r else f"{r['error']} | | |")
                  for r in report["kernels"]]
    (args.out / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
