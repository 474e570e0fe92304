"""Is `t2i generate` bound by compute? Wall times from process start, and where the time goes.

    python benchmarks/overhead.py --ddpm-checkpoints runs/teacher/checkpoints/mnist   # the shipped mnist pipeline
    python benchmarks/overhead.py --checkpoints fashion
    python benchmarks/overhead.py --against runs/teacher-prior/mnist   # another pipeline's generate, in the same turns

Measures, in one run, medians of `--runs` (3):
- `python -c "import torch"` and `t2i generate --prompt six --num-samples 64`, both from process start to exit;
  the difference is what t2i costs beyond importing PyTorch (issue 14's target: at most 1.0 s), also as the
  median of the differences within each round of runs (the commands take turns, see `walls`);
- `t2i generate --prompt six -n 16` with the default sampler and with `--sampler ddpm` (1000 steps for each
  diffusion stage), and their ratio (target: at least 30), from process start and, in one process after a
  warm-up, of the sampling alone. A distilled decoder always takes its own few DDIM steps, so
  `--ddpm-checkpoints` names the pipeline the DDPM runs draw with (its teacher);
- the breakdown of one `generate -n 64` done phase by phase in a fresh process, as generate does it: Python's
  start, `import torch`, t2i's own imports (cli: Typer, Rich; the library), loading the weights, the prior, the
  decoder (and upsampler), writing the PNGs and the grid.

Every command runs once untimed first (see `walls`). Writes OUT/overhead.md and OUT/overhead.json. Run it on an
otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# One `t2i generate --prompt six -n 64` split into phases; prints JSON {phase: seconds} on its last line.
PHASES = r"""
import time
marks = [("start", time.perf_counter())]
import torch
marks.append(("import torch", time.perf_counter()))
import t2i.cli as cli  # noqa: F401  (what the t2i command imports before it runs: Typer, Rich)
from unclip.api import UnCLIPPipeline
from unclip.images import contact_sheet
from unclip.images import save_numbered, save_png
from unclip.components.clip import prompt_conditions
from unclip.components.prior import sample_image_embeddings
from unclip.pipeline import decode_and_upsample
marks.append(("t2i's imports (cli, unclip)", time.perf_counter()))
checkpoints, out, n = {checkpoints!r}, {out!r}, {n}
pipe = UnCLIPPipeline.from_pretrained(checkpoints, "cpu")
options = pipe.options()
marks.append(("loading the weights", time.perf_counter()))
p = pipe.pipeline
captions = ["six"] * n
with torch.no_grad():
    generator = pipe.generator(seed=0)
    emb = sample_image_embeddings(p.clip, p.tokenizer, p.prior, captions, options.sampler, options.steps,
                                  options.prior_guidance, generator, options.prior_candidates)
    cond, _ = prompt_conditions(p.clip, p.tokenizer, captions)
    marks.append(("prior (and the caption's text encoding)", time.perf_counter()))
    x = decode_and_upsample(p, emb, options, generator, text=cond[1:])
    marks.append(("decoder" + (" and upsampler" if p.upsampler is not None else ""), time.perf_counter()))
from pathlib import Path
from unclip.images import to_uint8
images = to_uint8(x)
save_numbered(images, Path(out))
save_png(contact_sheet(images), Path(out) / "grid.png", scale=2)
marks.append(("writing 64 PNGs and grid.png", time.perf_counter()))
import json
print(json.dumps({{b[0]: b[1] - a[1] for a, b in zip(marks, marks[1:])}}))
"""

# Sampling alone (no start-up, no files): 16 images with the default sampler and with 1000-step DDPM.
SAMPLING = r"""
import json, time
import torch
from unclip.api import UnCLIPPipeline
fast, slow = UnCLIPPipeline.from_pretrained({checkpoints!r}, "cpu"), UnCLIPPipeline.from_pretrained({ddpm!r}, "cpu")
fast("six", num_images_per_prompt=2, output_type="uint8")  # warm-up
seconds = {{}}
for name, pipe, extra in (("default", fast, {{}}), ("ddpm", slow, {{"sampler": "ddpm"}})):
    start = time.perf_counter()
    pipe("six", num_images_per_prompt=16, generator=torch.Generator().manual_seed(0), output_type="uint8", **extra)
    seconds[name] = time.perf_counter() - start
