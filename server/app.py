"""`t2i serve`: a local web page and a plain HTTP API, both thin callers of `unclip.UnCLIPPipeline` (FastAPI).

- `GET /`: the page (page.html beside this file).
- `GET /api/generate?prompt=six&num_samples=4&seed=0`: the PNG contact sheet, the pixels of `t2i generate`'s
  grid.png for the same seed and batch size.
- `POST /api/run` (JSON): generate, vary or interpolate, answered as newline-delimited JSON events: where the
  request waits in the queue, every denoising step with a preview, then the images.

One computation runs at a time, on one worker thread; at most `max_queue` more wait (beyond that, 429 with a
Retry-After), and handlers wait without holding a thread, so the page answers while they do. A job whose client
has gone is cancelled before it starts, or at its next denoising step. Every request is checked first (its
numbers finite and bounded, its image's size read from its header before it is decoded, then reduced to the
pipeline's size at once), so a queued job holds only what it needs. The rules of a local service (allowed hosts,
no cross-site requests, a token beyond this machine, bounded bodies) are `server/guard.py`'s.

Why FastAPI and a page of our own rather than Gradio: the plain endpoint must answer a script with the exact
PNG `t2i generate` writes, the page must stream every denoising step and turn a click into variations, and a
browser test needs stable element ids; a 300-line page does all that with two small dependencies, where Gradio
brings dozens and its own front end.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from t2i.server.guard import LOCAL_HOSTS, LocalService, public
from unclip.api import BATCH_SIZE, UnCLIPPipeline, unknown_words_note
from unclip.checkpoint import CONFIG_FILE, resolve_folder, shipped_pipelines
from unclip.components import REQUIRED, STAGES
from unclip.config import load_config
from unclip.data.files import Skipped, open_image
from unclip.errors import UserError
from unclip.images import contact_sheet, grid, to_pil, to_uint8
from unclip.options import load_sampling

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")
SHEET_SCALE = 2  # as t2i generate writes grid.png
MAX_UPLOAD_PIXELS = 4096 * 4096  # an uploaded image with more is refused from its header, before it is decoded
MAX_SEED, MAX_STEPS, MAX_GUIDANCE, MAX_TEXT = 2**63 - 1, 1000, 100.0, 1000
POLL_SECONDS = 0.25  # how often a waiting request looks whether its client is still there
decoding = threading.BoundedSemaphore(2)  # uploads decoded at once: memory stays bounded however many arrive


class Busy(Exception):
    """The queue is full."""


class Cancelled(Exception):
    """The client of a job went away."""


class Models:
    """The pipelines on offer by name, each loaded on first use; one that fails to load is kept as unavailable."""

    def __init__(self, sources: dict[str, str | Path], device: str):
        self.sources, self.device = sources, device
        self.loaded: dict[str, UnCLIPPipeline] = {}
        self.broken: dict[str, str] = {}
        self.lock = threading.Lock()
        self.default = next(iter(sources), None)

    def get(self, name: Optional[str]) -> UnCLIPPipeline:
        name = name or self.default
        if name not in self.sources:
            raise UserError(f"unknown pipeline {name!r}: this server offers {', '.join(self.sources)}")
        with self.lock:
            if name in self.broken:
                raise UserError(f"pipeline {name!r} is unavailable: {self.broken[name]}")
            if name not in self.loaded:
                try:
                    self.loaded[name] = UnCLIPPipeline.from_pretrained(self.sources[name], self.device)
                except UserError as e:
                    self.broken[name] = self.public(str(e))
                    raise UserError(f"pipeline {name!r} is unavailable: {self.broken[name]}") from None
        return self.loaded[name]

    def public(self, message: str) -> str:
        return public(message, {str(Path(s).resolve()): n for n, s in self.sources.items()} |
                      {str(s): n for n, s in self.sources.items()})


class Compute:
    """One job at a time on one worker thread, at most `max_queue` waiting behind it."""

    def __init__(self, max_queue: int):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="t2i-compute")
        self.max_queue, self.pending, self.lock = max_queue, 0, threading.Lock()

    def submit(self, job: Callable[[], object], cancel: threading.Event) -> tuple[Future, int]:
        """(the job's future, how many are ahead of it); Busy when the queue is full."""
        with self.lock:
            if self.pending > self.max_queue:
                raise Busy()
            ahead, self.pending = self.pending, self.pending + 1

        def run():
            if cancel.is_set():
                raise Cancelled()
            return job()

        future = self.pool.submit(run)
        future.add_done_callback(lambda _: self.release())  # also when cancelled before it started
        return future, ahead

    def release(self) -> None:
        with self.lock:
            self.pending -= 1


def png_bytes(image: torch.Tensor, scale: int = 1) -> bytes:
    buf = io.BytesIO()
    to_pil(image, scale).save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: torch.Tensor, scale: int = 1) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image, scale)).decode()


