"""Safe to point at untrusted files and to leave running (issue 45): nothing t2i loads runs code, the web app keeps
to the rules of a local service, a dataset cannot hang or crash training, and a failed save is one line.
benchmarks/abuse.py runs the same attacks, and heavier ones, against a real `t2i serve`."""
from __future__ import annotations

import base64
import errno
import io
import json
import os
import socket
import struct
import tarfile
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from t2i.cli import app
from tests.conftest import draw_glyphs
from unclip.checkpoint import atomic_write, atomic_write_text, remove_stale_temporaries
from unclip.data import load_dataset
from unclip.errors import CheckpointError, UserError

runner = CliRunner()


def huge_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no data: a decompression bomb's shape."""
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


class Payload:
    """What a hostile train_state.pt holds: unpickling it would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---- nothing t2i loads runs code ----

@pytest.mark.slow
def test_a_hostile_train_state_is_refused_in_one_line_and_runs_nothing(tiny_config, mnist_dir, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    r = runner.invoke(app, ["clip-train", "--config", str(tiny_config), "--data-dir", str(mnist_dir), "--max-steps", "2",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    torch.save({"model": Payload(marker), "optimizer": {}, "step": 1, "rng": []}, out / "train_state.pt")
    (out / "run.json").unlink()  # as a shared folder of a stopped run might look: resume reads the state
    r = runner.invoke(app, ["clip-train", "--config", str(tiny_config), "--data-dir", str(mnist_dir), "--max-steps", "4",
                            "--out", str(out), "--resume"])
    assert r.exit_code == 1 and "train_state.pt: refused" in r.output and "Traceback" not in r.output, r.output
    assert r.output.strip().count("\n") == 0 or "error:" in r.output.strip().splitlines()[-1]
    assert not marker.exists()


# ---- the web app: a local service ----

@pytest.fixture(scope="module")
def served(tiny_pipeline):
    pytest.importorskip("fastapi", reason="t2i serve is an optional extra")
    pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
    from fastapi.testclient import TestClient

    from t2i.server.app import create_app

    with TestClient(create_app({"tiny": tiny_pipeline}, "cpu", max_images=16), base_url="http://127.0.0.1:7860") as c:
        yield c


def test_other_hosts_and_other_sites_are_refused(served):
    ok = {"prompt": "six", "num_samples": 1, "steps": 1}
    assert served.get("/api/generate", params=ok).status_code == 200
    for headers, said in (({"host": "rebind.example:7860"}, "host 'rebind.example' is not allowed"),
                          ({"sec-fetch-site": "cross-site"}, "from another site"),
                          ({"origin": "http://evil.example"}, "from another origin"),
                          ({"origin": "http://127.0.0.1:9999"}, "from another origin")):
        r = served.get("/api/generate", params=ok, headers=headers)
        assert r.status_code == 403 and said in r.json()["detail"], (headers, r.text)
    assert served.get("/api/generate", params=ok, headers={"origin": "http://127.0.0.1:7860",
                                                           "sec-fetch-site": "same-origin"}).status_code == 200
    r = served.post("/api/run", content=b"{}", headers={"origin": "http://evil.example", "content-type": "application/json"})
    assert r.status_code == 403


def test_bodies_and_images_are_bounded_before_they_are_read(served):
    r = served.post("/api/run", content=b"x" * (9 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than this server takes" in r.json()["detail"]
    bomb = "data:image/png;base64," + base64.b64encode(huge_png()).decode()
    for size in ((20000, 20000), (13000, 13000)):
        r = served.post("/api/run", json={"mode": "vary", "image": "data:image/png;base64,"
                                          + base64.b64encode(huge_png(*size)).decode()})
        assert r.status_code == 400 and "too many pixels" in r.json()["detail"], r.text
    r = served.post("/api/run", json={"prompt": "six", "image": bomb})
    assert r.status_code == 400 and "/" not in r.json()["detail"].split("this server")[0]


def test_a_token_guards_the_server(tiny_pipeline):
    from fastapi.testclient import TestClient

    from t2i.server.app import create_app

    with TestClient(create_app({"tiny": tiny_pipeline}, "cpu", token="s3cret"), base_url="http://127.0.0.1") as c:
        assert c.get("/").status_code == 401 and c.get("/", params={"token": "wrong"}).status_code == 401
        page = c.get("/", params={"token": "s3cret"})
        assert page.status_code == 200 and "t2i_token=s3cret" in page.headers["set-cookie"]
        assert c.get("/api/pipelines").status_code == 200  # the cookie the page got
        c.cookies.clear()
        assert c.get("/api/pipelines").status_code == 401
        assert c.get("/api/pipelines", headers={"authorization": "Bearer s3cret"}).status_code == 200


def test_serve_beyond_this_machine_makes_up_a_token_and_prints_it(monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app_, host, port, log_level: seen.update(app=app_, host=host))
    r = runner.invoke(app, ["serve", "--host", "0.0.0.0", "--port", "7999"])
    assert r.exit_code == 0 and seen["host"] == "0.0.0.0" and "?token=" in r.output and "reachable from other" in r.output
    local = runner.invoke(app, ["serve"])
    assert local.exit_code == 0 and "?token=" not in local.output


def slow_request(base: str, params: str) -> socket.socket:
    """A GET sent on a raw socket, so the test can walk away from it."""
    host, port = base.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(f"GET /api/generate?{params} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    return s


@pytest.mark.slow
def test_a_full_queue_answers_429_an_abandoned_job_stops_and_the_page_stays_fast(tiny_pipeline, monkeypatch):
    pytest.importorskip("uvicorn", reason="t2i serve is an optional extra")
    import httpx

    import t2i.server.app as server
    from t2i.server.browser import live_server

    steps_after_cancel, stepper = {}, server.stepper  # job -> the steps it began after its cancel

    def counting(cancel):
        inner = stepper(cancel)

        def step(step, total, x0):
            if cancel.is_set():
                steps_after_cancel.setdefault(id(cancel), []).append(step)
            return inner(step, total, x0)

        return step

    monkeypatch.setattr(server, "stepper", counting)
    app_ = server.create_app({"tiny": tiny_pipeline}, "cpu", max_images=64, max_queue=2)
    with live_server(app_) as base:
        long = "prompt=six&num_samples=64&steps=50&batch_size=64"
        walkers = [slow_request(base, long) for _ in range(3)]  # one computes, two wait: the queue is full
        time.sleep(1.0)
        r = httpx.get(f"{base}/api/generate", params={"prompt": "six", "num_samples": 1, "steps": 1}, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "5"
        t = time.perf_counter()
        assert httpx.get(f"{base}/", timeout=30).status_code == 200
        assert time.perf_counter() - t < 1.0  # nothing waiting holds a thread the page needs
        for s in walkers:  # every client walks away
            s.close()
        t = time.perf_counter()
        while (r := httpx.get(f"{base}/api/generate", params={"prompt": "six", "num_samples": 1, "steps": 1},
                              timeout=60)).status_code == 429 and time.perf_counter() - t < 30:
            time.sleep(0.1)
        assert r.status_code == 200 and time.perf_counter() - t < 5, time.perf_counter() - t
    # Each job stopped at its next step once its client was seen gone. A waiting job can reach the worker
    # between its client closing and the server's next look (POLL_SECONDS): then it stops at its first step.
    assert all(len(steps) == 1 for steps in steps_after_cancel.values()), steps_after_cancel


# ---- data: nothing hangs, nothing crashes ----

def test_a_caption_folder_skips_and_counts_what_it_cannot_use(tmp_path, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    images, labels = draw_glyphs(12, 5)
    rows = []
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {label}"})
    (folder / "bomb.png").write_bytes(huge_png())
    os.mkfifo(folder / "pipe.png")  # reading it would block for ever
    (tmp_path / "outside.png").write_bytes((folder / "0.png").read_bytes())
    rows += [{"file_name": "bomb.png", "text": "a bomb"}, {"file_name": "pipe.png", "text": "a pipe"},
             {"file_name": "../outside.png", "text": "out"}, {"file_name": str(tmp_path / "outside.png"), "text": "abs"},
             {"file_name": "1.png", "text": "   "}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_dataset(f"folder:{folder}", "train", channels=1, size=28, val_size=2)
    assert len(data) == 12 - 1  # 12 usable, one held out for validation
    said = " ".join(r.getMessage() for r in caplog.records)
    for reason in ("1 too many pixels", "1 not a regular file", "2 outside its folder", "1 empty caption"):
        assert reason in said, said


def test_a_caption_file_that_is_not_utf8_names_its_file_and_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", "text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"metadata.jsonl:2:\d+: not UTF-8 text \(byte 0xe9\)"):
        load_dataset(f"folder:{tmp_path}", "train")


def test_a_truncated_shard_is_said_and_counted(tmp_path, caplog):
    pytest.importorskip("webdataset", reason="webdataset is not installed")
    from unclip.data.sources import Shards, decode_source

    images, _ = draw_glyphs(6, 1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, image in enumerate(images):
            png = io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            for suffix, payload in (("txt", f"a glyph {i}".encode()), ("png", png.getvalue())):
                info = tarfile.TarInfo(f"{i:04d}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    buf.seek(0)
    cut = tarfile.open(fileobj=buf).getmember("0004.png").offset_data + 10
    (tmp_path / "0.tar").write_bytes(buf.getvalue()[:cut])  # a copy that stopped inside the fifth sample's image
    source = Shards(str(tmp_path / "0.tar"), 1, 28)
    decoded = sum(len(b) for b, _ in decode_source(source, workers=0))
    assert decoded == source.counts[0] == 4 and source.skips.get("truncated shard") == 1
    assert "0.tar is truncated" in caplog.text


# ---- faults: a failed save is one line, the last good checkpoint intact ----

def test_a_full_disk_or_a_read_only_folder_is_one_line_and_keeps_the_last_save(tmp_path, monkeypatch):
    target = tmp_path / "run" / "model.safetensors"
    atomic_write_text(target, "good")

    def full(tmp):
        Path(tmp).write_text("part")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointError, match=r"cannot write to .*run: no space left on device; what was saved there"):
        atomic_write(target, full)
    with pytest.raises(CheckpointError, match="cannot write to .*run: the write failed with .* MiB free"):
        atomic_write(target, lambda tmp: (_ for _ in ()).throw(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")))
    with pytest.raises(CheckpointError, match="read-only file system"):
        atomic_write(target, lambda tmp: (_ for _ in ()).throw(OSError(errno.EROFS, os.strerror(errno.EROFS))))
    assert target.read_text() == "good" and [p.name for p in target.parent.iterdir()] == ["model.safetensors"]


def test_saves_are_fsynced_and_stale_temporaries_are_removed_when_training_starts(tmp_path, monkeypatch, tiny_config, mnist_dir):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    atomic_write_text(tmp_path / "a.yaml", "x: 1\n")
    assert len(synced) == 2  # the file, then its folder (the rename)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".model.safetensors.abc123.tmp").write_bytes(b"\0" * 1000)  # what kill -9 mid-save leaves
    r = runner.invoke(app, ["clip-train", "--config", str(tiny_config), "--data-dir", str(mnist_dir), "--max-steps", "2",
                            "--out", str(out)])
    assert r.exit_code == 0 and "removed 1 temporary file" in r.output
    assert not list(out.glob(".*.tmp")) and remove_stale_temporaries(out) == 0
