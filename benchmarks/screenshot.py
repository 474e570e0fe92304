"""The screenshot in docs/guides/serve.md of `t2i serve`, taken as the browser test drives the page: headless Chromium
(Debian's chromium and chromium-driver) types a prompt, presses Generate and waits for the images.

    python benchmarks/screenshot.py --out docs/serve.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t2i.server import browser  # noqa: E402
from t2i.server.app import create_app, pipeline_sources  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default="six")
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "serve.png")
    args = ap.parse_args()
    if reason := browser.missing():
        sys.exit(f"cannot take the screenshot: {reason}")
    app = create_app(pipeline_sources([]), "cpu")
    with browser.live_server(app) as url, browser.chromium(1280, 820) as driver:
        images = browser.generate_in_page(driver, url, args.prompt, args.num)
        if len(images) != args.num:
            sys.exit(f"the page did not show {args.num} images")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
