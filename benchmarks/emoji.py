"""Issue 43's evaluator: a classifier of real emoji judges what an emoji pipeline draws.

    python benchmarks/emoji.py --data-dir ../shared/data/emoji --real-only            # the judge on real images
    python benchmarks/emoji.py --data-dir ../shared/data/emoji --checkpoints DIR      # an emoji pipeline

The judge (`EmojiJudge`) is a CNN with three heads, trained on every real image of the folder (the held-out ones
too: it is the outside evaluator's stand-in, not a model under test) with shifts, scaling and noise: which thing
(top-1 among all identities), which style, which skin tone. It is trained once and cached in benchmarks/cache.

Prompt kinds (`prompt_sets`, --prompts a kind, --images a prompt, drawn with a fixed seed):
- seen: "NAME, STYLE style" for a thing and style training saw (no skin tone);
- held-out styles: the same form for the style pairs the contract holds out of training;
- held-out tones: "NAME: TONE skin tone, STYLE style" for the held-out tones (their style seen);
- english, german, french: one set of things seen in every style, named in English, German and French, no style.
Each kind's thing rate (and style, tone) on generated images is set beside the judge's rate on the real images of the
same prompts (the thing in the asked style and tone; for a name alone, each style). Also: the Frechet distance in
the judge's feature space between the seen kind's images and every real image it is drawn from (training's, no skin
tone), against the floor of as many of those real images drawn at random; and a prompt's diversity (mean pairwise feature distance) for the names alone,
against that of the same thing's real images in its styles. Writes OUT/emoji.json and OUT/emoji.md, and with a
pipeline the README's gallery (`gallery`): OUT/gallery-styles.png and OUT/gallery-tones.png, held-out cells framed red.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from rich.progress import track
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.judge import CACHE, diversity, frechet_distance  # noqa: E402
from benchmarks.overhead import TORCH, time_generate  # noqa: E402
from unclip.data.emoji import STYLES, Emoji, held_out_rules, rendered  # noqa: E402
from unclip.images import grid, resize, save_png, to_float, to_uint8  # noqa: E402

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
KINDS = ("seen", "held-out styles", "held-out tones", "english", "german", "french")
RED = torch.tensor([220, 30, 30], dtype=torch.uint8).view(3, 1, 1)  # the gallery's frame of a held-out cell
LANGUAGE = {"english": "en", "german": "de", "french": "fr"}
# The gallery: these things (English names) and the first two whose one style is held out, in the three styles; a
# person in the five skin tones (noto)
GALLERY_THINGS = ("red apple", "grinning face", "cat face", "rocket", "pizza", "sunflower")
GALLERY_PERSON = "waving hand"
TIMED_PROMPT = "red apple, twemoji style"  # the issue's
# The targets: (kind, measure, least value); "thing" is relative to the judge's rate on the real images
TARGETS = [("seen", "thing", 0.85), ("seen", "style", 0.95), ("held-out styles", "thing", 0.6),
           ("held-out styles", "style", 0.8), ("held-out tones", "thing", 0.6), ("held-out tones", "tone", 0.7)]


class EmojiJudge(nn.Module):
    """RGB, read at 32x32 (emoji are drawn to be told apart that small) -> features (192) -> logits of the thing,
    the style and the skin tone (0: none). About 19 million multiply-adds an image: a 2-core CPU trains it."""

    READ = 32
    VERSION = 1  # of its layers and its training: in the cached file's name

    def __init__(self, things: int, width: int = 24):
        super().__init__()

        def conv(cin, cout, stride=1):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.features = nn.Sequential(
            *conv(3, w), *conv(w, 2 * w, 2), *conv(2 * w, 2 * w), *conv(2 * w, 4 * w, 2), *conv(4 * w, 4 * w),
            *conv(4 * w, 8 * w, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.thing, self.style, self.tone = (nn.Linear(8 * w, n) for n in (things, len(STYLES), 6))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.features(F.interpolate(x, size=self.READ, mode="area") if x.shape[-1] != self.READ else x)
        return f, self.thing(f), self.style(f), self.tone(f)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Float images in [-1, 1], each shifted (up to 4 px), scaled (0.85-1.15) and noised, the edges white."""
    n = len(x)
    scale = torch.empty(n).uniform_(0.85, 1.15, generator=g)
    shift = torch.empty(n, 2).uniform_(-0.125, 0.125, generator=g)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    ink = F.grid_sample((1 - x) / 2, grid, align_corners=False)  # white is no ink: what comes in at the edges
    out = 1 - 2 * ink
    return (out + 0.05 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(out.shape, generator=g)).clamp(-1, 1)


