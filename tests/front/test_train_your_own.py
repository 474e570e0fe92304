"""docs/guides/train-your-own.md, run as written: its shell blocks, in order, in a folder holding the pictures it
describes, from the caption folder to a served pipeline."""
from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import draw_glyphs

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "guides" / "train-your-own.md"


def commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_the_train_your_own_guide_runs_as_written(tmp_path):
    pytest.importorskip("uvicorn", reason="its last step serves the pipeline (the serve extra)")
    pictures = tmp_path / "my-pictures"
    pictures.mkdir()
    images, labels = draw_glyphs(96, 4)
    colours = ["grey", "red", "blue"]
    rows = []
    for i, (image, label) in enumerate(zip(images, labels)):
        colour = colours[i % 3]
        Image.fromarray(image).convert("RGB").resize((48, 48)).save(pictures / f"cat-{i:03d}.jpg")
        rows.append({"file_name": f"cat-{i:03d}.jpg", "text": f"a {colour} cat number {label}"})
    (pictures / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    t2i = str(Path(sys.executable).with_name("t2i"))
    steps = commands()
    assert [s.split()[1] for s in steps] == ["clip-train", "decoder-train", "runs", "generate", "export", "serve"]
    for step in steps[:-1]:
        r = subprocess.run([t2i, *shlex.split(step)[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (step, r.stdout + r.stderr)
    assert sorted(p.name for p in (tmp_path / "outputs" / "first").iterdir()) == \
        ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png"]
    assert (tmp_path / "my-pipeline" / "decoder" / "model.safetensors").is_file()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = subprocess.Popen([t2i, *shlex.split(steps[-1])[1:], "--port", str(port), "--device", "cpu"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/pipelines", timeout=5) as r:
                    info = json.load(r)
                break
            except OSError:
                assert serve.poll() is None and time.time() < deadline, serve.stdout.read() if serve.poll() else "no start"
                time.sleep(0.5)
        assert "my-pipeline" in info["pipelines"]
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(30)
