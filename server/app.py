"""`t2i serve`: a local web page and a plain HTTP API, both thin callers of `unclip.UnCLIPPipeline` (FastAPI).

- `GET /`: the page (page.html beside this file).
- `GET /api/generate?prompt=six&num_samples=4&seed=0`: the PNG contact sheet, the pixels of `t2i generate`'s
  grid.png for the same seed and batch size.
- `POST /api/run` (JSON): generate, vary or interpolate, answered as newline-delimited JSON events: where the
  request waits in the queue, every denoising step with a preview, then the images.
Pipelines load on first use (the default one at start, so a bad folder fails at once); one request computes at
a time and the others queue.

Why FastAPI and a page of our own rather than Gradio: the plain endpoint must answer a script with the exact
PNG `t2i generate` writes, the page must stream every denoising step and turn a click into variations, and a
browser test needs stable element ids; a 300-line page does all that with two small dependencies, where Gradio
brings dozens and its own front end.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import queue
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from unclip.api import BATCH_SIZE, UnCLIPPipeline
from unclip.checkpoint import resolve_folder, shipped_pipelines
from unclip.errors import UserError
from unclip.images import contact_sheet, grid, to_pil, to_uint8
from unclip.options import load_sampling

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")
SHEET_SCALE = 2  # as t2i generate writes grid.png


class Models:
    """The pipelines on offer by name, each loaded on first use; `lock` lets one request compute at a time."""

    def __init__(self, sources: dict[str, str | Path], device: str):
        self.sources, self.device = sources, device
        self.loaded: dict[str, UnCLIPPipeline] = {}
        self.lock = threading.Lock()
        self.waiting = 0

    def get(self, name: Optional[str]) -> UnCLIPPipeline:
        name = name or next(iter(self.sources))
        if name not in self.sources:
            raise UserError(f"unknown pipeline {name!r}: this server offers {', '.join(self.sources)}")
        if name not in self.loaded:
            self.loaded[name] = UnCLIPPipeline.from_pretrained(self.sources[name], self.device)
        return self.loaded[name]


def png_bytes(image: torch.Tensor, scale: int = 1) -> bytes:
    buf = io.BytesIO()
    to_pil(image, scale).save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: torch.Tensor, scale: int = 1) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image, scale)).decode()


def read_data_url(url: str) -> Image.Image:
    """An image sent by the page as a data URL (or bare base64)."""
    try:
        im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[-1], validate=True)))
        im.load()
        return im
    except (ValueError, UnidentifiedImageError, OSError):
        raise UserError("the image sent is not a PNG, JPEG or other image this server can read") from None


class RunRequest(BaseModel):
    """What the page asks for; settings left out take the pipeline's sampling defaults."""

    mode: Literal["generate", "vary", "interpolate"] = "generate"
    pipeline: Optional[str] = None
    prompt: str = ""
    negative_prompt: Optional[str] = None
    num_samples: int = Field(4, ge=1)
    seed: int = 0
    steps: Optional[int] = Field(None, ge=1)
    guidance: Optional[float] = Field(None, ge=0)
    text_guidance: Optional[float] = Field(None, ge=0)  # decoders that read the caption
    prior_guidance: Optional[float] = Field(None, ge=0)
    image: Optional[str] = None  # a data URL: the source of a variation, or the init image of image-to-image
    strength: Optional[float] = Field(None, ge=0, le=1)
    start: Optional[str] = None  # interpolation ends: a prompt, or a data URL of an image
    end: Optional[str] = None
    frames: int = Field(8, ge=2)