def judge_key(emoji: list[Emoji]) -> str:
    """What the cached judge was trained on: its things and images (their files and names)."""
    text = "\n".join(f"{e.identity} {e.style} {e.tone} {e.file.name}" for e in emoji)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_judge(emoji: list[Emoji], images: torch.Tensor, things: list[str], epochs: int, seed: int = 0,
                batch: int = 128) -> EmojiJudge:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    index = {t: i for i, t in enumerate(things)}
    labels = [torch.tensor(v) for v in ([index[e.identity] for e in emoji], [STYLES.index(e.style) for e in emoji],
                                        [e.tone for e in emoji])]
    model, n = EmojiJudge(len(things)), len(emoji)
    per_epoch = max(1, n // batch)
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * per_epoch)
    for step in track(range(epochs * per_epoch), description="training the emoji judge"):
        k = step % per_epoch
        if k == 0:
            perm = torch.randperm(n, generator=g)
        idx = perm[k * batch:(k + 1) * batch]
        x = F.interpolate(to_float(images[idx]), size=model.READ, mode="area")  # augmented as the judge reads it
        _, *logits = model(augment(x, g))
        loss = sum(F.cross_entropy(out, y[idx]) for out, y in zip(logits, labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def load_judge(emoji: list[Emoji], images: torch.Tensor, epochs: int) -> tuple[EmojiJudge, list[str]]:
    """The cached judge of these records (`judge_key`), trained first if absent."""
    things = sorted({e.identity for e in emoji})
    path = CACHE / f"emoji-judge-v{EmojiJudge.VERSION}-{judge_key(emoji)}-{epochs}.safetensors"
    model = EmojiJudge(len(things))
    if path.exists():
        model.load_state_dict(load_file(path))
        return model.eval(), things
    start = time.perf_counter()
    model = train_judge(emoji, images, things, epochs)
    log.info("emoji judge trained in %.1f min", (time.perf_counter() - start) / 60)
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), path)
    return model, things


@torch.no_grad()
def judged(model: EmojiJudge, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, ...]:
    """uint8 images (N, 3, 64, 64) -> features (N, 192) and the judge's thing, style and tone (N,) each."""
    outs = [model(to_float(images[i:i + batch])) for i in range(0, len(images), batch)]
    f, thing, style, tone = (torch.cat(parts) for parts in zip(*outs))
    return f, thing.argmax(-1), style.argmax(-1), tone.argmax(-1)


@dataclass(frozen=True)
class Prompt:
    text: str
    identity: str
    style: Optional[str]  # asked for; None: any
    tone: int  # asked for (0: none)
    real: tuple[int, ...]  # the real images of what it asks (indices of the records)


def seen_images(emoji: list[Emoji], rule: list[Optional[str]]) -> list[int]:
    """The records training sees that the seen kind asks for: no rule holds them out, no skin tone, no extra."""
    return [i for i, e in enumerate(emoji) if rule[i] is None and not e.extra and e.tone == 0]


