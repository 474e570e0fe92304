"""t2i serve over HTTP (FastAPI's TestClient): the plain endpoint, the streamed runs, bad requests, queueing."""
from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("fastapi", reason="t2i serve is an optional extra: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (the test extra)")
from fastapi.testclient import TestClient  # noqa: E402

from t2i.cli import app as cli_app  # noqa: E402
from t2i.server.app import create_app, pipeline_sources  # noqa: E402
from unclip.config import DEFAULT_PIPELINE  # noqa: E402
from unclip.errors import UserError  # noqa: E402
from unclip.options import SamplingOptions  # noqa: E402
from unclip.pipeline import Pipeline, steps_per_image  # noqa: E402

runner = CliRunner()
# a PNG whose header says 20000 x 20000 pixels (a decompression bomb's): refused from its header, never decoded
HUGE_PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"".join(
    struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in
    ((b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)), (b"IDAT", zlib.compress(b"\0" * 64)),
     (b"IEND", b"")))).decode()


@pytest.fixture(scope="module")
def client(tiny_pipeline):
    app = create_app({"tiny": tiny_pipeline}, "cpu", max_images=16, allowed_hosts=("testserver",))
    with TestClient(app) as c:
        yield c


def png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def events(response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines()]


def test_api_generate_returns_the_clis_contact_sheet(client, tiny_pipeline, tmp_path):
    r = client.get("/api/generate", params={"prompt": "six", "num_samples": 5, "seed": 3, "steps": 3, "batch_size": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    cli = runner.invoke(cli_app, ["generate", "--checkpoints", str(tiny_pipeline), "--prompt", "six", "-n", "5",
                                  "--seed", "3", "--steps", "3", "--batch-size", "2", "--out", str(tmp_path)])
    assert cli.exit_code == 0, cli.output
    np.testing.assert_array_equal(png(r.content), np.asarray(Image.open(tmp_path / "grid.png")))
    other = client.get("/api/generate", params={"prompt": "six", "num_samples": 5, "seed": 4, "steps": 3, "batch_size": 2})
    assert not np.array_equal(png(other.content), png(r.content))


def test_run_streams_progress_then_images_and_a_click_varies_one(client, tiny_pipeline):
    r = client.post("/api/run", json={"prompt": "seven", "negative_prompt": "one", "num_samples": 3, "steps": 4, "seed": 1})
    assert r.status_code == 200
    ev = events(r)
    total = steps_per_image(Pipeline.load(tiny_pipeline, "cpu"), SamplingOptions(steps=4))
    progress = [e for e in ev if e["type"] == "progress"]
    assert ev[0]["type"] == "queued" and ev[-1]["type"] == "done"
    assert [e["step"] for e in progress] == list(range(1, total + 1)) and progress[-1]["total"] == total
    assert progress[0]["preview"].startswith("data:image/png;base64,")
    images = ev[-1]["images"]
    assert len(images) == 3 and ev[-1]["sheet"].startswith("data:image/png")
    vary = events(client.post("/api/run", json={"mode": "vary", "image": images[0], "num_samples": 2, "steps": 3}))
    assert vary[-1]["type"] == "done" and len(vary[-1]["images"]) == 2
    lerp = events(client.post("/api/run", json={"mode": "interpolate", "start": "one", "end": images[1], "frames": 4, "steps": 2}))
    assert lerp[-1]["type"] == "done" and len(lerp[-1]["images"]) == 4
    edit = events(client.post("/api/run", json={"prompt": "eight", "image": images[2], "strength": 0.0, "num_samples": 1}))
    assert edit[-1]["images"] == [images[2]]  # strength 0 gives the image back, pixel for pixel


@pytest.mark.parametrize("method,url,payload,status,message", [
    ("get", "/api/generate", {"prompt": "  "}, 400, "prompt is empty"),
    ("get", "/api/generate", {"prompt": "six", "num_samples": 100000}, 400, "more than this server draws at once"),
    ("get", "/api/generate", {"prompt": "six", "seed": "abc"}, 400, "seed: Input should be a valid integer"),
    ("get", "/api/generate", {"prompt": "six", "seed": 99999999999999999999999}, 400, "seed: Input should be less than"),
    ("get", "/api/generate", {"prompt": "six", "guidance": "nan"}, 400, "guidance: Input should be a finite number"),
    ("get", "/api/generate", {"prompt": "six", "prior_guidance": "inf"}, 400, "prior_guidance: Input should be a finite"),
    ("get", "/api/generate", {"prompt": "six", "pipeline": "nope"}, 400, "unknown pipeline 'nope'"),
    ("get", "/api/generate", {"prompt": "six", "steps": 500}, 400, "more than the 50 diffusion steps"),
    ("get", "/api/generate", {}, 400, "prompt: Field required"),
    ("post", "/api/run", {"prompt": ""}, 400, "prompt is empty"),
    ("post", "/api/run", {"mode": "vary", "image": "data:image/png;base64,AAAA"}, 400, "not a PNG, JPEG or other image"),
    ("post", "/api/run", {"mode": "interpolate", "start": "one"}, 400, "two ends"),
    ("post", "/api/run", {"mode": "vary", "image": "data:image/png;base64," + HUGE_PNG}, 400, "too many pixels"),
    ("post", "/api/run", {"prompt": "six", "strength": 2}, 400, "strength: Input should be less than or equal to 1"),
    ("post", "/api/run", {"prompt": "six", "num_samples": 0}, 400, "num_samples: Input should be greater than"),
    ("post", "/api/run", '{"prompt": "six", "guidance": Infinity}', 400, "guidance: Input should be a finite number"),
    ("post", "/api/run", '{"prompt": "six", "seed": 1e400}', 400, "seed"),
    ("post", "/api/run", b"--x\r\nContent-Disposition: form-data; name=prompt\r\n\r\nsix\r\n--x--\r\n", 400, "body"),
])
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(client, method, url, payload, status, message):
    if method == "get":
        r = client.get(url, params=payload)
    elif isinstance(payload, dict):
        r = client.post(url, json=payload)
    else:  # what a JSON encoder would not write: Infinity, a number too large, a multipart form
        kind = "application/json" if isinstance(payload, str) else "multipart/form-data; boundary=x"
        r = client.post(url, content=payload, headers={"content-type": kind})
    assert r.status_code == status and message in r.json()["detail"] and "\n" not in r.json()["detail"], r.text
    assert client.get("/api/generate", params={"prompt": "six", "num_samples": 1, "steps": 1}).status_code == 200


def test_concurrent_requests_queue_and_each_gets_its_own_images(client):
    params = [{"prompt": p, "num_samples": 2, "steps": 3, "seed": s} for p, s in (("one", 0), ("two", 1), ("three", 2))]
    expected = [client.get("/api/generate", params=p).content for p in params]
    got: dict[int, bytes] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, client.get("/api/generate", params=params[i]).content))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(3)] == expected


