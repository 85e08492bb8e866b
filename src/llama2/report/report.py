"""A run report that stages append sections to, written as report.md and a self-contained report.html.

    report = Report("runs/demo", "llama2 demo")
    s = report.section("1. Pretraining")
    s.text("A tiny model trained for 300 steps.")
    s.table(["measure", "before", "after"], [["held-out loss", 8.3, 4.1]])
    s.figure("runs/demo/figures/pretrain/loss.png", "training and held-out loss")
    s.samples(["prompt"], {"before": ["..."], "after": ["..."]}, references=["..."])
    report.write()        # atomically: report.md (images referenced relatively) + report.html (images embedded)

Model text goes into both files escaped: in Markdown every character that could start markup (`<`, `&`, `*`,
`_`, backticks, `|`, ...) is escaped and newlines become `<br>`; in HTML everything is escaped with
`html.escape` and shown in <pre> blocks. Numbers are formatted with `fmt`.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text, make_dir

MD_NAME, HTML_NAME = "report.md", "report.html"
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")
_SPACES = re.compile(r"(?<=\n) +|^ +| {2,}")
_MD_BLOCK_START = re.compile(r"^(\s*)([#+\-=]|\d+(?=\.))")


def fmt(value: Any) -> str:
    """A table cell: floats to 4 significant digits (3 decimals when small), ints with thousands separators."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}" if abs(value) >= 10 else f"{value:.3f}"
    return "" if value is None else str(value)


def md_escape(text: str, block: bool = False) -> str:
    """Text safe inside a Markdown table cell (or, block=True, a paragraph of its own): HTML entities for & < >,
    backslash before Markdown punctuation, newlines as <br> (shown as a return arrow, so runs of newlines stay
    visible)."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MD_SPECIAL.sub(r"\\\1", text)
    # no heading or list at the start: escape "#", "-", ... or the "." after a number
    if block:
        text = _MD_BLOCK_START.sub(lambda m: m.group(1) + (m.group(2) + "\\" if m.group(2)[0].isdigit()
                                                           else "\\" + m.group(2)), text)
    text = _SPACES.sub(lambda m: "&nbsp;" * len(m.group(0)), text)  # keep indentation (Markdown collapses it)
    return text.replace("\r", "").replace("\n", "↵<br>")


def html_text(text: str) -> str:
    """Model text for HTML: every character escaped (quotes too), newlines shown with a return arrow."""
    return html.escape(text, quote=True).replace("\n", "↵\n")


@dataclass
class Paragraph:
    text: str
    trusted: bool = False  # program-written prose (may hold **bold** / `code`); model text is never trusted


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]
    caption: str | None = None


@dataclass
class Figure:
    path: Path  # the PNG on disk
    caption: str


@dataclass
class Samples:
    """Answers to the same prompts from several models side by side (prompt | column ... | reference)."""

    prompts: list[str]
    columns: dict[str, list[str]]
    references: list[str] | None = None
    notes: dict[str, list[str]] = field(default_factory=dict)  # column -> a short note per row (e.g. measures)
    caption: str | None = None


Block = Paragraph | Table | Figure | Samples


@dataclass
class Section:
    """One stage's part of the report, built by appending blocks in order."""

    title: str
    blocks: list[Block] = field(default_factory=list)
    status: str = "done"  # done, running, failed, skipped

    def text(self, text: str, trusted: bool = True) -> Section:
        """A paragraph. trusted=True: the program's own prose (Markdown kept, HTML-escaped in report.html);
        pass trusted=False for anything a model or a data file wrote."""
        self.blocks.append(Paragraph(text, trusted))
        return self

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> Section:
        self.blocks.append(Table(list(headers), [list(r) for r in rows], caption))
        return self

    def figure(self, path: Path | str, caption: str) -> Section:
        self.blocks.append(Figure(Path(path), caption))
        return self

    def samples(self, prompts: Sequence[str], columns: Mapping[str, Sequence[str]],
                references: Sequence[str] | None = None, notes: Mapping[str, Sequence[str]] | None = None,
                caption: str | None = None) -> Section:
        n = len(prompts)
        for name, col in {**columns, **(notes or {})}.items():
            if len(col) != n:
                raise ValueError(f"samples column {name!r} has {len(col)} entries for {n} prompts")
        if references is not None and len(references) != n:
            raise ValueError(f"{len(references)} references for {n} prompts")
        self.blocks.append(Samples(list(prompts), {k: list(v) for k, v in columns.items()},
                                   None if references is None else list(references),
                                   {k: list(v) for k, v in (notes or {}).items()}, caption))
        return self