def prompt_sets(emoji: list[Emoji], per_kind: int, seed: int = 0) -> dict[str, list[Prompt]]:
    """`per_kind` prompts of each of `KINDS` (fewer where the data has fewer), drawn with `seed`."""
    r = random.Random(seed)
    rule = held_out_rules(emoji)
    seen = seen_images(emoji, rule)
    styles = [i for i, e in enumerate(emoji) if rule[i] == "style" and e.tone == 0]
    tones = [i for i, e in enumerate(emoji) if rule[i] == "tone"]
    pick = lambda rows: sorted(r.sample(rows, min(per_kind, len(rows))))  # noqa: E731
    styled = lambda i: f"{emoji[i].names['en']}, {emoji[i].style} style"  # noqa: E731
    sets = {"seen": [Prompt(styled(i), emoji[i].identity, emoji[i].style, 0, (i,)) for i in pick(seen)],
            "held-out styles": [Prompt(styled(i), emoji[i].identity, emoji[i].style, 0, (i,)) for i in pick(styles)],
            "held-out tones": [Prompt(styled(i), emoji[i].identity, emoji[i].style, emoji[i].tone, (i,))
                               for i in pick(tones)]}
    named = {}  # things training saw in every style (tone 0) with a German and a French name: their images
    for i in seen:
        e = emoji[i]
        if "de" in e.names and "fr" in e.names:
            named.setdefault(e.identity, []).append(i)
    named = {t: rows for t, rows in named.items() if len(rows) == len(STYLES)}
    things = sorted(r.sample(sorted(named), min(per_kind, len(named))))
    for kind, lang in LANGUAGE.items():
        sets[kind] = [Prompt(emoji[named[t][0]].names[lang], t, None, 0, tuple(named[t])) for t in things]
    return sets


def rates(asked: list[Prompt], thing, style, tone, things: list[str]) -> dict:
    """The share of images (the prompt each one answers: `asked`) showing its thing, and its style and tone where
    the prompts ask for them."""
    index = {t: i for i, t in enumerate(things)}
    want = lambda f: torch.tensor([f(p) for p in asked])  # noqa: E731
    out = {"thing": (thing == want(lambda p: index[p.identity])).float().mean().item()}
    if all(p.style for p in asked):
        out["style"] = (style == want(lambda p: STYLES.index(p.style))).float().mean().item()
    if any(p.tone for p in asked):
        out["tone"] = (tone == want(lambda p: p.tone)).float().mean().item()
    return {k: round(v, 4) for k, v in out.items()}


def real_rates(model: EmojiJudge, images: torch.Tensor, prompts: list[Prompt], things: list[str]) -> dict:
    """`rates` of each prompt's real images (a prompt with several, one style each, counts each)."""
    _, thing, style, tone = judged(model, images[[i for p in prompts for i in p.real]])
    return rates([p for p in prompts for _ in p.real], thing, style, tone, things)


def generate(pipe, prompts: list[str], per_prompt: int, options, batch: int = 32) -> torch.Tensor:
    """uint8 (len(prompts) x per_prompt, 3, 64, 64) drawn by the pipeline's defaults, seeded per batch."""
    from unclip.pipeline import draw
    texts = [t for t in prompts for _ in range(per_prompt)]
    out = []
    for start in track(range(0, len(texts), batch), description="drawing"):
        g = torch.Generator(pipe.device).manual_seed(start)
        images = draw(pipe, texts[start:start + batch], options, g).cpu()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        out.append(to_uint8(resize(images, SIZE)))
    return torch.cat(out)


def gallery_prompts(emoji: list[Emoji]) -> dict[str, list[tuple[str, bool]]]:
    """The gallery's prompts, each with whether the contract holds its image out of training: "styles", a row of
    the three styles per thing; "tones", `GALLERY_PERSON` in each skin tone."""
    rule = held_out_rules(emoji)
    plain = [i for i, e in enumerate(emoji) if e.tone == 0 and not e.extra]
    by_name = {emoji[i].names["en"]: emoji[i].identity for i in plain}
    things = [by_name[n] for n in GALLERY_THINGS if n in by_name]
    things += sorted({emoji[i].identity for i in plain if rule[i] == "style"})[:2]
    of = {(emoji[i].identity, emoji[i].style): i for i in plain}
    rows = [of[t, s] for t in things for s in STYLES if (t, s) in of]
    person = [i for i, e in enumerate(emoji) if e.tone and e.style == "noto" and e.identity == by_name.get(GALLERY_PERSON)]
    cell = lambda i: (f"{emoji[i].names['en']}, {emoji[i].style} style", rule[i] is not None)  # noqa: E731
    return {"styles": [cell(i) for i in rows], "tones": [cell(i) for i in sorted(person, key=lambda i: emoji[i].tone)]}