def test_page_and_pipeline_list(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="prompt"' in page.text and 'id="negative"' in page.text
    info = client.get("/api/pipelines").json()
    assert info["pipelines"] == ["tiny"] and info["defaults"]["steps"] == SamplingOptions().steps
    assert info["pipeline_defaults"] == {"tiny": info["defaults"]}  # each pipeline's own (its sampling.yaml)


def test_serve_offers_the_users_pipelines_then_the_shipped_ones_and_lists_a_broken_one_as_unavailable(tmp_path, tiny_pipeline):
    sources = pipeline_sources([str(tmp_path / "mine")])
    assert list(sources)[0] == "mine" and "mnist" in sources
    assert list(pipeline_sources([]))[0] == DEFAULT_PIPELINE == "mnist"  # the page's default is the CLI's
    broken = tmp_path / "[broken]"
    shutil.copytree(tiny_pipeline, broken)
    (broken / "decoder" / "config.yaml").write_text("model: {widht: 3}\n")
    with TestClient(create_app({"mine": broken, "tiny": tiny_pipeline}, "cpu", allowed_hosts=("testserver",))) as c:
        info = c.get("/api/pipelines").json()
        assert info["pipelines"] == ["tiny"] and "unknown config key model.widht" in info["unavailable"]["mine"]
        assert str(tmp_path) not in json.dumps(info)  # no path of the server's
        r = c.get("/api/generate", params={"prompt": "six", "pipeline": "mine"})
        assert r.status_code == 400 and "pipeline 'mine' is unavailable" in r.json()["detail"]
        assert str(tmp_path) not in r.text
        assert c.get("/api/generate", params={"prompt": "six", "num_samples": 1, "steps": 1}).status_code == 200
    with pytest.raises(UserError, match="no pipeline could be loaded"):
        create_app({"mine": tmp_path / "[nowhere]"}, "cpu")


def test_words_the_pipeline_never_saw_are_said_to_the_page_and_to_scripts(client):
    r = client.get("/api/generate", params={"prompt": "a cat", "num_samples": 1, "steps": 1})
    assert r.status_code == 200 and r.headers["x-t2i-unknown-words"] == "cat"
    assert "x-t2i-unknown-words" not in client.get("/api/generate", params={"prompt": "a six", "num_samples": 1,
                                                                             "steps": 1}).headers
    ev = events(client.post("/api/run", json={"prompt": "a red cat", "num_samples": 1, "steps": 1}))
    warning = [e for e in ev if e["type"] == "warning"]
    assert len(warning) == 1 and "'red', 'cat' never appeared" in warning[0]["message"] and ev[-1]["type"] == "done"
