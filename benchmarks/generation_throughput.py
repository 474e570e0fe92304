"""Generation throughput: images per second of a pipeline in one process, as it is and with bf16 autocast and
`torch.compile`, and `t2i generate` from process start (issue 14's GPU figures).

    python benchmarks/generation_throughput.py --device cuda --batch 1024            # the shipped mnist pipeline
    python benchmarks/generation_throughput.py --device cpu --batch 64 --variants fp32,bf16

In process: the pipeline is loaded once per variant, drawn once untimed (the warm-up, in which `torch.compile`
compiles; its seconds are reported), then `--runs` times `--batch` images of `--prompt` in one batch, with
the pipeline's default sampling; the median gives images per second (the GPU synchronised before each clock
read). Variants: `fp32` (as shipped), `bf16` (every stage under bfloat16 autocast), `compile` (the prior's and
the decoder's networks through `torch.compile`), `compile+bf16`.

From process start (`--end-to-end`): `t2i generate --prompt P -n BATCH --batch-size BATCH --device D` against
`python -c "import torch"` (and, on a GPU, against a process that only imports torch and starts CUDA), medians
of `--runs`, the commands taking turns (benchmarks/overhead.py's `walls`).

Writes OUT/generation_throughput.json and .md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import IMPORT_TORCH, walls  # noqa: E402
from unclip.api import UnCLIPPipeline  # noqa: E402
from unclip.checkpoint import resolve_folder  # noqa: E402
from unclip.device import resolve_device  # noqa: E402

VARIANTS = ("fp32", "bf16", "compile", "compile+bf16")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def in_process(checkpoints: str, device: str, variant: str, prompt: str, batch: int, runs: int) -> dict:
    pipe = UnCLIPPipeline.from_pretrained(checkpoints, device)
    p = pipe.pipeline
    if "compile" in variant:
        p.prior = replace(p.prior, net=torch.compile(p.prior.net))
        p.decoder = replace(p.decoder, net=torch.compile(p.decoder.net))
    autocast = torch.autocast(pipe.device.type, torch.bfloat16) if "bf16" in variant else nullcontext()

    def draw(seed: int) -> float:
        synchronize(pipe.device)
        start = time.perf_counter()
        with autocast:
            pipe(prompt, num_images_per_prompt=batch, batch_size=batch, generator=pipe.generator(seed=seed),
                 output_type="uint8")
        synchronize(pipe.device)
        return time.perf_counter() - start

    first = draw(0)
    seconds = [draw(1 + k) for k in range(runs)]
    median = statistics.median(seconds)
    return {"variant": variant, "first_call_s": first, "seconds": seconds, "median_s": median,
            "images_per_second": batch / median}


def end_to_end(checkpoints: str, device: str, prompt: str, batch: int, runs: int) -> dict:
    t2i = str(Path(sys.executable).parent / "t2i")
    with tempfile.TemporaryDirectory() as tmp:
        cmds = {"python -c 'import torch'": IMPORT_TORCH,
                f"t2i generate -n {batch}": [t2i, "generate", "--checkpoints", checkpoints, "--prompt", prompt,
                                             "--num-samples", str(batch), "--batch-size", str(batch), "--device", device,
                                             "--out", tmp]}
        if device == "cuda":
            cmds["import torch, start CUDA"] = [sys.executable, "-c", "import torch; torch.zeros(1, device='cuda')"]
        times = walls(cmds, runs)
    return {name: {"seconds": t, "median_s": statistics.median(t)} for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", default="mnist")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--prompt", default="six")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--end-to-end", action="store_true", help="also time t2i generate from process start")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "generation-throughput")
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    resolve_folder(args.checkpoints)  # a wrong name fails here, not as every variant's error row
    device = resolve_device(args.device).type  # each variant loads the pipeline itself
    report = {"checkpoints": args.checkpoints, "device": device, "batch": args.batch, "prompt": args.prompt,
              "torch": torch.__version__, "machine": torch.cuda.get_device_name() if device == "cuda" else
              (platform.processor() or platform.machine()), "in_process": []}
    for variant in variants:
        try:
            row = in_process(args.checkpoints, device, variant, args.prompt, args.batch, args.runs)
        except Exception as e:  # a variant this machine cannot run (no compiler for inductor, say)
            row = {"variant": variant, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        report["in_process"].append(row)
        print(json.dumps(row), flush=True)
    if args.end_to_end:
        report["end_to_end"] = end_to_end(args.checkpoints, device, args.prompt, args.batch, args.runs)
        print(json.dumps(report["end_to_end"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generation_throughput.json").write_text(json.dumps(report, indent=2))
    base = next((r["images_per_second"] for r in report["in_process"] if r.get("variant") == "fp32"), None)
    lines = [f"`{args.checkpoints}` on {report['machine']} ({device}), torch {torch.__version__}: batches of {args.batch} "
             f"images of {args.prompt!r}, medians of {args.runs}.", "",
             "| variant | images per second | vs fp32 | median s | first call s (compilation included) |",
             "| --- | --- | --- | --- | --- |"]
    for r in report["in_process"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['error']} | | | |")
        else:
            ratio = f"{r['images_per_second'] / base:.2f}x" if base else ""
            lines.append(f"| {r['variant']} | {r['images_per_second']:,.0f} | {ratio} | {r['median_s']:.3f} | "
                         f"{r['first_call_s']:.1f} |")
    if args.end_to_end:
        lines += ["", "| from process start | median s | runs |", "| --- | --- | --- |"]
        lines += [f"| {name} | {v['median_s']:.2f} | {', '.join(f'{s:.2f}' for s in v['seconds'])} |"
                  for name, v in report["end_to_end"].items()]
    (args.out / "generation_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