def gallery(pipe, emoji: list[Emoji], options, out: Path) -> dict[str, list[tuple[str, bool]]]:
    """OUT/gallery-styles.png (a row a thing, a column a style) and OUT/gallery-tones.png (one image a prompt,
    enlarged twice); an image whose prompt the contract holds out of training is framed red."""
    sets = gallery_prompts(emoji)
    for name, prompts in sets.items():
        images = generate(pipe, [text for text, _ in prompts], 1, options).clone()
        for image, (_, held) in zip(images, prompts):
            if held:
                image[:, :2], image[:, -2:], image[:, :, :2], image[:, :, -2:] = RED, RED, RED, RED
        save_png(grid(images, ncol=len(STYLES) if name == "styles" else len(prompts)), out / f"gallery-{name}.png",
                 scale=2)
    return sets


def prompt_diversity(features: torch.Tensor, groups: list[int]) -> float:
    """Mean over groups of consecutive rows (sizes `groups`, two or more) of their `diversity`."""
    values, start = [], 0
    for n in groups:
        if n > 1:
            values.append(diversity(features[start:start + n]))
        start += n
    return sum(values) / len(values)


def evaluate(data_dir: Path, checkpoints: Optional[Path], per_kind: int, per_prompt: int, epochs: int,
             seed: int = 0, out: Optional[Path] = None) -> dict:
    """The report (`markdown` writes it); with a pipeline and `out`, also its `gallery` there."""
    emoji, images = rendered(data_dir, SIZE)
    model, things = load_judge(emoji, images, epochs)
    sets = prompt_sets(emoji, per_kind, seed)
    report: dict = {"data": str(data_dir), "things": len(things), "images": len(emoji), "judge_epochs": epochs,
                    "prompts": {k: len(v) for k, v in sets.items()}, "per_prompt": per_prompt,
                    "real": {k: real_rates(model, images, v, things) for k, v in sets.items()}}
    seen = seen_images(emoji, held_out_rules(emoji))
    reference = judged(model, images[seen])[0]  # what the seen kind's prompts are drawn from
    names = sets["english"]
    real_names = judged(model, images[[i for p in names for i in p.real]])[0]
    report["real"]["diversity"] = round(prompt_diversity(real_names, [len(p.real) for p in names]), 4)
    g = torch.Generator().manual_seed(seed)
    n = len(sets["seen"]) * per_prompt
    floor = [frechet_distance(reference[torch.randperm(len(seen), generator=g)[:n]], reference) for _ in range(3)]
    report["fd_floor"] = round(sum(floor) / len(floor), 3)
    if checkpoints is None:
        return report
    from unclip.options import sampling_options
    from unclip.pipeline import Pipeline
    pipe = Pipeline.load(checkpoints, "cpu")
    options = sampling_options(pipe.defaults)
    report["checkpoints"], report["generated"] = str(checkpoints), {}
    start = time.perf_counter()
    for kind, prompts in sets.items():
        drawn = generate(pipe, [p.text for p in prompts], per_prompt, options)
        f, thing, style, tone = judged(model, drawn)
        report["generated"][kind] = rates([p for p in prompts for _ in range(per_prompt)], thing, style, tone, things)
        if kind == "seen":
            report["fd"] = round(frechet_distance(f, reference), 3)
        if kind == "english":
            report["generated"]["diversity"] = round(prompt_diversity(f, [per_prompt] * len(prompts)), 4)
    report["generation_minutes"] = round((time.perf_counter() - start) / 60, 2)
    if out is not None:
        report["gallery"] = gallery(pipe, emoji, options, out)
    return report


def verdicts(report: dict) -> list[tuple[str, float, str, bool]]:
    """(what, measured, target, met) for each of the issue's targets a report measures."""
    gen, real = report["generated"], report["real"]
    out = []
    for kind, measure, least in TARGETS:
        value = gen[kind][measure] / max(real[kind][measure], 1e-9) if measure == "thing" else gen[kind][measure]
        out.append((f"{kind}: {measure}" + (" (of real)" if measure == "thing" else ""), value, f">= {least}",
                    value >= least))
    for kind in ("german", "french"):
        value = gen[kind]["thing"] / max(gen["english"]["thing"], 1e-9)
        out.append((f"{kind}: thing (of English)", value, ">= 0.7", value >= 0.7))
    out.append(("Frechet distance / floor", report["fd"] / report["fd_floor"], "<= 2", report["fd"] <= 2 * report["fd_floor"]))
    value = gen["diversity"] / max(real["diversity"], 1e-9)
    out.append(("diversity (of real)", value, ">= 0.8", value >= 0.8))
    if "time_16" in report:
        out.append((f"`t2i generate -n 16` from process start, s (`import torch` alone: {report['import_torch']} s)",
                    report["time_16"], "<= 5", report["time_16"] <= 5))
    return out