print(json.dumps(seconds))
"""


# Python caches compiled modules (__pycache__) unless PYTHONDONTWRITEBYTECODE is set, as it is in some sandboxes
# (this project's development machines): then t2i's own modules, never compiled at install in an editable checkout,
# are compiled again at every start (about 0.15 s), which no user's second run pays. The timed runs drop it.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
IMPORT_TORCH = [sys.executable, "-c", "import torch"]  # the baseline t2i's start-up is measured against
TORCH = 'python -c "import torch"'


def walls(cmds: dict[str, list[str]], runs: int) -> dict[str, list[float]]:
    """Wall seconds of each command from process start to exit, `runs` times, after one untimed run of each (which
    compiles and caches t2i's modules, as a user's first run does, and reads the weights into the page cache). The
    commands take turns, run after run, so that a slow spell of a shared machine falls on all of them alike."""
    for cmd in cmds.values():
        subprocess.run(cmd, check=True, capture_output=True, env=ENV)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(runs):
        for name, cmd in cmds.items():
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env=ENV)
            times[name].append(time.perf_counter() - start)
    return times


def wall(cmd: list[str], runs: int) -> list[float]:
    """`walls` of one command."""
    return walls({"cmd": cmd}, runs)["cmd"]


def time_generate(checkpoints: list[str], prompt: str, runs: int = 3) -> dict[str, float]:
    """Median wall time of `t2i generate --prompt PROMPT -n 16` from process start (a cold process, as a user runs it)
    for each pipeline, and of `python -c "import torch"` (key `TORCH`), the commands taking turns (`walls`)."""
    t2i = str(Path(sys.executable).parent / "t2i")
    with tempfile.TemporaryDirectory() as tmp:
        cmds = {TORCH: IMPORT_TORCH}
        cmds.update({str(c): [t2i, "generate", "--checkpoints", str(c), "--prompt", prompt, "-n", "16", "--device", "cpu",
                              "--out", f"{tmp}/{i}"] for i, c in enumerate(checkpoints)})
        return {name: statistics.median(times) for name, times in walls(cmds, runs).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", default="mnist")
    parser.add_argument("--ddpm-checkpoints", default=None, help="the pipeline the DDPM run draws with (default: --checkpoints)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--against", action="append", default=[], metavar="DIR",
                        help="another pipeline whose generate -n 64 takes turns with the commands above (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead"))
    args = parser.parse_args()
    t2i = str(Path(sys.executable).parent / "t2i")
    r: dict = {"checkpoints": args.checkpoints, "ddpm_checkpoints": args.ddpm_checkpoints or args.checkpoints}
    with tempfile.TemporaryDirectory() as tmp:
        gen = lambda *extra, ckpt=args.checkpoints: [t2i, "generate", "--prompt", "six", "--checkpoints", ckpt,  # noqa: E731
                                                     "--out", tmp, *extra]
        r.update(walls({"import_torch": IMPORT_TORCH,
                        # t2i ends its sampling commands without Python's teardown (cli.run): the baseline without it
                        "import_torch_no_teardown": [sys.executable, "-c", "import torch, os; os._exit(0)"],
                        "generate_64": gen("--num-samples", "64"), "generate_16": gen("--num-samples", "16"),
                        **{f"generate_64 {d}": gen("--num-samples", "64", ckpt=d) for d in args.against}}, args.runs))
        r["generate_16_ddpm"] = wall(gen("--num-samples", "16", "--sampler", "ddpm", ckpt=r["ddpm_checkpoints"]), 1)
        start = time.perf_counter()
        child = subprocess.run([sys.executable, "-c", PHASES.format(checkpoints=args.checkpoints, out=tmp, n=64)],
                               check=True, capture_output=True, text=True, env=ENV)
        total = time.perf_counter() - start
    phases = json.loads(child.stdout.strip().splitlines()[-1])
    sampling = subprocess.run([sys.executable, "-c", SAMPLING.format(checkpoints=args.checkpoints, ddpm=r["ddpm_checkpoints"])],
                              check=True, capture_output=True, text=True)
    r["sampling_16"] = json.loads(sampling.stdout.strip().splitlines()[-1])
    r["sampling_ratio"] = r["sampling_16"]["ddpm"] / r["sampling_16"]["default"]
    r["phases"] = {"Python's start-up and exit": total - sum(phases.values()), **phases}
    r["phases_total"] = total
    med = {k: statistics.median(r[k]) for k in ("import_torch", "import_torch_no_teardown", "generate_64", "generate_16",
                                                "generate_16_ddpm")}
    r["median"] = med
    r.update(beyond_torch(r["generate_64"], r["import_torch"]))
    r["beyond_torch_no_teardown"] = med["generate_64"] - med["import_torch_no_teardown"]
    r["ddpm_ratio"] = med["generate_16_ddpm"] / med["generate_16"]
    r["against"] = {d: {"generate_64": statistics.median(r[f"generate_64 {d}"]),
                        **beyond_torch(r[f"generate_64 {d}"], r["import_torch"])} for d in args.against}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(r, indent=2))
    md = markdown(r, args.runs)
    (args.out / "overhead.md").write_text(md)
    print(md)


def beyond_torch(generate: list[float], torch: list[float]) -> dict[str, float]:
    """What `generate` costs beyond `import torch`: the difference of their medians (the issue's measure), and the
    median of the differences within each round of turns."""
    return {"beyond_torch": statistics.median(generate) - statistics.median(torch),
            "beyond_torch_paired": statistics.median(g - t for g, t in zip(generate, torch))}


def markdown(r: dict, runs: int) -> str:
    m = r["median"]
    against = "".join(f" --against {d}" for d in r.get("against", {}))
    lines = [f"`python benchmarks/overhead.py --checkpoints {r['checkpoints']}{against}` (medians of {runs}; DDPM: one run, "
             f"on `{r['ddpm_checkpoints']}`)", "",
             "| command, from process start to exit | seconds | target |", "| --- | --- | --- |",
             f"| `python -c \"import torch\"` | {m['import_torch']:.2f} | |",
             f"| `t2i generate --prompt six --num-samples 64` | {m['generate_64']:.2f} | |",
             f"| **the difference** | **{r['beyond_torch']:.2f}** | <= 1.0 |",
             f"| the median of the differences within a round | {r['beyond_torch_paired']:.2f} | |",
             f"| `python -c \"import torch, os; os._exit(0)\"` (no teardown, as t2i's sampling commands end) | "
             f"{m['import_torch_no_teardown']:.2f} | |",
             f"| the difference to that | {r['beyond_torch_no_teardown']:.2f} | |",
             f"| `t2i generate --prompt six -n 16` | {m['generate_16']:.2f} | |",
             f"| the same with `--sampler ddpm` (1000 steps a stage) | {m['generate_16_ddpm']:.2f} | |",
             f"| **DDPM / default** | **{r['ddpm_ratio']:.1f}x** | >= 30x |",
             f"| sampling alone, 16 images: default / DDPM (in one process, after a warm-up) | "
             f"{r['sampling_16']['default']:.2f} / {r['sampling_16']['ddpm']:.2f} | |",
             f"| **DDPM / default, sampling alone** | **{r['sampling_ratio']:.1f}x** | |"]
    lines += [f"| `t2i generate --prompt six --num-samples 64 --checkpoints {d}` (in the same turns); the difference; "
              f"within a round | {a['generate_64']:.2f}; {a['beyond_torch']:.2f}; {a['beyond_torch_paired']:.2f} | |"
              for d, a in r.get("against", {}).items()]
    lines += ["",
             "One `generate -n 64`, phase by phase in a fresh process:", "",
             "| phase | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["phases"].items()]
    lines += [f"| total (process start to exit) | {r['phases_total']:.3f} |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
