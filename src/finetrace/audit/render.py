"""Rendering the documents: Jinja2 Markdown templates, Markdown -> self-contained HTML, HTML -> PDF.

Templates live in ``templates/`` (package data). Each document is one Markdown template; its HTML is the
same Markdown rendered by markdown-it (tables on) inside ``page.html.jinja``, so the two formats never
disagree. PDF pages come from headless Chromium printing that HTML (``chromium --headless
--print-to-pdf``); a machine without Chromium gets a ``DependencyError`` saying how to install it.

A missing fact is rendered by the ``np`` filter as *not provided* with what would provide it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ..errors import DependencyError

NOT_PROVIDED = "not provided"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--hide-scrollbars",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


def _missing(value) -> bool:
    from jinja2 import Undefined

    return value is None or isinstance(value, Undefined) or value in ("", [], {})


def np_filter(value, what: str) -> str:
    """The value, or ``*not provided* (what would provide it: ...)``."""
    if _missing(value):
        return f"*{NOT_PROVIDED}* (would be provided by: {what})"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
    return str(value).strip()


def num(value) -> str:
    if _missing(value) and value != 0:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def interval(ci) -> str:
    if _missing(ci) or len(ci) != 2:
        return "n/a"
    return f"[{num(ci[0])}, {num(ci[1])}]"


def yesno(value):
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value


def environment():
    from jinja2 import ChainableUndefined, Environment, PackageLoader, select_autoescape

    # Markdown templates (*.md.jinja) are not escaped (Markdown is escaped when it becomes HTML, below);
    # the HTML page (*.html.jinja) is.
    env = Environment(
        loader=PackageLoader("finetrace.audit", "templates"),
        undefined=ChainableUndefined,
        autoescape=select_autoescape(["html.jinja"], default_for_string=False),
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
    )
    env.filters.update(np=np_filter, num=num, interval=interval, yesno=yesno)
    return env


def render_markdown(template: str, context: dict) -> str:
    text = environment().get_template(template).render(**context)
    # collapse runs of blank lines left by template control blocks
    lines, blank = [], 0
    for line in text.splitlines():
        blank = blank + 1 if not line.strip() else 0
        if blank <= 1:
            lines.append(line.rstrip())
    return "\n".join(lines).strip() + "\n"


def split_front_matter(markdown: str) -> tuple[str | None, str]:
    """(YAML front matter or None, the Markdown after it)."""
    if markdown.startswith("---\n"):
        end = markdown.find("\n---\n", 4)
        if end > 0:
            return markdown[4:end], markdown[end + 5 :]
    return None, markdown


def markdown_body(markdown: str) -> str:
    """Markdown -> HTML with raw HTML disabled: a ``<script>`` in user-supplied text (a datasheet field)
    comes out as escaped text, and markdown-it refuses ``javascript:`` links."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)


def markdown_to_html(markdown: str, title: str, context: dict) -> str:
    """A self-contained HTML page (no external resources) of a Markdown document."""
    front, body_md = split_front_matter(markdown)  # YAML front matter (model card): shown as a code block
    if front is not None:
        context = {**context, "front": front}
    from markupsafe import Markup

    return (
        environment()
        .get_template("page.html.jinja")
        .render(
            title=title,
            front=context.get("front"),
            body=Markup(markdown_body(body_md)),  # markdown-it: no raw HTML
            finetrace_version=context.get("finetrace_version", ""),
            adapter_digest=context.get("adapter", {}).get("digest", ""),
        )
    )


def chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise DependencyError(
        "headless Chromium is needed to render PDF pages and screenshots",
        hint="apt-get install -y chromium (or choose --format md/html)",
    )


def html_to_pdf(html_file: Path, pdf_file: Path, timeout: int = 120) -> Path:
    """Print ``html_file`` to ``pdf_file`` with headless Chromium (A4, no header/footer)."""
    exe = chromium()
    pdf_file = Path(pdf_file)
    tmp = pdf_file.with_name(f".{pdf_file.name}.tmp")
    proc = subprocess.run(
        [exe, *CHROMIUM_FLAGS, "--no-pdf-header-footer", f"--print-to-pdf={tmp}", Path(html_file).resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0 or not tmp.is_file() or not tmp.read_bytes().startswith(b"%PDF"):
        tmp.unlink(missing_ok=True)
        raise DependencyError(
            f"Chromium could not print {html_file} to PDF (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
        )
    tmp.replace(pdf_file)
    return pdf_file


def screenshot(html_file: Path, png_file: Path, width: int = 1200, height: int = 1800, timeout: int = 120) -> Path:
    """A PNG screenshot of the rendered page (what a person would see)."""
    subprocess.run(
        [
            chromium(),
            *CHROMIUM_FLAGS,
            f"--screenshot={png_file}",
            f"--window-size={width},{height}",
            Path(html_file).resolve().as_uri(),
        ],
        capture_output=True,
        timeout=timeout,
        check=True,
    )
    return Path(png_file)


def dump_dom(html_file: Path, timeout: int = 120) -> str:
    """The DOM after Chromium rendered the page."""
    return subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, "--dump-dom", Path(html_file).resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    ).stdout
