"""The report's renderers: one Markdown and one HTML page (figures embedded) drawn from the same sections."""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from soups.report.sections import Report, Section, md_table


def html_table(header: list[str], lines: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in line) + "</tr>" for line in lines)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_markdown(title: str, sections: list[Section]) -> str:
    md = [f"# {title}", ""]
    for s in sections:
        md += [f"## {s.title}", ""] if s.title else []
        md += [s.text, ""] if s.text else []
        for t in s.tables:
            md += [md_table(t.header, t.lines), ""]
        for name, what in s.figures:
            md += [f"![{what}]({name})", ""]
        md += [f"- {item}" for item in s.items] + ([""] if s.items else [])
        if s.written():
            md += ["Files: " + ", ".join(f"`{name}`" for name in s.written()) + ".", ""]
    return "\n".join(md)


def _inline(text: str) -> str:
    """Escaped text with Markdown's **bold** and `code` as HTML (the only markup the sections use)."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def render_html(title: str, sections: list[Section], out: Path) -> str:
    """The same sections as one standalone page: figures embedded, each captioned with its file's link."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        body += [f"<h2>{html.escape(s.title)}</h2>"] if s.title else []
        body += [f"<p>{_inline(s.text)}</p>"] if s.text else []
        body += [html_table(t.header, t.lines) for t in s.tables]
        for name, what in s.figures:
            data = base64.b64encode((out / name).read_bytes()).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(what)}">'
                        f'<figcaption><a href="{name}">{name}</a></figcaption></figure>')
        if s.items:
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in s.items) + "</ul>")
        if s.written():
            body.append("<p>Files: " + ", ".join(html.escape(n) for n in s.written()) + ".</p>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>")


def write_pages(out: Path, report: Report) -> list[str]:
    """report.md and report.html: the same sections, rendered twice."""
    (out / "report.md").write_text(render_markdown(report.title, report.sections), encoding="utf-8")
    (out / "report.html").write_text(render_html(report.title, report.sections, out), encoding="utf-8")
    return ["report.md", "report.html"]
