"""Issue 45's attacks against a real `t2i serve` on 127.0.0.1, each followed by a normal request that must succeed.

    python benchmarks/abuse.py [--checkpoints mnist] [--out benchmarks/results/abuse]

Starts `t2i serve` in a subprocess (the shipped pipeline by default), then: a DNS-rebinding Host, cross-site and
cross-origin requests, an oversized body, 13000x13000 and 20000x20000 PNGs, a multipart body, seeds, NaN and
infinite guidance, a broken pipeline folder among --checkpoints, 40 concurrent 13000x13000 uploads (the server's
peak memory against its idle level), 45 waiting requests (how long GET / takes meanwhile) and three clients that
walk away (how soon the next user is served). Bounded: each case has a timeout; the whole run takes about a minute.
Writes OUT/abuse.json and OUT/abuse.md; exits 1 if a case failed.
"""
from __future__ import annotations

import argparse
import base64
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NORMAL = {"prompt": "six", "num_samples": 1, "steps": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def big_png(side: int, cache: Path) -> bytes:
    """A real PNG of side x side pixels (mostly blank, so it is small on disk: the issue's was 690 KB)."""
    path = cache / f"blank-{side}.png"
    if not path.is_file():
        im = Image.new("L", (side, side))
        im.paste(255, (0, 0, side, 64))
        im.save(path, optimize=False)
    return path.read_bytes()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def walk_away(base: str, query: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(f"GET /api/generate?{query} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", default="mnist")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "abuse")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="t2i-abuse-"))
    broken = work / "broken"
    shutil.copytree(ROOT / "checkpoints" / "mnist", broken)
    (broken / "decoder" / "config.yaml").write_text("model: {widht: 3}\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(work / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "t2i.cli", "serve", "--port", str(port), "--device", "cpu",
                               "--checkpoints", args.checkpoints, "--checkpoints", str(broken), "--max-queue", "48"],
                              stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=base, timeout=120)
    results, failed = [], []
    try:
        deadline = time.time() + 120
        while True:
            try:
                if client.get("/").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit(f"t2i serve did not start: {(work / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.5)
        client.get("/api/generate", params=NORMAL)  # warm
        idle = rss_mib(server.pid)

        def case(name: str, send, expect: int, said: str = "") -> None:
            t = time.perf_counter()
            try:
                r = send()
                detail = r.json().get("detail", "") if r.headers.get("content-type", "").startswith("application/json") else ""
                ok = r.status_code == expect and said in detail and "\n" not in detail and str(work) not in r.text
                got = f"{r.status_code} {detail}"
            except Exception as e:  # noqa: BLE001 (a case that breaks the client is a failure, not a crash)
                ok, got = False, f"{type(e).__name__}: {e}"
            after = client.get("/api/generate", params=NORMAL).status_code
            row = {"case": name, "expected": expect, "got": got[:200], "then a normal request": after,
                   "seconds": round(time.perf_counter() - t, 2), "ok": ok and after == 200}
            results.append(row)
            (failed if not row["ok"] else []).append(name)
            print(f"{'ok  ' if row['ok'] else 'FAIL'} {name}: {row['got']} (then {after})", flush=True)

        png13, png20 = big_png(13000, work), big_png(20000, work)
        case("Host: rebind.example (DNS rebinding)", lambda: client.get("/api/generate", params=NORMAL,
             headers={"host": f"rebind.example:{port}"}), 403, "not allowed")
        case("GET /api/generate from another site", lambda: client.get("/api/generate", params=NORMAL,
             headers={"sec-fetch-site": "cross-site"}), 403, "another site")
        case("POST /api/run with a foreign Origin", lambda: client.post("/api/run", json={"prompt": "six"},
             headers={"origin": "http://evil.example"}), 403, "another origin")
        case("a 53 MB body", lambda: client.post("/api/run", content=b"x" * (53 << 20),
             headers={"content-type": "application/json"}), 413, "larger than")
        case("a 13000x13000 PNG (vary)", lambda: client.post("/api/run", json={"mode": "vary", "image": data_url(png13)}),
             400, "too many pixels")
        case("a 20000x20000 PNG (vary)", lambda: client.post("/api/run", json={"mode": "vary", "image": data_url(png20)}),
             400, "too many pixels")
        case("seed=99999999999999999999999", lambda: client.get("/api/generate", params={**NORMAL,
             "seed": "99999999999999999999999"}), 400, "seed")
        case("guidance=NaN", lambda: client.get("/api/generate", params={**NORMAL, "guidance": "nan"}), 400, "guidance")
        case("guidance=Infinity (JSON)", lambda: client.post("/api/run", content=b'{"prompt": "six", "guidance": Infinity}',
             headers={"content-type": "application/json"}), 400, "guidance")
        case("a multipart body", lambda: client.post("/api/run", files={"prompt": (None, "six")}), 400, "body")
        case("seed=abc", lambda: client.get("/api/generate", params={**NORMAL, "seed": "abc"}), 400, "seed")
        case("a broken pipeline among --checkpoints", lambda: client.get("/api/pipelines"), 200)
        info = client.get("/api/pipelines").json()
        listed = "broken" in info.get("unavailable", {}) and str(work) not in json.dumps(info)
        results[-1]["ok"] &= listed
        if not listed:
            failed.append("a broken pipeline among --checkpoints")
        case("the broken pipeline asked for", lambda: client.get("/api/generate", params={**NORMAL, "pipeline": "broken"}),
             400, "unavailable")

        # 40 concurrent 13000x13000 uploads: the server's memory against its idle level
        peak, stop = [idle], threading.Event()

        def watch():
            while not stop.is_set():
                peak.append(rss_mib(server.pid))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        body = json.dumps({"mode": "vary", "image": data_url(png13)}).encode()
        with httpx.Client(base_url=base, timeout=120) as c40:
            threads = [threading.Thread(target=lambda: c40.post("/api/run", content=body,
                                                                headers={"content-type": "application/json"}))
                       for _ in range(40)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        stop.set()
        watcher.join()
        memory = {"idle_mib": round(idle, 1), "peak_mib": round(max(peak), 1), "ratio": round(max(peak) / idle, 3)}
        print(f"memory under 40 concurrent 13000x13000 uploads: {memory}", flush=True)

        # 45 requests waiting: how long GET / takes meanwhile
        waiting = [walk_away(base, "prompt=six&num_samples=16&steps=10") for _ in range(45)]
        time.sleep(1.0)
        t = time.perf_counter()
        page_ok = client.get("/").status_code == 200
        page_seconds = round(time.perf_counter() - t, 3)
        for s in waiting:
            s.close()
        # three clients that walk away: how soon the next user is served
        long = [walk_away(base, "prompt=six&num_samples=64&steps=50&batch_size=64") for _ in range(3)]
        time.sleep(2.0)
        for s in long:
            s.close()
        t = time.perf_counter()
        served = client.get("/api/generate", params=NORMAL).status_code
        next_user = round(time.perf_counter() - t, 2)
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    served_log = (work / "serve.log").read_text()
    traceback = "Traceback" in served_log
    if traceback:
        print(served_log[served_log.index("Traceback") - 300:][:3000])
    summary = {"cases": results, "memory": memory, "get_page_seconds_while_45_wait": page_seconds,
               "next_user_seconds_after_3_walked_away": next_user, "next_user_status": served,
               "server_alive": alive, "traceback_in_log": traceback}
    targets = {"every case clean": not failed, "memory <= 1.5x idle": memory["ratio"] <= 1.5,
               "GET / < 1 s while 45 wait": page_ok and page_seconds < 1.0,
               "next user served after walk-aways": served == 200, "no traceback in the server's log": not traceback}
    summary["targets"] = targets
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "abuse.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# t2i serve under abuse ({time.strftime('%Y-%m-%d')}, `python benchmarks/abuse.py`, {os.cpu_count()} CPUs)", "",
             "| case | expected | got | then a normal request | ok |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['case']} | {r['expected']} | {r['got'].replace('|', '/')} | {r['then a normal request']} | "
              f"{'yes' if r['ok'] else 'NO'} |" for r in results]
    lines += ["", f"- memory under 40 concurrent 13000x13000 uploads: idle {memory['idle_mib']} MiB, peak "
              f"{memory['peak_mib']} MiB ({memory['ratio']}x)",
              f"- GET / while 45 requests wait: {page_seconds} s",
              f"- the next user, after three clients walked away from 64-image jobs: served in {next_user} s",
              f"- server alive at the end: {alive}; a traceback in its log: {traceback}", "",
              "| target | met |", "| --- | --- |"] + [f"| {k} | {'yes' if v else 'NO'} |" for k, v in targets.items()]
    (args.out / "abuse.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if all(targets.values()) else 1)


if __name__ == "__main__":
    main()
