"""Headless Chromium (Debian's `chromium` and `chromium-driver`) driven by Selenium, over a live `t2i serve`
app on a free local port: used by the browser test and to take the screenshot in docs/guides/serve.md."""
from __future__ import annotations

import shutil
import socket
import threading
import time
from contextlib import contextmanager

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def missing() -> str | None:
    """Why a browser session cannot start here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not any(shutil.which(b) for b in CHROMIUM):
        return "no Chromium here (Debian: apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "no chromedriver here (Debian: apt-get install chromium-driver)"
    return None


@contextmanager
def live_server(app):
    """Serve `app` with uvicorn on 127.0.0.1 and a free port, in a thread; yield its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def chromium(width: int = 1280, height: int = 900):
    """A headless Chromium WebDriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = next(shutil.which(b) for b in CHROMIUM if shutil.which(b))
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def generate_in_page(driver, url: str, prompt: str, num: int, steps: int | None = None, timeout: float = 120) -> list:
    """Open the page, type a prompt, press Generate and wait for `num` result images; return them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pipeline option"))
    for field, value in (("prompt", prompt), ("num", str(num))) + ((("steps", str(steps)),) if steps else ()):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    driver.find_element(By.ID, "go").click()
    results = lambda d: d.find_elements(By.CSS_SELECTOR, "#results img.result")  # noqa: E731
    WebDriverWait(driver, timeout).until(lambda d: len(results(d)) == num or "error" in d.find_element(By.ID, "status").get_attribute("class"))
    return results(driver)
