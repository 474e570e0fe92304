"""The web page end to end in headless Chromium: type a prompt, press Generate, wait for the images."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="t2i serve is an optional extra: pip install -e '.[serve]'")
from t2i.server import browser  # noqa: E402
from t2i.server.app import create_app  # noqa: E402

if reason := browser.missing():
    pytest.skip(reason, allow_module_level=True)


@pytest.mark.slow
def test_generate_then_vary_in_a_real_browser(tiny_pipeline):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app = create_app({"tiny": tiny_pipeline}, "cpu", max_images=16)
    with browser.live_server(app) as url, browser.chromium() as driver:
        images = browser.generate_in_page(driver, url, "a handwritten six", 3, steps=3)
        status = driver.find_element(By.ID, "status").text
        assert len(images) == 3, status
        assert driver.execute_script("return arguments[0].naturalWidth", images[0]) == 28
        assert "3 " in status and driver.find_element(By.ID, "sheet-link").get_attribute("href").startswith("data:image/png")
        assert driver.find_element(By.ID, "progress").get_attribute("value") == driver.find_element(By.ID, "progress").get_attribute("max")
        images[0].click()  # variations of the clicked image
        WebDriverWait(driver, 120).until(lambda d: "variations" in d.find_element(By.ID, "status").text)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#results img.result")) == 3
        driver.find_element(By.ID, "prompt").clear()
        driver.find_element(By.ID, "go").click()  # an empty prompt: a message, and the page still works
        WebDriverWait(driver, 30).until(lambda d: "prompt is empty" in d.find_element(By.ID, "status").text)
