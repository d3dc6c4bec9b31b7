"""A self-contained HTML rendering of our own report markdown (headings, lists, tables, images, paragraphs).

Images are embedded as data: URIs so the file can be mailed or archived alone. A small inline script marks
every image with ``data-loaded`` once the page has loaded; the headless-browser test reads that back.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}
code{background:#f3f3f3;padding:0 3px}h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}"""

SCRIPT = """window.addEventListener('load',function(){var im=document.images,ok=0;for(var i=0;i<im.length;i++){
var g=im[i].complete&&im[i].naturalWidth>0;im[i].setAttribute('data-loaded',g?'1':'0');if(g)ok++;}
document.body.setAttribute('data-images',ok+'/'+im.length);});"""


def _inline(text: str) -> str:
    t = html.escape(text, quote=False)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


def _img(alt: str, src: str, base: Path) -> str:
    p = base / src
    if p.is_file():
        mime = "image/png" if p.suffix.lower() == ".png" else "image/svg+xml" if p.suffix == ".svg" else "image/jpeg"
        src = f"data:{mime};base64,{base64.b64encode(p.read_bytes()).decode()}"
    return f'<p><img alt="{html.escape(alt)}" src="{src}"></p>'


def markdown_to_html(md: str, base: Path, title: str = "sparseforge report") -> str:
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        ln = lines[i]
        if not ln.strip():
            i += 1
            continue
        m = re.match(r"^(#{1,4}) (.*)$", ln)
        if m:
            n = len(m.group(1))
            out.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
            i += 1
            continue
        m = re.match(r"^!\[(.*?)\]\((.*?)\)$", ln.strip())
        if m:
            out.append(_img(m.group(1), m.group(2), base))
            i += 1
            continue
        if ln.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, body = rows[0], [r for r in rows[1:] if not all(re.fullmatch(r":?-+:?", c) for c in r)]
            t = ["<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"]
            for r in body:
                t.append("<tr>" + "".join(
                    f'<td class="num">{_inline(c)}</td>' if re.fullmatch(r"[-+0-9.,%x ]+(ms|s|us)?", c) else
                    f"<td>{_inline(c)}</td>" for c in r) + "</tr>")
            out.append("".join(t) + "</tbody></table>")
            continue
        if ln.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        para = []
        while i < len(lines) and lines[i].strip() and not re.match(r"^(#|\||- |!\[)", lines[i]):
            para.append(lines[i])
            i += 1
        out.append(f"<p>{_inline(' '.join(para))}</p>")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style><script>{SCRIPT}</script></head><body>\n" + "\n".join(out) + "\n</body></html>\n")
