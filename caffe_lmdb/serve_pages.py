"""The HTML of `caffe-lmdb serve`: one function per page, and the static files (style, script, icon).

Plain HTML and CSS, and one small script (`APP_JS`: progress polling, the page-size menu, arrow
keys for previous/next), all served from `/static/` by the server itself: nothing comes from
elsewhere, so the pages work offline, and the Content-Security-Policy (`default-src 'self'`)
allows no inline script or style. Every text that comes from an LMDB (keys, class names, targets,
error messages) is HTML-escaped here.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any
from urllib.parse import urlencode

from .inspection import LmdbInfo
from .serve_images import THUMB_SIDE
from .serve_transform import Draw, Transforms
from .served_lmdb import CheckResult, Job, Page, RecordView, ServedLmdb, describe_shape
from .tool_reading import format_shape, label_name

#: Page sizes the gallery offers; any other asked for is clamped to 1 .. the largest.
PAGE_SIZES = (24, 48, 100, 200)
#: Rows of a histogram or problem list shown; the rest are counted.
MAX_ROWS = 2000


# --------------------------------------------------------------------------- URLs

def lmdb_url(lmdb: ServedLmdb, *parts: Any, **query: Any) -> str:
    """`/db/<number>/<parts...>?<query>` (parameters that are None left out)."""
    path = "/".join(str(part) for part in (lmdb.number, *parts))
    given = {name: value for name, value in query.items() if value is not None}
    return f"/db/{path}" + ("" if parts else "/") + (f"?{urlencode(given)}" if given else "")


def gallery_url(lmdb: ServedLmdb, start: int = 0, size: int | None = None, label: int | None = None) -> str:
    return lmdb_url(lmdb, "gallery", start=start or None, size=size, label=label)


def record_url(lmdb: ServedLmdb, index: int) -> str:
    return lmdb_url(lmdb, "record", index)


# --------------------------------------------------------------------------- the frame of every page

def _text(value: Any) -> str:
    return escape(str(value), quote=True)


def key_text(key: bytes | None) -> str:
    """A key as the pages show it: UTF-8, other bytes as `\\xNN` escapes."""
    return "" if key is None else bytes(key).decode("utf-8", "backslashreplace")


def _document(title: str, body: str, lmdb: ServedLmdb | None = None) -> str:
    nav = ""
    if lmdb is not None:
        links = [(lmdb_url(lmdb), "Overview"), (gallery_url(lmdb), "Gallery"), (lmdb_url(lmdb, "problems"), "Problems")]
        nav = f'<span class="lmdb">{_text(lmdb.name)}</span> ' + " ".join(
            f'<a href="{_text(url)}">{name}</a>' for url, name in links)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_text(title)}</title>"
        '<link rel="stylesheet" href="/static/style.css">'
        '<link rel="icon" href="/static/icon.svg" type="image/svg+xml">'
        '<script src="/static/app.js" defer></script></head><body>'
        f'<header><a class="home" href="/">caffe-lmdb serve</a> <nav>{nav}</nav></header>'
        f"<main>{body}</main></body></html>\n"
    )


def message_page(title: str, message: str, lmdb: ServedLmdb | None = None) -> str:
    """A page saying one thing: an error, or a record that is not there."""
    return _document(title, f"<h1>{_text(title)}</h1><p>{_text(message)}</p>", lmdb)


def _progress(lmdb: ServedLmdb, what: str, job: Job, doing: str) -> str:
    return (f'<p class="progress">{_text(doing)}: <progress max="{max(job.total, 1)}" value="{job.done}" '
            f'data-status="{_text(lmdb_url(lmdb, "status", what + ".json"))}"></progress> '
            f'<span class="count">{job.done} of {job.total} records</span> '
            f'<a href="">reload</a></p>')


def waiting_page(lmdb: ServedLmdb, job: Job, doing: str) -> str:
    """A page that waits for the overview's count (its progress shown), then reloads itself."""
    if job.error is not None:
        return message_page("Counting the records failed", job.error, lmdb)
    return _document(f"{lmdb.name}: counting", f"<h1>{_text(lmdb.name)}</h1>{_progress(lmdb, 'overview', job, doing)}",
                     lmdb)