def read_image(url: str, pipe: UnCLIPPipeline, size: Optional[int] = None) -> torch.Tensor:
    """An image sent as a data URL (or bare base64), its size checked from its header, decoded and reduced to
    what the pipeline reads at once (uint8 (C, size, size)): a queued job never holds the upload."""
    try:
        data = base64.b64decode(url.split(",", 1)[-1], validate=True)
        with decoding, open_image(data, MAX_UPLOAD_PIXELS) as im:
            return pipe.image(im, size)
    except Skipped as e:
        raise UserError(f"the image sent has {e} (this server takes at most {MAX_UPLOAD_PIXELS:,})") from None
    except (ValueError, binascii.Error, UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise UserError("the image sent is not a PNG, JPEG or other image this server can read") from None


Number = lambda default, high: Field(default, ge=0, le=high, allow_inf_nan=False)  # noqa: E731


class RunRequest(BaseModel):
    """What the page asks for; settings left out take the pipeline's sampling defaults."""

    mode: Literal["generate", "vary", "interpolate"] = "generate"
    pipeline: Optional[str] = Field(None, max_length=200)
    prompt: str = Field("", max_length=MAX_TEXT)
    negative_prompt: Optional[str] = Field(None, max_length=MAX_TEXT)
    num_samples: int = Field(4, ge=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS)
    guidance: Optional[float] = Number(None, MAX_GUIDANCE)
    text_guidance: Optional[float] = Number(None, MAX_GUIDANCE)  # decoders that read the caption
    prior_guidance: Optional[float] = Number(None, MAX_GUIDANCE)
    image: Optional[str] = None  # a data URL: the source of a variation, or the init image of image-to-image
    strength: Optional[float] = Number(None, 1.0)
    start: Optional[str] = None  # interpolation ends: a prompt, or a data URL of an image
    end: Optional[str] = None
    frames: int = Field(8, ge=2)


def create_app(sources: dict[str, str | Path], device: str = "auto", max_images: int = 64, *, max_queue: int = 8,
               allowed_hosts: tuple[str, ...] = LOCAL_HOSTS, token: Optional[str] = None,
               max_body: int = 8 << 20) -> FastAPI:
    """The app over the pipelines `sources` ({name: shipped name or folder}; the first that loads is the default,
    one that does not is listed as unavailable), behind the rules of a local service (server/guard.py)."""
    if not sources:
        raise UserError("no pipeline to serve: pass --checkpoints DIR or install the shipped weights")
    models = Models(sources, device)
    for name in sources:  # the default loads now: a wrong folder is said at start, not at the first request
        try:
            models.get(name)
            models.default = name
            break
        except UserError as e:
            log.warning("%s", e)
    else:
        raise UserError(f"no pipeline could be loaded: {'; '.join(f'{n}: {r}' for n, r in models.broken.items())}")
    compute = Compute(max_queue)
    app = FastAPI(title="t2i", docs_url="/api/docs", redoc_url=None)
    app.add_middleware(LocalService, allowed_hosts=allowed_hosts, token=token, max_body=max_body)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        where = ".".join(loc[1:]) or (loc[0] if loc else "request")
        said = "send a JSON object" if loc == ["body"] else first.get("msg", "invalid")
        return JSONResponse({"detail": f"{where}: {said}"}, 400)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:  # logged here, one line there
        log.error("request failed: %s", exc, exc_info=exc)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); the server logged it"}, 500)

    def refuse(e: UserError) -> HTTPException:
        return HTTPException(400, models.public(str(e)))

    def limit(n: int, what: str) -> None:
        if n > max_images:
            raise UserError(f"{n} {what} is more than this server draws at once ({max_images}; t2i serve --max-images)")

    async def queue(request: Request, job: Callable, cancel: threading.Event):
        """Run `job` on the worker; while it waits or runs, cancel it if the client goes away."""
        try:
            future, _ = compute.submit(job, cancel)
        except Busy:
            raise HTTPException(429, f"the server is busy ({max_queue} requests waiting); try again shortly",
                                headers={"Retry-After": "5"}) from None
        waiting = asyncio.wrap_future(future)
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=POLL_SECONDS)
                if done:
                    return waiting.result()
                if await request.is_disconnected():
                    raise Cancelled()
        finally:
            cancel.set()
            future.cancel()
            waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, so asyncio says nothing

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    def defaults(source: str | Path) -> dict:
        """The folder's sampling.yaml, its stages' configs checked, without loading its weights."""
        folder = resolve_folder(source)
        for name, spec in STAGES.items():
            if (folder / name).is_dir() or name in REQUIRED:
                load_config(spec.config, folder / name / CONFIG_FILE)
        d = load_sampling(folder)
        return {"steps": d.steps, "guidance": d.guidance, "text_guidance": d.text_guidance, "prior_guidance": d.prior_guidance,
                "strength": d.strength}

    @app.get("/api/pipelines")
    def pipelines() -> dict:
        """The pipelines offered, each one's sampling defaults ("defaults": the default one's), and those that could
        not be loaded with the reason ("unavailable")."""
        each, broken = {}, dict(models.broken)
        for name, source in sources.items():
            if name not in broken:
                try:
                    each[name] = defaults(source)
                except UserError as e:
                    broken[name] = models.public(str(e))
        return {"pipelines": list(each), "unavailable": broken, "max_images": max_images,
                "defaults": each.get(models.default) or next(iter(each.values()), {}), "pipeline_defaults": each}

    @app.get("/api/generate", responses={200: {"content": {"image/png": {}}}})
    async def generate(request: Request, prompt: str = Query(..., max_length=MAX_TEXT),
                       num_samples: int = Query(4, ge=1), seed: int = Query(0, ge=0, le=MAX_SEED),
                       steps: Optional[int] = Query(None, ge=1, le=MAX_STEPS),
                       guidance: Optional[float] = Query(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False),
                       prior_guidance: Optional[float] = Query(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False),
                       text_guidance: Optional[float] = Query(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False),
                       negative_prompt: Optional[str] = Query(None, max_length=MAX_TEXT),
                       pipeline: Optional[str] = Query(None, max_length=200),
                       batch_size: int = Query(BATCH_SIZE, ge=1, le=BATCH_SIZE)) -> Response:
        """The contact sheet of `num_samples` images as a PNG: `t2i generate`'s grid.png for the same settings."""
        cancel = threading.Event()

        def prepare() -> tuple[Callable, list[str]]:
            limit(num_samples, "images")
            if not prompt.strip():
                raise UserError("the prompt is empty: say what to draw, e.g. prompt=six")
            pipe = models.get(pipeline)
            options = pipe.options(steps=steps, guidance=guidance, prior_guidance=prior_guidance,
                                   text_guidance=text_guidance)
            return (lambda: pipe(prompt, negative_prompt, num_samples, pipe.generator(seed=seed), "uint8",
                                 stepper(cancel), batch_size=batch_size, options=options).images,
                    pipe.unknown_words(prompt))

        try:
            job, said = await run_in_threadpool(prepare)
            images = await queue(request, job, cancel)
        except UserError as e:
            raise refuse(e) from None
        except Cancelled:
            return Response(status_code=499)  # the client has gone; nobody reads this
        headers = {"X-T2I-Unknown-Words": ", ".join(said)} if said else {}  # words its captions never used
        return Response(png_bytes(contact_sheet(images), SHEET_SCALE), media_type="image/png", headers=headers)

    @app.post("/api/run")
    async def run(req: RunRequest, request: Request) -> StreamingResponse:
        """Generate, vary or interpolate, streamed as JSON lines: queued, progress (with a preview), done."""
        try:
            job, words = await run_in_threadpool(plan, models, req, limit)
        except UserError as e:
            raise refuse(e) from None
        cancel, loop, events = threading.Event(), asyncio.get_running_loop(), asyncio.Queue()
        put = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)  # noqa: E731

        def work() -> None:
            def preview(step: int, total: int, x0: torch.Tensor) -> None:
                stepper(cancel)(step, total, x0)
                put({"type": "progress", "step": step, "total": total, "preview": data_url(grid(to_uint8(x0)))})

            t = time.perf_counter()
            try:
                images = job(preview)
                put({"type": "done", "seconds": round(time.perf_counter() - t, 2),
                     "images": [data_url(x) for x in images], "sheet": data_url(contact_sheet(images), SHEET_SCALE)})
            except Cancelled:
                log.info("a job was cancelled: its client went away")
            except UserError as e:
                put({"type": "error", "message": models.public(str(e))})
            except Exception as e:  # the server keeps serving; the page shows one line
                log.exception("request failed")
                put({"type": "error", "message": f"internal error ({type(e).__name__}); the server logged it"})
            finally:
                put(None)

        try:
            future, ahead = compute.submit(work, cancel)
        except Busy:
            raise HTTPException(429, f"the server is busy ({max_queue} requests waiting); try again shortly",
                                headers={"Retry-After": "5"}) from None

        async def stream():
            try:
                yield json.dumps({"type": "queued", "ahead": ahead}) + "\n"
                if words:
                    yield json.dumps({"type": "warning", "message": unknown_words_note(words)}) + "\n"
                while True:
                    try:
                        event = await asyncio.wait_for(events.get(), POLL_SECONDS)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                    if event is None:
                        return
                    yield json.dumps(event) + "\n"
            finally:  # the client went away (or all is sent): a job not yet done is cancelled
                cancel.set()
                future.cancel()

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    return app