def create_app(sources: dict[str, str | Path], device: str = "auto", max_images: int = 64) -> FastAPI:
    """The app over the pipelines `sources` ({name: shipped name or folder}; the first is the default)."""
    if not sources:
        raise UserError("no pipeline to serve: pass --checkpoints DIR or install the shipped weights")
    models = Models(sources, device)
    models.get(None)  # the default pipeline loads now: a wrong folder is an error at start, not at the first request
    app = FastAPI(title="t2i", docs_url="/api/docs", redoc_url=None)

    def limit(n: int, what: str) -> None:
        if n > max_images:
            raise UserError(f"{n} {what} is more than this server draws at once ({max_images}; t2i serve --max-images)")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    def defaults(source: str | Path) -> dict:
        d = load_sampling(resolve_folder(source))  # the folder's sampling.yaml, without loading its weights
        return {"steps": d.steps, "guidance": d.guidance, "text_guidance": d.text_guidance, "prior_guidance": d.prior_guidance,
                "strength": d.strength}

    @app.get("/api/pipelines")
    def pipelines() -> dict:
        """The pipelines offered and each one's sampling defaults ("defaults": the first one's)."""
        each = {name: defaults(source) for name, source in sources.items()}
        return {"pipelines": list(sources), "max_images": max_images, "defaults": next(iter(each.values())),
                "pipeline_defaults": each}

    @app.get("/api/generate", responses={200: {"content": {"image/png": {}}}})
    def generate(prompt: str, num_samples: int = Query(4, ge=1), seed: int = 0, steps: Optional[int] = Query(None, ge=1),
                 guidance: Optional[float] = Query(None, ge=0), prior_guidance: Optional[float] = Query(None, ge=0),
                 text_guidance: Optional[float] = Query(None, ge=0),
                 negative_prompt: Optional[str] = None, pipeline: Optional[str] = None,
                 batch_size: int = Query(BATCH_SIZE, ge=1)) -> Response:
        """The contact sheet of `num_samples` images as a PNG: `t2i generate`'s grid.png for the same settings."""
        try:
            limit(num_samples, "images")
            if not prompt.strip():
                raise UserError("the prompt is empty: say what to draw, e.g. prompt=six")
            with queued(models):
                pipe = models.get(pipeline)
                options = pipe.options(steps=steps, guidance=guidance, prior_guidance=prior_guidance,
                                       text_guidance=text_guidance)
                images = pipe(prompt, negative_prompt, num_samples, pipe.generator(seed=seed), "uint8",
                              batch_size=batch_size, options=options).images
        except UserError as e:
            raise HTTPException(400, str(e)) from None
        return Response(png_bytes(contact_sheet(images), SHEET_SCALE), media_type="image/png")

    @app.post("/api/run")
    def run(req: RunRequest) -> StreamingResponse:
        """Generate, vary or interpolate, streamed as JSON lines: queued, progress (with a preview), done."""
        try:
            job = plan(models, req, limit)
        except UserError as e:
            raise HTTPException(400, str(e)) from None
        return StreamingResponse(stream(models, job), media_type="application/x-ndjson")

    return app


@contextmanager
def queued(models: Models):
    """Hold the compute lock, counting the requests that wait for it (for the page's "n ahead")."""
    models.waiting += 1
    with models.lock:
        models.waiting -= 1
        yield


Job = Callable[[Callable], torch.Tensor]  # job(callback) -> uint8 images


def plan(models: Models, req: RunRequest, limit) -> Job:
    """Check a request completely (a 400 comes before any event) and return the work it asks for."""
    pipe = models.get(req.pipeline)
    options = pipe.options(steps=req.steps, guidance=req.guidance, prior_guidance=req.prior_guidance,
                           strength=req.strength, text_guidance=req.text_guidance)
    generator = lambda: pipe.generator(seed=req.seed)  # noqa: E731
    if req.mode == "generate":
        limit(req.num_samples, "images")
        if not req.prompt.strip():
            raise UserError("the prompt is empty: say what to draw")
        init = read_data_url(req.image) if req.image else None
        return lambda cb: pipe(req.prompt, req.negative_prompt, req.num_samples, generator(), "uint8", cb, init,
                               options=options).images
    if req.mode == "vary":
        limit(req.num_samples, "images")
        if not req.image:
            raise UserError("variations need an image")
        source = read_data_url(req.image)
        return lambda cb: pipe.variations(source, req.num_samples, generator(), "uint8", cb, options=options).images
    limit(req.frames, "frames")
    ends = []
    for end in (req.start, req.end):
        if not end or not end.strip():
            raise UserError("an interpolation needs two ends, each a prompt or an image")
        ends.append(read_data_url(end) if end.startswith("data:") else end)
    return lambda cb: pipe.interpolate(ends[0], ends[1], req.frames, generator(), "uint8", cb, options=options).images


def stream(models: Models, job: Job):
    """Run `job` on a worker thread once the lock is free; yield its events as JSON lines."""
    events: queue.Queue = queue.Queue()

    def preview(step: int, total: int, x0: torch.Tensor) -> None:
        events.put({"type": "progress", "step": step, "total": total, "preview": data_url(grid(to_uint8(x0)))})

    def work() -> None:
        try:
            events.put({"type": "queued", "ahead": models.waiting + models.lock.locked()})
            with queued(models):
                t = time.perf_counter()
                images = job(preview)
            events.put({"type": "done", "seconds": round(time.perf_counter() - t, 2),
                        "images": [data_url(x) for x in images], "sheet": data_url(contact_sheet(images), SHEET_SCALE)})
        except UserError as e:
            events.put({"type": "error", "message": str(e)})
        except Exception as e:  # the server keeps serving; the page shows one line
            log.exception("request failed")
            events.put({"type": "error", "message": f"internal error: {type(e).__name__}: {e}"})
        finally:
            events.put(None)

    threading.Thread(target=work, daemon=True).start()
    while (event := events.get()) is not None:
        yield json.dumps(event) + "\n"


def pipeline_sources(checkpoints: list[str]) -> dict[str, str]:
    """The pipelines to offer: the user's folders or names (each named by its folder; the first is the default),
    then every shipped pipeline."""
    sources = {Path(c).name or str(c): str(c) for c in checkpoints}
    for name in shipped_pipelines():
        sources.setdefault(name, name)
    return sources