def _table(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column table of (name, HTML) rows."""
    return '<table class="facts">' + "".join(f"<tr><th>{_text(name)}</th><td>{cell}</td></tr>"
                                            for name, cell in rows) + "</table>"


def _bytes(size: int) -> str:
    return f"{size} bytes" if size < 1 << 20 else f"{size / 2**20:.1f} MiB ({size} bytes)"


# --------------------------------------------------------------------------- index

def index_page(lmdbs: Sequence[ServedLmdb]) -> str:
    """The list of the LMDBs served."""
    rows = "".join(
        f'<tr><td><a href="{_text(lmdb_url(lmdb))}">{_text(lmdb.name)}</a></td><td>{_text(lmdb.path)}</td>'
        f"<td>{len(lmdb)}</td><td>{_text(lmdb.layout.name)}</td>"
        f'<td><a href="{_text(gallery_url(lmdb))}">gallery</a></td></tr>' for lmdb in lmdbs)
    body = (f"<h1>{len(lmdbs)} LMDB{'s' if len(lmdbs) != 1 else ''}</h1>"
            '<table class="list"><tr><th>LMDB</th><th>path</th><th>samples</th><th>layout</th><th></th></tr>'
            f"{rows}</table>")
    return _document("caffe-lmdb serve", body)


# --------------------------------------------------------------------------- overview

def overview_page(lmdb: ServedLmdb, job: Job | None, target_kinds: Sequence[str] = ()) -> str:
    """What the LMDB holds: the facts known at once, then (Datum LMDBs) `info`'s counts once computed."""
    rows = [("path", _text(lmdb.path)), ("layout", _text(lmdb.layout.describe())),
            ("samples", str(len(lmdb))), ("LMDB entries", str(lmdb.entries)), ("disk", _bytes(lmdb.disk_bytes))]
    if lmdb.note:
        rows.append(("note", _text(lmdb.note)))
    if lmdb.datum:
        rows.append(("keys file", _text(_keys_file_state(lmdb))))
        classes = lmdb.classes
        rows.append(("classes file", "none" if classes is None else f"{len(classes)} classes"))
    if target_kinds:
        rows.append(("targets", _text("; ".join(target_kinds))))
    body = f"<h1>{_text(lmdb.name)}</h1>{_table(rows)}"
    if job is None:
        body += ('<p class="hint">The label histogram, the class filter and the key search are for Caffe Datum '
                 "LMDBs; the gallery and the problems check work for every layout.</p>")
    elif job.error is not None:
        body += f'<p class="error">Counting the records failed: {_text(job.error)}</p>'
    elif not job.finished:
        body += _progress(lmdb, "overview", job, "Counting every record (once; kept while the server runs)")
    else:
        body += _info_tables(lmdb, job.result.info)
    return _document(f"{lmdb.name}: overview", body, lmdb)


def _keys_file_state(lmdb: ServedLmdb) -> str:
    if lmdb.keys_file is None:
        return "none: the keys are the LMDB's, in its order (key index)"
    count = len(lmdb.keys) if lmdb.keys is not None else 0
    if count == lmdb.entries:
        return f"{lmdb.keys_file} ({count} keys, as many as the LMDB's records)"
    return (f"{lmdb.keys_file} disagrees with the LMDB ({lmdb.entries} records): not used, the records are listed "
            "in LMDB order; the problems check names the differences")


def _info_tables(lmdb: ServedLmdb, info: LmdbInfo) -> str:
    kinds = f"{info.raw} raw, {info.encoded} encoded, {info.float_records} float"
    if info.invalid:
        kinds += f", {info.invalid} not Datums (first: {key_text(info.first_invalid_key)})"
    formats = ", ".join(f"{name} {count}" for name, count in sorted(info.formats.items())) or "none"
    rows = [("records", _text(kinds)), ("encoded formats", _text(formats)),
            ("record values", _bytes(info.payload_bytes)),
            ("first key", _text(key_text(info.first_key))), ("last key", _text(key_text(info.last_key)))]
    shapes = sorted(info.shapes.items(), key=lambda item: (-item[1], format_shape(item[0])))
    shape_rows = "".join(f"<tr><td>{_text(format_shape(shape))}</td><td>{count}</td></tr>"
                         for shape, count in shapes[:MAX_ROWS])
    more_shapes = f"<p>... {len(shapes) - MAX_ROWS} more sizes</p>" if len(shapes) > MAX_ROWS else ""
    labels = sorted(info.labels.items())
    top = max(info.labels.values(), default=1)
    label_rows = "".join(
        f'<tr><td><a href="{_text(gallery_url(lmdb, label=label))}">{label}</a></td>'
        f"<td>{_text(label_name(label, info.classes) or '')}</td><td>{count}</td>"
        f'<td><meter min="0" max="{top}" value="{count}"></meter></td></tr>' for label, count in labels[:MAX_ROWS])
    more_labels = f"<p>... {len(labels) - MAX_ROWS} more labels</p>" if len(labels) > MAX_ROWS else ""
    return (f"<h2>Records</h2>{_table(rows)}"
            '<h2>Channels x height x width</h2><table class="list"><tr><th>shape</th><th>records</th></tr>'
            f"{shape_rows}</table>{more_shapes}"
            '<h2>Labels</h2><table class="list histogram"><tr><th>label</th><th>class</th><th>records</th><th></th>'
            f"</tr>{label_rows}</table>{more_labels}")


# --------------------------------------------------------------------------- gallery

def gallery_page(lmdb: ServedLmdb, page: Page, records: Sequence[RecordView], labels: Sequence[int] = (),
                 notice: str = "") -> str:
    """One page of thumbnails with the paging, jump, class filter and key search forms."""
    end = page.start + len(page.indices)
    which = "" if page.label is None else f" of class {_class_text(lmdb, page.label)}"
    title = f"Records {page.start}-{max(end - 1, page.start)} of {page.total}{which}" if page.indices else \
        f"No records{which}"
    if page.label is not None and page.indices:
        title = f"{page.total} records{which}: {page.start}-{end - 1} of them"
    tiles = "".join(_tile(lmdb, record) for record in records)
    body = (f"<h1>{_text(lmdb.name)}: {_text(title)}</h1>{_gallery_forms(lmdb, page, labels)}"
            + (f'<p class="notice">{_text(notice)}</p>' if notice else "")
            + _pager(lmdb, page) + f'<div class="tiles">{tiles}</div>' + _pager(lmdb, page))
    return _document(f"{lmdb.name}: gallery", body, lmdb)


def _class_text(lmdb: ServedLmdb, label: int) -> str:
    name = label_name(label, lmdb.classes)
    return f"{label} ({name})" if name else str(label)


def _tile(lmdb: ServedLmdb, record: RecordView) -> str:
    if record.label is not None:
        caption = f"{record.label} {label_name(record.label, lmdb.classes) or ''}"
    else:
        caption = record.target or ""
    broken = " broken" if record.problem else ""
    problem = f'<span class="problem">{_text(record.problem)}</span>' if record.problem else ""
    key = key_text(record.keys[0]) if record.keys else ""
    return (f'<figure class="tile{broken}"><a href="{_text(record_url(lmdb, record.index))}">'
            f'<img src="{_text(lmdb_url(lmdb, "thumb", f"{record.index}.png"))}" width="{THUMB_SIDE}" '
            f'height="{THUMB_SIDE}" alt="record {record.index}"></a>'
            f'<figcaption><span class="index">#{record.index}</span> {_text(caption)}'
            f'<span class="key" title="{_text(key)}">{_text(key)}</span>{problem}</figcaption></figure>')


def _gallery_forms(lmdb: ServedLmdb, page: Page, labels: Sequence[int]) -> str:
    sizes = "".join(f'<option value="{size}"{" selected" if size == page.size else ""}>{size}</option>'
                    for size in PAGE_SIZES)
    label_field = ""
    if lmdb.datum:
        options = '<option value="">all classes</option>' + "".join(
            f'<option value="{label}"{" selected" if label == page.label else ""}>{_text(_class_text(lmdb, label))}'
            "</option>" for label in labels[:MAX_ROWS])
        label_field = f'<label>class <select name="label" data-autosubmit>{options}</select></label>'
    search = ""
    if lmdb.datum:
        search = (f'<form class="controls" method="get" action="{_text(lmdb_url(lmdb, "gallery"))}">'
                  f'<input type="hidden" name="size" value="{page.size}">'
                  '<label>key or key prefix <input type="search" name="key" size="28"></label> '
                  '<button type="submit">Search</button></form>')
    return (f'<form class="controls" method="get" action="{_text(lmdb_url(lmdb, "gallery"))}">'
            f'<label>per page <select name="size" data-autosubmit>{sizes}</select></label> {label_field} '
            f'<label>jump to index <input type="number" name="at" min="0" max="{max(len(lmdb) - 1, 0)}"></label> '
            f'<button type="submit">Show</button></form>{search}')


def _pager(lmdb: ServedLmdb, page: Page) -> str:
    size, total = page.size, page.total
    last = max(0, (total - 1) // size * size)
    links = []
    if page.start > 0:
        links.append(f'<a href="{_text(gallery_url(lmdb, 0, size, page.label))}">first</a>')
        links.append(f'<a rel="prev" href="{_text(gallery_url(lmdb, max(0, page.start - size), size, page.label))}">'
                     "previous</a>")
    if page.start + size < total:
        links.append(f'<a rel="next" href="{_text(gallery_url(lmdb, page.start + size, size, page.label))}">next</a>')
        links.append(f'<a href="{_text(gallery_url(lmdb, last, size, page.label))}">last</a>')
    return f'<p class="pager">{" ".join(links)}</p>'


# --------------------------------------------------------------------------- record

def record_page(lmdb: ServedLmdb, record: RecordView, transforms: Transforms | None, page_size: int) -> str:
    """One record: its image, key, index, shape, format, bytes, label and class, float_data; previous/next."""
    index = record.index
    rows = [("index", str(index)),
            ("key" if len(record.keys) == 1 else "keys", "<br>".join(_text(key_text(key)) for key in record.keys)),
            ("kind", _text(record.kind)), ("C x H x W", _text(format_shape(record.shape)) if record.shape else "?"),
            ("format", _text(record.image_format or ("raw pixels" if record.kind in ("raw", "float") else "?"))),
            ("value bytes", str(record.value_bytes))]
    if record.label is not None:
        rows.append(("label", str(record.label)))
        rows.append(("class", _text(label_name(record.label, lmdb.classes) or "(no class file entry)")))
    if record.target is not None:
        rows.append(("target", f"<pre>{_text(record.target)}</pre>"))
    if record.floats is not None:
        floats = record.floats
        rows.append(("float_data", _text(
            f"{floats.count} values, min {floats.minimum:g}, max {floats.maximum:g}, mean {floats.mean:g}; first: "
            + ", ".join(f"{v:g}" for v in floats.first) + (" ..." if floats.count > len(floats.first) else ""))))
    if record.problem:
        rows.append(("problem", f'<span class="problem">{_text(record.problem)}</span>'))
    images = ""
    for part in range(record.parts):
        source = lmdb_url(lmdb, "thumb", f"{index}.png") if record.problem else \
            lmdb_url(lmdb, "image", f"{index}.png", part=part or None)
        images += f'<img class="full" src="{_text(source)}" alt="record {index}, image {part}">'
    downloads = [f'<a href="{_text(lmdb_url(lmdb, "download", index, part=part or None))}" download>'
                 f"image{'' if record.parts == 1 else f' {part}'} (original bytes, or PNG of raw pixels)</a>"
                 for part in range(record.parts)]
    downloads.append(f'<a href="{_text(lmdb_url(lmdb, "value", index))}" download>the LMDB value</a>')
    if transforms is not None:
        downloads.append(f'<a href="{_text(lmdb_url(lmdb, "transform", index))}">through the transform</a>')
    back = gallery_url(lmdb, index // page_size * page_size, page_size)
    body = (f"<h1>{_text(lmdb.name)}: record {index}</h1>{_neighbours(lmdb, index, 'record', back)}"
            f'<div class="record"><div class="images">{images}</div>{_table(rows)}</div>'
            f'<p class="downloads">{" · ".join(downloads)}</p>')
    return _document(f"{lmdb.name}: record {index}", body, lmdb)


def _neighbours(lmdb: ServedLmdb, index: int, kind: str, back: str) -> str:
    links = []
    if index > 0:
        links.append(f'<a rel="prev" href="{_text(lmdb_url(lmdb, kind, index - 1))}">previous</a>')
    if index + 1 < len(lmdb):
        links.append(f'<a rel="next" href="{_text(lmdb_url(lmdb, kind, index + 1))}">next</a>')
    links.append(f'<a href="{_text(back)}">gallery</a>')
    return f'<p class="pager">{" ".join(links)}</p>'


# --------------------------------------------------------------------------- problems

def problems_page(lmdb: ServedLmdb, job: Job | None) -> str:
    """The check (`verify --decode` for Datum LMDBs, a decode of every sample otherwise): run on request."""
    what = ("parses every record, checks its size against its dims, decodes every encoded image and compares "
            "the keys file with the LMDB" if lmdb.datum else "reads and decodes every sample")
    run = f'<a class="button" href="{_text(lmdb_url(lmdb, "problems", run=1))}">'
    if job is None:
        body = f"<p>The check {what}. It reads the whole LMDB.</p><p>{run}Run the check</a></p>"
    elif not job.finished:
        body = _progress(lmdb, "check", job, "Checking")
    elif job.error is not None:
        body = f'<p class="error">The check failed: {_text(job.error)}</p><p>{run}Run it again</a></p>'
    else:
        body = _problem_list(lmdb, job.result) + f"<p>{run}Run it again</a></p>"
    return _document(f"{lmdb.name}: problems", f"<h1>{_text(lmdb.name)}: problems</h1>{body}", lmdb)


def _problem_list(lmdb: ServedLmdb, result: CheckResult) -> str:
    summary = f'<p class="summary">{_text(result.summary)}</p>'
    if not result.problems:
        return summary + '<p class="ok">No problems found.</p>'
    rows = []
    for problem in result.problems[:MAX_ROWS]:
        where = (f'<a href="{_text(record_url(lmdb, problem.index))}">{problem.index}</a>'
                 if problem.index is not None else "")
        rows.append(f"<tr><td>{where}</td><td>{_text(key_text(problem.key))}</td><td>{_text(problem.message)}</td></tr>")
    more = (f"<p>... {len(result.problems) - MAX_ROWS} more problems (caffe-lmdb verify lists them all)</p>"
            if len(result.problems) > MAX_ROWS else "")
    return (summary + '<table class="list problems"><tr><th>index</th><th>key</th><th>problem</th></tr>'
            + "".join(rows) + "</table>" + more)


# --------------------------------------------------------------------------- through the transform

def transform_page(lmdb: ServedLmdb, record: RecordView, transforms: Transforms | None,
                   draws: Sequence[Draw | str], page_size: int) -> str:
    """The record beside what the net is fed: the TEST crop and TRAIN draws (or why they cannot be made)."""
    index = record.index
    back = gallery_url(lmdb, index // page_size * page_size, page_size)
    head = f"<h1>{_text(lmdb.name)}: record {index} through the transform</h1>"
    if transforms is None:
        body = ("<p>No transform was given. Start the server with <code>--prototxt train_val.prototxt</code> "
                "(its Data layers' transform_param) or with <code>--crop-size</code>, <code>--mirror</code>, "
                "<code>--mean-file</code>, <code>--mean-value</code>, <code>--scale</code>.</p>")
        return _document(f"{lmdb.name}: transform", head + body, lmdb)
    original = lmdb_url(lmdb, "thumb", f"{index}.png") if record.problem else lmdb_url(lmdb, "image", f"{index}.png")
    figures = [f'<figure><img src="{_text(original)}" alt="record {index}"><figcaption>the record, '
               f"{_text(describe_shape(record))}</figcaption></figure>"]
    for found in draws:
        if isinstance(found, str):
            figures.append(f'<p class="error">{_text(found)}</p>')
            break
        means = ", ".join(f"{m:.2f}" for m in found.means)
        picture = lmdb_url(lmdb, "transform", index, f"{found.name}.png")
        figures.append(
            f'<figure><img src="{_text(picture)}" alt="{_text(found.title)}"><figcaption><b>{_text(found.title)}</b>'
            f"<br>crop at row {found.h_off}, column {found.w_off}{', mirrored' if found.mirrored else ''}"
            f"<br>blob {_text(format_shape(found.shape))} float32, range {found.minimum:.2f} .. {found.maximum:.2f}"
            f"<br>channel means {_text(means)}</figcaption></figure>")
    body = (f'<p class="hint">{_text(transforms.source)}. TRAIN draws are those CaffeLoader (seed 0) makes for '
            "this index in each epoch; the pictures are the crop windows of the record's pixels, the numbers "
            f"those of the float32 blob (BGR, mean subtracted, scaled).</p>"
            f'{_neighbours(lmdb, index, "transform", back)}<div class="draws">{"".join(figures)}</div>')
    return _document(f"{lmdb.name}: transform", head + body, lmdb)


# --------------------------------------------------------------------------- static files

STYLE_CSS = """\
:root { color-scheme: light dark; --fg: #1d1d1f; --bg: #fafafa; --muted: #6b6b70; --line: #d6d6da;
        --tile: #ececef; --bad: #b3261e; --accent: #0b57d0; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6e6e9; --bg: #16161a; --muted: #9a9aa2; --line: #34343a; --tile: #222228;
          --bad: #f2b8b5; --accent: #a8c7fa; } }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
a { color: var(--accent); }
header { display: flex; gap: 1em; align-items: baseline; padding: .6em 1em; border-bottom: 1px solid var(--line); }
header .home { font-weight: 600; text-decoration: none; }
header nav a { margin-left: .8em; }
header .lmdb { font-weight: 600; }
main { padding: 0 1em 2em; }
h1 { font-size: 1.3em; }
h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: .2em .8em .2em 0; vertical-align: top; border-bottom: 1px solid var(--line); }
table.facts th { color: var(--muted); font-weight: normal; white-space: nowrap; }
td { overflow-wrap: anywhere; }
meter { width: 16em; }
form.controls { display: flex; flex-wrap: wrap; gap: .5em 1.2em; align-items: center; margin: .5em 0; }
.pager a { margin-right: 1em; }
.tiles { display: flex; flex-wrap: wrap; gap: 10px; }
.tile { margin: 0; width: 164px; }
.tile img { display: block; width: 160px; height: 160px; object-fit: contain; background: var(--tile);
            image-rendering: pixelated; border: 2px solid transparent; }
.tile.broken img { border-color: var(--bad); }
.tile figcaption { font-size: 12px; overflow: hidden; }
.tile .key { display: block; color: var(--muted); white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.tile .problem { display: block; color: var(--bad); max-height: 4.2em; overflow: hidden; }
.index { color: var(--muted); }
.problem, .error { color: var(--bad); }
.record { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.record .images img { display: block; min-width: 256px; max-width: min(100%, 80vw); max-height: 80vh;
                      height: auto; margin-bottom: .5em; background: var(--tile); image-rendering: pixelated; }
.draws { display: flex; flex-wrap: wrap; gap: 1.2em; align-items: flex-start; }
.draws figure { margin: 0; max-width: 320px; }
.draws img { display: block; max-width: 320px; max-height: 320px; background: var(--tile); image-rendering: pixelated; }
.draws figcaption { font-size: 12px; }
.button { display: inline-block; padding: .3em .9em; border: 1px solid var(--accent); border-radius: 4px;
          text-decoration: none; }
.hint, .summary { color: var(--muted); }
pre { margin: 0; white-space: pre-wrap; }
"""

APP_JS = """\
"use strict";
// caffe-lmdb serve: progress polling, the page-size and class menus, arrow keys for previous/next.
(function () {
  for (const bar of document.querySelectorAll("progress[data-status]")) {
    const count = bar.parentElement.querySelector(".count");
    const poll = function () {
      fetch(bar.dataset.status, {cache: "no-store"})
        .then(function (response) { return response.json(); })
        .then(function (status) {
          bar.max = Math.max(status.total, 1);
          bar.value = status.done;
          if (count) { count.textContent = status.done + " of " + status.total + " records"; }
          if (status.finished) { window.location.reload(); } else { window.setTimeout(poll, 400); }
        })
        .catch(function () { window.setTimeout(poll, 2000); });
    };
    window.setTimeout(poll, 200);
  }
  for (const select of document.querySelectorAll("select[data-autosubmit]")) {
    select.addEventListener("change", function () { select.form.submit(); });
  }
  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.ctrlKey || event.metaKey || event.target.closest("input, select, textarea")) {
      return;
    }
    const rel = event.key === "ArrowLeft" ? "prev" : event.key === "ArrowRight" ? "next" : null;
    const link = rel && document.querySelector('a[rel="' + rel + '"]');
    if (link) { window.location.href = link.href; }
  });
})();
"""

ICON_SVG = """\
<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" fill="#0b57d0"/>\
<rect x="3" y="3" width="4" height="4" fill="#fff"/><rect x="9" y="3" width="4" height="4" fill="#fff"/>\
<rect x="3" y="9" width="4" height="4" fill="#fff"/><rect x="9" y="9" width="4" height="4" fill="#a8c7fa"/></svg>
"""

#: The files under /static/: name -> (content type, bytes). Nothing else is served from there.
STATIC_FILES = {
    "style.css": ("text/css; charset=utf-8", STYLE_CSS.encode()),
    "app.js": ("text/javascript; charset=utf-8", APP_JS.encode()),
    "icon.svg": ("image/svg+xml", ICON_SVG.encode()),
}
