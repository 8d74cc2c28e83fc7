"""A real headless browser for the tests of web pages: Debian's chromium driven by its
chromium-driver through selenium. Screenshots go to ``artifacts/`` at the top of the checkout
(or ``$LABBUILDER_ARTIFACTS``), kept after the run."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def artifacts() -> Path:
    folder = Path(os.environ.get("LABBUILDER_ARTIFACTS") or REPO / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def chromium() -> Iterator[WebDriver]:
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
                     "--disable-dev-shm-usage"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 0.5) -> T:
    """Poll ``probe`` until it gives something true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last seen: {last!r})")


def board_cells(driver: WebDriver) -> dict[tuple[str, str], str]:
    """The class board's cells as the page shows them: (student, stage) -> status; read again
    when the page reloads itself (every 5 s) while they are read."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(10):
        found = {}
        try:
            for row in driver.find_elements(By.CSS_SELECTOR, "tr[data-student]"):
                student = str(row.get_attribute("data-student"))
                for cell in row.find_elements(By.CSS_SELECTOR, "td[data-stage]"):
                    found[(student, str(cell.get_attribute("data-stage")))] = str(
                        cell.get_attribute("data-status")
                    )
        except StaleElementReferenceException:
            time.sleep(0.2)
            continue
        return found
    raise AssertionError("the board's page kept reloading while it was read")
