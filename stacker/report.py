"""``report.json`` and ``report.html`` in the output folder: what a run did, for people.

``report.json`` follows the schema in ``docs/report-schema.md`` (``schema_version`` 1): the
inventory, the plan, every frame's statistics and verdict, every master's statistics,
metrics and file. ``report.html`` is one self-contained page made from it and from the
masters on disk: per master a zscale preview, a histogram, row and column profiles, the
rejection map and the frame table (rejected frames highlighted). Images are PNG written by
a small encoder (zlib + struct) and embedded as data URIs; plots are inline SVG; no plotting
library is needed. `render_html` regenerates the page from ``report.json`` alone
(``stacker report OUTPUT_DIR``). Both files are written atomically.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import struct
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stacker import __version__

if TYPE_CHECKING:
    from stacker.api import Status
    from stacker.config import Settings
    from stacker.plan import Plan

SCHEMA_VERSION = 1
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
#: Longest side of a preview image, in pixels.
PREVIEW_SIDE = 600


# --------------------------------------------------------------------------------------------
# report.json


#: Run totals in ``report["counts"]`` (also in `Status.details`).
COUNTS = ("n_built", "n_up_to_date", "n_failed", "n_skipped_files", "n_rejected_frames")


def build_report(status: Status, plan: Plan, settings: Settings) -> dict[str, Any]:
    """The report of one run as a JSON-friendly dict (see docs/report-schema.md)."""
    d = status.details
    counts: dict[str, int] = {}
    for job in plan.jobs:
        counts[job.kind] = counts.get(job.kind, 0) + len(job.frames)
    masters = []
    for m in d.get("masters", []):
        stats = dict(m.get("stats") or {})
        frames = stats.pop("frames", [])
        metrics = stats.pop("metrics", None)
        masters.append({
            "job_id": m["job_id"], "kind": m["kind"], "status": m["status"],
            "path": m["path"], "error": m["error"], "exptime": m["exptime"],
            "filter": m["filter"], "calibration": m["calibration"], "n_frames": m["n_frames"],
            "seconds": m["seconds"], "notes": m["notes"], "statistics": stats,
            "metrics": metrics, "frames": frames,
        })
    return _clean({
        "schema_version": SCHEMA_VERSION,
        "creator": f"stacker {__version__}",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "timestamp": d.get("timestamp"),
        "output_dir": str(settings.output_dir),
        "success": status.success,
        "message": status.message,
        "counts": {key: d.get(key, 0) for key in COUNTS},
        "settings": settings.to_dict(),
        "inventory": {"frames_per_kind": counts, "skipped_files": d.get("skipped_files", []),
                      "missing_kinds": d.get("missing_kinds", [])},
        "plan": {"text": plan.describe(), "jobs": [_job(j) for j in plan.jobs]},
        "masters": masters,
        "dark_series": d.get("dark_series", []),
        "bad_pixel_masks": d.get("bad_pixel_masks", []),
        "errors": d.get("metrics_errors", []),
    })


def _job(job) -> dict[str, Any]:
    return {"id": job.id, "kind": job.kind, "n_frames": len(job.frames),
            "exptime": job.exptime, "filter": job.filter, "ccd_temp": job.ccd_temp,
            "gain": job.gain, "offset": job.offset, "binning": list(job.binning),
            "depends_on": list(job.depends_on),
            "calibration": job.calibration.describe() if job.calibration else None,
            "output": job.output_name, "refused": job.refused, "notes": list(job.notes),
            "frames": [str(f.path) for f in job.frames]}


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to null (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_reports(status: Status, plan: Plan, settings: Settings,
                  pictures: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """Write report.json and report.html into the output folder; return their paths.

    `pictures` are masters' pictures drawn while they were committed, by job id
    (`stacker.engine.MasterResult.pictures`); a master without them is read for them.
    """
    out_dir = Path(settings.output_dir)
    report = build_report(status, plan, settings)
    json_path = out_dir / REPORT_JSON
    _atomic_write(json_path, json.dumps(report, indent=1, allow_nan=False))
    html_path = write_html(report, out_dir, pictures)
    return {"json": str(json_path), "html": str(html_path)}


def write_html(report: dict[str, Any], out_dir: Path,
               pictures: dict[str, dict[str, str]] | None = None) -> Path:
    """Render `report` into ``out_dir/report.html`` (atomically)."""
    path = Path(out_dir) / REPORT_HTML
    _atomic_write(path, render_html(report, pictures))
    return path


def regenerate(out_dir: Path) -> Path:
    """``stacker report``: rebuild report.html from report.json and the masters on disk.

    Raises
    ------
    ValueError
        When report.json is missing, unreadable or of an unknown schema version.
    """
    path = Path(out_dir) / REPORT_JSON
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} not found; run `stacker masters` first") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable report ({exc})") from None
    if not isinstance(report, dict) or report.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {report.get('schema_version')!r} is not "
                         f"{SCHEMA_VERSION}") if isinstance(report, dict) else \
            ValueError(f"{path} is not a report")
    return write_html(report, Path(out_dir))


def _atomic_write(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.part")
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Pictures


def png(pixels: np.ndarray) -> bytes:
    """Encode a uint8 image (h, w) grey or (h, w, 3) RGB as PNG (no filter, zlib level 6)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    h, w = pixels.shape[:2]
    colour = 0 if pixels.ndim == 2 else 2
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))


