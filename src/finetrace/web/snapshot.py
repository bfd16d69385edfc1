"""Seeing the console as a person does: serve it on a free loopback port in a thread, and let headless
Chromium dump the rendered DOM or take a PNG screenshot (used by the tests and
``scripts/console_screenshot.py``).

    with serve_in_thread(create_app(ws_root)) as url:
        dom = dump_dom(url + "/ledger")
        screenshot(url + "/", Path("console.png"), 1280, 800)
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from ..asgi import BackgroundServer
from ..audit.render import CHROMIUM_FLAGS, chromium
from ..errors import DependencyError


@contextlib.contextmanager
def serve_in_thread(app, timeout: float = 20.0) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free 127.0.0.1 port (``asgi.BackgroundServer``); yields the base URL."""
    import uvicorn

    server = BackgroundServer(
        uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off")),
        name="finetrace-console",
        start_timeout=timeout,
        stop_timeout=timeout,
    )
    server.what = "the console"
    with server:
        yield server.url


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run([chromium(), *CHROMIUM_FLAGS, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise DependencyError(f"Chromium failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc


def dump_dom(url: str, timeout: int = 120) -> str:
    """The DOM after Chromium loaded and rendered ``url``."""
    return _run(["--dump-dom", url], timeout).stdout


def screenshot(url: str, png: Path, width: int = 1280, height: int = 800, timeout: int = 120) -> Path:
    """A PNG of ``url`` as Chromium draws it in a ``width`` x ``height`` window."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--screenshot={png.resolve()}", f"--window-size={width},{height}", url], timeout)
    if not png.is_file() or png.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise DependencyError(f"Chromium wrote no PNG for {url}")
    return png


def colour_share(png: Path, rgb: tuple[int, int, int], tolerance: int = 12) -> float:
    """Fraction of the image's pixels within ``tolerance`` (sum of channel differences) of ``rgb``."""
    from PIL import Image

    img = Image.open(png).convert("RGB")
    pixels = img.get_flattened_data() if hasattr(img, "get_flattened_data") else img.getdata()
    n = hit = 0
    for p in pixels:
        n += 1
        hit += abs(p[0] - rgb[0]) + abs(p[1] - rgb[1]) + abs(p[2] - rgb[2]) <= tolerance
    return hit / max(1, n)
