"""Shared test helpers (plain functions; fixtures live in conftest.py). Imported as ``from helpers import ...``:
pytest puts this folder on sys.path (the tests are not a package)."""
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def png_bytes(arr: np.ndarray) -> bytes:
    """An HxWx3 (or HxW) uint8 array as an encoded PNG file."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def random_images(b: int = 2, seed: int = 0, size: int = 224) -> torch.Tensor:
    """``b`` normalised-looking images [b, 3, size, size] from a seeded generator (the same for every caller)."""
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def chromium_driver():
    """Headless Chromium through Selenium and the Debian chromedriver, or pytest.skip with the reason."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as err:
        pytest.skip(f"selenium is not installed ({err}); pip install -e '.[dev]'")
    # ZSAD_CHROMIUM / ZSAD_CHROMEDRIVER name other binaries (given, they are the only ones tried)
    binaries = [os.environ["ZSAD_CHROMIUM"]] if "ZSAD_CHROMIUM" in os.environ else [
        "/usr/bin/chromium", shutil.which("chromium") or ""]
    drivers = [os.environ["ZSAD_CHROMEDRIVER"]] if "ZSAD_CHROMEDRIVER" in os.environ else [
        "/usr/bin/chromedriver", shutil.which("chromedriver") or ""]
    binary = next((b for b in binaries if b and os.path.exists(b)), None)
    driver = next((d for d in drivers if d and os.path.exists(d)), None)
    if binary is None or driver is None:
        pytest.skip(f"no {'chromium' if binary is None else 'chromedriver'} on this machine (looked for "
                    f"{binaries if binary is None else drivers}; apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>"):  # no network at all
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    except Exception as err:  # noqa: BLE001 - any start failure is a reason to skip, reported
        pytest.skip(f"headless chromium did not start: {str(err).splitlines()[0][:200]}")


def screenshot(driver, name: str, width: int = 1000, height: int = 1100) -> None:
    """With ZSAD_SCREENSHOTS=FOLDER set, save the page as FOLDER/NAME.png at ``width`` px (the README's pictures)."""
    folder = os.environ.get("ZSAD_SCREENSHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    driver.set_window_size(width, height)
    driver.execute_script("window.scrollTo(0, 0)")
    path = Path(folder) / f"{name}.png"
    driver.save_screenshot(str(path))
    Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)  # small enough to commit