def data_uri(png_bytes: bytes) -> str:
    """A ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")


def zscale_limits(values: np.ndarray, n_samples: int = 1000, contrast: float = 0.25,
                  max_reject: float = 0.5, min_npixels: int = 5, krej: float = 2.5,
                  max_iterations: int = 5) -> tuple[float, float]:
    """IRAF's zscale display limits of the finite `values` (1-D).

    The algorithm and defaults of ``astropy.visualization.ZScaleInterval`` (after
    stsci.numdisplay, BSD), step for step, so the limits are the same; importing
    astropy.visualization costs ~0.1 s of every run, far more than the computation.

    Parameters
    ----------
    values : numpy.ndarray
        Finite sample values, flattened.
    n_samples, contrast, max_reject, min_npixels, krej, max_iterations
        As in ``ZScaleInterval``.

    Returns
    -------
    tuple of float
        ``(vmin, vmax)``.
    """
    stride = int(max(1.0, values.size / n_samples))
    samples = np.sort(values[::stride][:n_samples])
    npix = len(samples)
    vmin, vmax = samples[0], samples[-1]
    # A line is fitted to the sorted samples with k-sigma rejection; the rejected mask is
    # dilated by 1% of the samples on each pass, as IRAF does.
    minpix = max(min_npixels, int(npix * max_reject))
    x = np.arange(npix)
    ngoodpix, last_ngoodpix = npix, npix + 1
    badpix = np.zeros(npix, dtype=bool)
    kernel = np.ones(max(1, int(npix * 0.01)), dtype=bool)
    fit = None
    for _ in range(max_iterations):
        if ngoodpix >= last_ngoodpix or ngoodpix < minpix:
            break
        fit = np.polyfit(x, samples, deg=1, w=(~badpix).astype(int))
        flat = samples - np.poly1d(fit)(x)
        threshold = krej * flat[~badpix].std()
        badpix[(flat < -threshold) | (flat > threshold)] = True
        badpix = np.convolve(badpix, kernel, mode="same")
        last_ngoodpix, ngoodpix = ngoodpix, np.sum(~badpix)
    if ngoodpix >= minpix and fit is not None:
        slope = fit[0] / contrast if contrast > 0 else fit[0]
        center_pixel = (npix - 1) // 2
        median = np.median(samples)
        vmin = max(vmin, median - (center_pixel - 1) * slope)
        vmax = min(vmax, median + (npix - center_pixel) * slope)
    return vmin, vmax


def zscale_image(data: np.ndarray) -> np.ndarray:
    """uint8 rendering between the IRAF zscale limits (`zscale_limits`)."""
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros(data.shape, np.uint8)
    lo, hi = zscale_limits(finite)
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max()) + 1e-12
    scaled = np.clip((data - lo) / (hi - lo), 0, 1)
    return np.nan_to_num(scaled * 255, nan=0).astype(np.uint8)


def heat_image(fraction: np.ndarray, top: float) -> np.ndarray:
    """RGB black -> red -> yellow -> white for values 0..`top` (the rejection map).

    `fraction` is ``(h, w)``; each channel is ``uint8(255 * clip(3 * v - c, 0, 1))`` of
    ``v = clip(fraction / top, 0, 1)`` (NaN as 0) in float64, computed in one compiled pass
    (`stacker._fast.heat_rgb`).
    """
    from stacker.compiled import heat_rgb

    fraction = np.asarray(fraction, dtype=np.float64)
    out = np.empty((*fraction.shape, 3), np.uint8)
    heat_rgb(fraction, float(top), out)
    return out


def histogram(values: np.ndarray, bins: int, lo: float, hi: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """``np.histogram(values, bins, range=(lo, hi))`` for finite `values`, 3x faster.

    The same edges (numpy's dtype rule: float32 for float32 values and Python-float limits)
    and the same counts: the compiled loop settles every value against the edges themselves,
    as numpy does, and keeps ``lo <= value <= hi`` (1M values in ~3 ms instead of ~9).
    """
    from stacker.compiled import histogram as count

    edges = np.linspace(lo, hi, bins + 1, dtype=np.result_type(lo, hi, values))
    counts = np.zeros(bins, np.int64)
    count(values, edges.astype(np.float64), True, counts)
    return counts, edges


def svg_histogram(values: np.ndarray, width: int = 420, height: int = 160) -> str:
    """Histogram (log counts) of finite `values` between their 0.05 and 99.95 percentiles."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return "<p>no finite values</p>"
    lo, hi = np.percentile(finite, [0.05, 99.95])
    if not hi > lo:
        hi = lo + 1
    counts, edges = histogram(finite, 80, lo, hi)
    logc = np.log10(counts + 1)
    top = logc.max() or 1
    bw = (width - 40) / counts.size
    bars = "".join(
        f'<rect x="{35 + i * bw:.1f}" y="{height - 20 - c / top * (height - 30):.1f}" '
        f'width="{max(bw - 0.5, 0.5):.1f}" height="{c / top * (height - 30):.1f}"/>'
        for i, c in enumerate(logc))
    return (f'<svg class="plot" width="{width}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg"><title>histogram</title>'
            f'<g fill="#4a7fb5">{bars}</g>'
            f'<text x="35" y="{height - 5}">{edges[0]:.5g}</text>'
            f'<text x="{width - 5}" y="{height - 5}" text-anchor="end">{edges[-1]:.5g}</text>'
            f'<text x="2" y="12">log N</text></svg>')


def svg_profile(values: np.ndarray, title: str, width: int = 420, height: int = 140) -> str:
    """A line plot of a profile (row or column means) with its range labelled."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    if not ok.any():
        return "<p>no finite values</p>"
    lo, hi = float(v[ok].min()), float(v[ok].max())
    span = hi - lo or 1.0
    xs = 35 + np.arange(v.size) / max(v.size - 1, 1) * (width - 45)
    ys = height - 20 - (np.where(ok, v, lo) - lo) / span * (height - 35)
    # Python floats format twice as fast as numpy scalars, to the same text.
    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs.tolist(), ys.tolist(), strict=True))
    return (f'<svg class="plot" width="{width}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{html.escape(title)}</title>'
            f'<polyline fill="none" stroke="#b5534a" stroke-width="1" points="{points}"/>'
            f'<text x="35" y="12">{html.escape(title)}: {lo:.5g} .. {hi:.5g}</text>'
            f'<text x="35" y="{height - 5}">0</text>'
            f'<text x="{width - 5}" y="{height - 5}" text-anchor="end">{v.size - 1}</text>'
            f'</svg>')


def master_pictures(path: str, job_id: str, n_used: int) -> dict[str, str]:
    """Preview, histogram, profiles and rejection map of one master, read strip by strip.

    Each HDU is read once. The frames-used map comes first, its two halves on two threads,
    because its rejection map's PNG is the largest single cost (zlib level 6 on ~1 MB of
    RGB rows: ~60 ms at 4096x4096) and is compressed on the second thread (zlib releases
    the GIL) while the image is read: its block means (preview), row and column means
    (profiles) and the histogram's sampled rows come from one pass
    (`stacker.images.profile_means`). Reading the two HDUs side by side instead would start
    the compression later.
    """
    from concurrent.futures import ThreadPoolExecutor

    from stacker.combine import sample_rows
    from stacker.images import block_mean, image_frame, locate, profile_means

    image_hdu, count_hdu = locate(Path(path), job_id)
    used_frame = image_frame(Path(path), count_hdu)
    ny, nx = used_frame.shape  # the image's shape too (the master writer makes them so)
    factor = max(1, math.ceil(max(ny, nx) / PREVIEW_SIDE))
    with ThreadPoolExecutor(1, thread_name_prefix="pictures") as pool:
        used = block_mean(used_frame, factor, PICTURE_ROWS, pool)
        rejection = pool.submit(_rejection_pictures, 1 - used / max(n_used, 1))
        image = image_frame(Path(path), image_hdu)
        if image.shape != used_frame.shape:
            raise ValueError(f"{path}: frames-used map {used_frame.shape} is not the image's "
                             f"shape {image.shape}")
        small, row_means, col_means, sample = profile_means(image, factor, PICTURE_ROWS,
                                                            sample_rows(ny, nx))
        out = {"preview": data_uri(png(zscale_image(small)[::-1])), "block": str(factor)}
        out["histogram"] = svg_histogram(sample.ravel())
        out["rows"] = svg_profile(row_means, "row means (y)")
        out["columns"] = svg_profile(col_means, "column means (x)")
        out.update(rejection.result())
    return out


#: Most rows of a master read at once for its pictures (`profile_means` reads fewer).
PICTURE_ROWS = 256


def _rejection_pictures(rejected: np.ndarray) -> dict[str, str]:
    """The rejected fraction per block as a heat-map PNG, white at its maximum."""
    top = float(np.nanmax(rejected)) if np.isfinite(rejected).any() else 0.0
    return {"rejection": data_uri(png(heat_image(rejected, top)[::-1])),
            "rejection_top": f"{top:.1%}"}


# --------------------------------------------------------------------------------------------
# report.html

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{margin:0 0 .2em}h2{border-bottom:2px solid #4a7fb5;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#e8eef5}tr.rejected td{background:#fbd5d0}
.ok{color:#2a7a2a}.bad{color:#b00020;font-weight:bold}
.figs{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:6px}
figcaption{font-size:12px;color:#555}
img.map{image-rendering:pixelated;width:360px;max-width:100%;display:block}
svg.plot{background:#fff;font-size:10px;display:block}
pre{background:#fff;border:1px solid #ddd;padding:6px;font-size:12px;overflow-x:auto}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    if value is None:
        return "–"
    return _e(value)


def _kv_table(items: dict[str, Any]) -> str:
    rows = []
    for key, value in items.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()
                              if not isinstance(v, (dict, list)))
            rows.append(f"<tr><th>{_e(key)}</th><td>{value}</td></tr>")
        elif isinstance(value, list):
            continue
        else:
            rows.append(f"<tr><th>{_e(key)}</th><td>{_fmt(value)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _frame_table(frames: list[dict[str, Any]]) -> str:
    cols = ("file", "level", "noise", "median", "min", "max", "z_level", "z_noise", "z_shape",
            "verdict")
    head = "".join(f"<th>{c}</th>" for c in cols)
    rows = []
    for f in frames:
        ok = f.get("verdict") == "ok"
        cells = [Path(f["path"]).name] + [_fmt(f.get(c)) for c in cols[1:-1]]
        verdict = f'<span class="{"ok" if ok else "bad"}">{_e(f.get("verdict"))}</span>'
        body = "".join(f"<td>{c}</td>" for c in cells) + f"<td>{verdict}</td>"
        rows.append(f'<tr class="{"used" if ok else "rejected"}">{body}</tr>')
    return f'<table class="frames"><tr>{head}</tr>{"".join(rows)}</table>'


def _dust_table(dust: dict[str, Any] | None) -> str:
    if not dust or not dust.get("shadows"):
        return ""
    rows = "".join(f"<tr><td>{d['x']:.1f}</td><td>{d['y']:.1f}</td><td>{d['diameter']:.0f}</td>"
                   f"<td>{d['depth']:.1%}</td></tr>" for d in dust["shadows"])
    return ("<table><tr><th>dust x</th><th>y</th><th>diameter px</th><th>depth</th></tr>"
            f"{rows}</table>")


def _master_section(m: dict[str, Any], pictures: dict[str, str] | None = None) -> str:
    title = f"{_e(m['job_id'])} — {_e(m['status'])}"
    parts = [f'<section class="master" id="{_e(m["job_id"])}"><h2>{title}</h2>']
    if m["status"] not in ("built", "current"):
        parts.append(f'<p class="bad">not built: {_e(m.get("error"))}</p>')
    else:
        parts.append(f"<p>{_e(m['path'])}</p>")
        metrics = m.get("metrics") or {}
        shown = {k: v for k, v in metrics.items() if k != "dust"}
        if metrics.get("dust") is not None:
            shown["dust shadows"] = metrics["dust"]["count"]
        parts.append(_kv_table(shown))
        parts.append(_dust_table(metrics.get("dust")))
        try:
            pics = pictures or master_pictures(m["path"], m["job_id"],
                                               metrics.get("frames_used") or m["n_frames"])
        except (OSError, ValueError, KeyError) as exc:
            parts.append(f'<p class="bad">pictures unavailable: {_e(exc)}</p>')
        else:
            parts.append(
                '<div class="figs">'
                f'<figure><img class="map preview" alt="preview of {_e(m["job_id"])}" '
                f'src="{pics["preview"]}"><figcaption>zscale preview (blocks of '
                f'{pics["block"]} px)</figcaption></figure>'
                f'<figure><img class="map rejection" alt="rejection map of {_e(m["job_id"])}" '
                f'src="{pics["rejection"]}"><figcaption>rejected fraction per pixel '
                f'(black 0 .. white {pics["rejection_top"]})</figcaption></figure>'
                f'<figure>{pics["histogram"]}<figcaption>histogram</figcaption></figure>'
                f'<figure>{pics["rows"]}{pics["columns"]}<figcaption>profiles</figcaption>'
                '</figure></div>')
    for note in m.get("notes") or []:
        parts.append(f"<p>note: {_e(note)}</p>")
    if m.get("frames"):
        n_bad = sum(f.get("verdict") != "ok" for f in m["frames"])
        parts.append(f"<h3>frames ({len(m['frames'])}, {n_bad} rejected)</h3>")
        parts.append(_frame_table(m["frames"]))
    parts.append("</section>")
    return "\n".join(parts)


def _series_table(series: list[dict[str, Any]]) -> str:
    if not series:
        return ""
    rows = "".join(
        f"<tr><td>{_fmt(s.get('ccd_temp'))}</td><td>{_fmt(s.get('gain'))}</td>"
        f"<td>{', '.join(f'{t:g}' for t in s['exposures'])}</td>"
        f"<td>{', '.join(f'{v:.5g}' for v in s['median_level_adu'])}</td>"
        f"<td>{_fmt(s.get('slope_adu_s'))}</td><td>{_fmt(s.get('intercept_adu'))}</td>"
        f"<td>{_fmt(s.get('max_residual_adu'))}</td></tr>" for s in series)
    return ("<h2>dark level against exposure</h2><table><tr><th>CCD-TEMP</th><th>GAIN</th>"
            "<th>exposures s</th><th>median level ADU</th><th>slope ADU/s</th>"
            f"<th>intercept ADU</th><th>max residual ADU</th></tr>{rows}</table>")


def render_html(report: dict[str, Any],
                pictures: dict[str, dict[str, str]] | None = None) -> str:
    """The whole page as one string (images embedded); `pictures` as `write_reports`."""
    pictures = pictures or {}
    masters = report.get("masters", [])
    built = sum(m["status"] in ("built", "current") for m in masters)
    state = "ok" if report.get("success") else "bad"
    toc = " · ".join(f'<a href="#{_e(m["job_id"])}">{_e(m["job_id"])}</a>' for m in masters)
    skipped = report.get("inventory", {}).get("skipped_files", [])
    masks = report.get("bad_pixel_masks", [])
    body = [
        f"<h1>stacker report {_e(report.get('timestamp'))}</h1>",
        f'<p class="{state}">{_e(report.get("message"))}</p>',
        f"<p>{built} of {len(masters)} masters built · {_e(report.get('creator'))} · "
        f"{_e(report.get('created'))} · {_e(report.get('output_dir'))}</p>",
        f"<p>{toc}</p>",
        f"<h2>plan</h2><pre>{_e(report.get('plan', {}).get('text', ''))}</pre>",
    ]
    if skipped:
        rows = "".join(f"<tr class='rejected'><td>{_e(s['path'])}</td><td>{_e(s['reason'])}"
                       "</td></tr>" for s in skipped)
        body.append(f"<h2>files left out ({len(skipped)})</h2><table>{rows}</table>")
    if masks:
        rows = "".join(f"<tr><td>{_e(k['path'])}</td><td>{k['hot_pixels']}</td>"
                       f"<td>{k['low_pixels']}</td></tr>" for k in masks)
        body.append("<h2>bad-pixel masks</h2><table><tr><th>file</th><th>hot</th>"
                    f"<th>dead/low</th></tr>{rows}</table>")
    body.append(_series_table(report.get("dark_series", [])))
    for error in report.get("errors", []):
        body.append(f'<p class="bad">{_e(error)}</p>')
    body.extend(_master_section(m, pictures.get(m["job_id"])) for m in masters)
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>stacker report {_e(report.get('timestamp'))}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