def stepper(cancel: threading.Event):
    """The API's step callback that ends a job whose client has gone, at its next denoising step."""

    def step(step: int, total: int, x0: torch.Tensor) -> None:
        if cancel.is_set():
            raise Cancelled()

    return step


Job = Callable[[Callable], torch.Tensor]  # job(callback) -> uint8 images


def plan(models: Models, req: RunRequest, limit) -> tuple[Job, list[str]]:
    """Check a request completely (a 400 comes before any event), decode and reduce its images, and return the
    work it asks for, with its prompts' words the pipeline never saw."""
    pipe = models.get(req.pipeline)
    options = pipe.options(steps=req.steps, guidance=req.guidance, prior_guidance=req.prior_guidance,
                           strength=req.strength, text_guidance=req.text_guidance)
    generator = lambda: pipe.generator(seed=req.seed)  # noqa: E731
    if req.mode == "generate":
        limit(req.num_samples, "images")
        if not req.prompt.strip():
            raise UserError("the prompt is empty: say what to draw")
        init = read_image(req.image, pipe, pipe.image_size) if req.image else None
        return (lambda cb: pipe(req.prompt, req.negative_prompt, req.num_samples, generator(), "uint8", cb, init,
                                options=options).images), pipe.unknown_words(req.prompt)
    if req.mode == "vary":
        limit(req.num_samples, "images")
        if not req.image:
            raise UserError("variations need an image")
        source = read_image(req.image, pipe)
        return (lambda cb: pipe.variations(source, req.num_samples, generator(), "uint8", cb, options=options).images), []
    limit(req.frames, "frames")
    ends = []
    for end in (req.start, req.end):
        if not end or not end.strip():
            raise UserError("an interpolation needs two ends, each a prompt or an image")
        if len(end) > MAX_TEXT and not end.startswith("data:"):
            raise UserError(f"an interpolation's end is a prompt of at most {MAX_TEXT} characters, or an image")
        ends.append(read_image(end, pipe) if end.startswith("data:") else end)
    words = pipe.unknown_words(" ".join(e for e in ends if isinstance(e, str)))
    return (lambda cb: pipe.interpolate(ends[0], ends[1], req.frames, generator(), "uint8", cb, options=options).images), words


def pipeline_sources(checkpoints: list[str]) -> dict[str, str]:
    """The pipelines to offer: the user's folders or names (each named by its folder; the first is the default),
    then every shipped pipeline."""
    sources = {Path(c).name or str(c): str(c) for c in checkpoints}
    for name in shipped_pipelines():
        sources.setdefault(name, name)
    return sources