def markdown(report: dict) -> str:
    lines = [f"# Emoji evaluator ({time.strftime('%Y-%m-%d')}, `python benchmarks/emoji.py`)", "",
             f"Judge: {report['things']:,} things, {report['images']:,} real images, {report['judge_epochs']} epochs. "
             f"{report['per_prompt']} images a prompt.", "",
             "| kind | prompts | thing: generated / real | style: generated / real | tone: generated / real |",
             "| --- | --- | --- | --- | --- |"]
    gen = report.get("generated", {})
    for kind in KINDS:
        real, g = report["real"][kind], gen.get(kind, {})
        cell = lambda m: "-" if m not in real else f"{g[m]:.3f} / {real[m]:.3f}" if m in g else f"- / {real[m]:.3f}"  # noqa: E731
        lines.append(f"| {kind} | {report['prompts'][kind]} | {cell('thing')} | {cell('style')} | {cell('tone')} |")
    lines += ["", f"Frechet distance (judge features) to every real image the seen kind is drawn from (training's, no "
              f"skin tone): as many real ones drawn at random (the floor, mean of 3) {report['fd_floor']}"
              + (f", the seen kind's generated images {report['fd']}" if "fd" in report else "") + ".",
              f"Diversity of a name's images (mean pairwise feature distance): real, across styles "
              f"{report['real']['diversity']}" + (f", generated {gen['diversity']}" if gen else "") + "."]
    if gen:
        lines += ["", "| target | measured | wanted | met |", "| --- | --- | --- | --- |"]
        lines += [f"| {what} | {value:.3f} | {want} | {'yes' if met else '**no**'} |"
                  for what, value, want, met in verdicts(report)]
        lines += ["", f"Generated in {report['generation_minutes']} min ({report['checkpoints']})."]
    for name, prompts in report.get("gallery", {}).items():
        lines += ["", f"gallery-{name}.png, in rows of {len(STYLES) if name == 'styles' else len(prompts)} "
                  "(framed red: held out of training): " + "; ".join(f"**{t}**" if held else t for t, held in prompts)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True, help="the emoji folder (../shared/data/emoji)")
    ap.add_argument("--checkpoints", type=Path, default=None, help="the emoji pipeline to judge")
    ap.add_argument("--real-only", action="store_true", help="judge the real images only (no pipeline)")
    ap.add_argument("--prompts", type=int, default=100, help="prompts a kind")
    ap.add_argument("--images", type=int, default=4, help="images a prompt")
    ap.add_argument("--judge-epochs", type=int, default=32, help="epochs of the judge (cached per value)")
    ap.add_argument("--time-runs", type=int, default=3,
                    help="runs of `t2i generate -n 16` timed from process start (median; 0: not timed)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where emoji.json and emoji.md go (default: benchmarks/results/emoji, or emoji-real with --real-only)")
    args = ap.parse_args()
    if (args.checkpoints is None) != args.real_only:
        ap.error("give --checkpoints DIR, or --real-only")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or ROOT / "benchmarks" / "results" / ("emoji-real" if args.real_only else "emoji")
    out.mkdir(parents=True, exist_ok=True)
    report = evaluate(args.data_dir, args.checkpoints, args.prompts, args.images, args.judge_epochs, out=out)
    if args.checkpoints is not None and args.time_runs:
        times = time_generate([args.checkpoints], TIMED_PROMPT, args.time_runs)
        report["time_16"], report["import_torch"] = round(times[str(args.checkpoints)], 2), round(times[TORCH], 2)
    (out / "emoji.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "emoji.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