class Report:
    """Sections in order, written to out_dir/report.md and out_dir/report.html by write()."""

    def __init__(self, out_dir: Path | str, title: str, intro: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.title = title
        self.intro = intro
        self.sections: list[Section] = []
        self.footer: list[str] = []
        self.started = time.time()

    def section(self, title: str, status: str = "done") -> Section:
        """Append a new section (or return the existing one of that title, to add to it)."""
        for s in self.sections:
            if s.title == title:
                s.status = status
                return s
        s = Section(title, status=status)
        self.sections.append(s)
        return s

    @property
    def md_path(self) -> Path:
        return self.out_dir / MD_NAME

    @property
    def html_path(self) -> Path:
        return self.out_dir / HTML_NAME

    def write(self) -> tuple[Path, Path]:
        """Write report.md and report.html atomically (each replaces the previous one whole)."""
        make_dir(self.out_dir)
        atomic_write_text(self.md_path, self.to_markdown())
        atomic_write_text(self.html_path, self.to_html())
        return self.md_path, self.html_path

    # ------------------------------------------------------------------------------------------- Markdown

    def _rel(self, path: Path) -> str:
        return Path(os.path.relpath(path.resolve(), self.out_dir.resolve())).as_posix()

    def to_markdown(self) -> str:
        out = [f"# {md_escape(self.title, block=True)}", ""]
        if self.intro:
            out += [self.intro, ""]
        for s in self.sections:
            mark = "" if s.status == "done" else f" ({s.status})"
            out += [f"## {md_escape(s.title)}{mark}", ""]
            for b in s.blocks:
                out += self._md_block(b) + [""]
        out += self.footer
        return "\n".join(out).rstrip("\n") + "\n"

    def _md_block(self, b: Block) -> list[str]:
        if isinstance(b, Paragraph):
            return [b.text if b.trusted else md_escape(b.text, block=True)]
        if isinstance(b, Table):
            lines = [f"*{md_escape(b.caption)}*", ""] if b.caption else []
            lines.append("| " + " | ".join(md_escape(h) for h in b.headers) + " |")
            lines.append("|" + "|".join("---" for _ in b.headers) + "|")
            lines += ["| " + " | ".join(md_escape(fmt(c)) for c in r) + " |" for r in b.rows]
            return lines
        if isinstance(b, Figure):
            return [f"![{md_escape(b.caption)}]({self._rel(b.path)})", "", f"*{md_escape(b.caption)}*"]
        headers, rows = _sample_grid(b)
        lines = [f"*{md_escape(b.caption)}*", ""] if b.caption else []
        lines.append("| " + " | ".join(md_escape(h) for h in headers) + " |")
        lines.append("|" + "|".join("---" for _ in headers) + "|")
        for r in rows:
            cells = []
            for text, note in r:
                cells.append(md_escape(text) + (f"<br>*{md_escape(note)}*" if note else ""))
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    # ------------------------------------------------------------------------------------------- HTML

    def to_html(self) -> str:
        e = html.escape
        parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                 f"<title>{e(self.title)}</title>", f"<style>{_CSS}</style>", "</head><body>",
                 f"<h1>{e(self.title)}</h1>"]
        if self.intro:
            parts.append(f"<p>{_inline(self.intro)}</p>")
        if len(self.sections) > 1:
            parts.append("<nav><ol>" + "".join(f'<li><a href="#s{i}">{e(s.title)}</a></li>'
                                               for i, s in enumerate(self.sections)) + "</ol></nav>")
        for i, s in enumerate(self.sections):
            mark = "" if s.status == "done" else f' <span class="status">({e(s.status)})</span>'
            parts.append(f'<section id="s{i}"><h2>{e(s.title)}{mark}</h2>')
            parts += [self._html_block(b) for b in s.blocks]
            parts.append("</section>")
        parts += [f"<p class='footer'>{_inline(line)}</p>" for line in self.footer if line.strip()]
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"

    def _html_block(self, b: Block) -> str:
        e = html.escape
        if isinstance(b, Paragraph):
            return f"<p>{_inline(b.text) if b.trusted else html_text(b.text)}</p>"
        if isinstance(b, Table):
            cap = f"<caption>{e(b.caption)}</caption>" if b.caption else ""
            head = "".join(f"<th>{e(h)}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(f"<td>{e(fmt(c))}</td>" for c in r) + "</tr>" for r in b.rows)
            return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        if isinstance(b, Figure):
            try:
                data = base64.b64encode(b.path.read_bytes()).decode("ascii")
                src = f"data:image/png;base64,{data}"
            except OSError:
                src = e(self._rel(b.path))
            return (f'<figure><img src="{src}" alt="{e(b.caption)}">'
                    f"<figcaption>{e(b.caption)}</figcaption></figure>")
        headers, rows = _sample_grid(b)
        cap = f"<caption>{e(b.caption)}</caption>" if b.caption else ""
        head = "".join(f"<th>{e(h)}</th>" for h in headers)
        body = ""
        for r in rows:
            cells = "".join(f"<td><pre>{html_text(text)}</pre>" + (f'<div class="note">{e(note)}</div>' if note else "")
                            + "</td>" for text, note in r)
            body += f"<tr>{cells}</tr>"
        return f'<table class="samples">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _sample_grid(b: Samples) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """Headers and rows of (text, note) cells: prompt | each column | reference."""
    headers = ["prompt", *b.columns] + (["reference"] if b.references is not None else [])
    rows = []
    for i, p in enumerate(b.prompts):
        row = [(p, "")]
        row += [(col[i], b.notes.get(name, [""] * len(b.prompts))[i]) for name, col in b.columns.items()]
        if b.references is not None:
            row.append((b.references[i], ""))
        rows.append(row)
    return headers, rows


_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")


def _inline(text: str) -> str:
    """The program's own prose for HTML: escaped, then `code` and **bold** rendered."""
    out = html.escape(text)
    out = _CODE.sub(r"<code>\1</code>", out)
    return _BOLD.sub(r"<b>\1</b>", out)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #ccc; margin-top: 2.5rem; }
table { border-collapse: collapse; margin: 1rem 0; } caption { text-align: left; font-style: italic; }
th, td { border: 1px solid #ccc; padding: .3rem .6rem; vertical-align: top; text-align: left; }
th { background: #f3f3f3; } .samples td { max-width: 22rem; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font-size: .85rem; }
.note { color: #666; font-size: .8rem; margin-top: .3rem; } .status { color: #a40; font-size: 1rem; }
figure img { max-width: 100%; border: 1px solid #eee; } figcaption { font-style: italic; color: #555; }
.footer { color: #555; font-size: .9rem; } code { background: #f3f3f3; padding: 0 .2rem; }
"""
