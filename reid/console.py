"""How the command line shows results: Rich tables and progress displays over what ``reid.*`` returns.

``cli.py`` parses options and calls the library; everything a person reads on the terminal is drawn
here. Tables go to stdout, progress to stderr (each function takes the console to draw on).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from rich.progress import Progress


def human_size(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _facts(title: str, rows: list[tuple[str, str]], *, justify: str = "left") -> Table:
    """A two-column table of labelled values."""
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify=justify)
    for label, value in rows:
        table.add_row(label, value)
    return table


# --- reid model -------------------------------------------------------------------------------


def model_table(info: dict[str, Any]) -> Table:
    """``reid model``: streams, grid, sizes, parameters, FLOPs (from ``reid.model.summary.model_summary``)."""
    d, p, f = info["dims"], info["parameters"], info["flops_per_image"]
    return _facts("AttentionBilinearNet", [
        ("weights", info["weights"]),
        ("fingerprint", info["fingerprint"]),
        ("stream A", info["streams"]["a"]),
        ("stream B", info["streams"]["b"]),
        ("input (H x W)", "{} x {}".format(*info["input_size"])),
        ("grid", "{} x {} (output stride {})".format(*info["grid"], info["output_stride"])),
        ("bilinear", f"{d['c_a']} x {d['c_b']} = {d['bilinear']} -> d_x {d['d_x']}"),
        ("spatial LSTM", f"{d['lstm_directions']} directions x d_h {d['d_h']}"),
        ("attention", f"{d['glimpses']} glimpses, hidden {d['d_att']}"),
        ("embedding", f"{d['embed_dim']} (BNNeck, L2-normalised)"),
        ("classifier", f"{d['num_classes']} identities" if d["num_classes"] else "none"),
        ("parameters", f"{p['total'] / 1e6:.2f} M (streams {p['backbone'] / 1e6:.2f} M, head {p['head'] / 1e6:.2f} M)"),
        ("FLOPs / image",
         f"{f['total'] / 1e9:.2f} G (streams {f['streams'] / 1e9:.2f} G, head {f['head'] / 1e9:.2f} G)"),
    ])


# --- reid index / query / info ----------------------------------------------------------------


def embedding_progress(console: Console) -> Progress:
    """Progress bars: done / to do, items per second, time left (terminals only: nothing in logs). Each task
    is described by its name; its ``unit`` field (default ``img``) names what it counts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            unit = task.fields.get("unit", "img")
            return Text(f"{speed:6.1f} {unit}/s" if speed else f"     - {unit}/s")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def print_index_report(console: Console, report) -> None:
    """``reid index``: what was added / updated / reused / unchanged / pruned / failed, each failure's reason."""
    counts = [("added", report.added), ("updated", report.updated), ("reused", report.reused),
              ("unchanged", report.unchanged), ("pruned", report.pruned), ("failed", len(report.failed))]
    console.print(", ".join(f"{name} {n}" for name, n in counts)
                  + f" — {report.rows} rows in the index ({report.seconds:.1f} s"
                  + (f", {report.embedded / report.embed_seconds:.1f} img/s" if report.embed_seconds else "") + ")")
    if report.videos or report.videos_unchanged:
        console.print(f"footage: {report.videos} videos read ({report.videos_resumed} resumed), "
                      f"{report.videos_unchanged} unchanged; {report.frames} frames, {report.people} people "
                      f"in {report.tracklets} tracklets")
    for path in report.no_people:
        console.print(f"  [yellow]no people found[/] in {path}", soft_wrap=True)
    for path, reason in report.failed:
        console.print(f"  [red]failed[/] {path}: {reason}", soft_wrap=True)


def _when(m) -> str:
    from reid.search import format_time

    if m.span is not None and m.span.rows > 1:
        first, last = format_time(m.span.first_time), format_time(m.span.last_time)
        return f"{first} - {last[11:] if last[:10] == first[:10] else last}"
    return format_time(m.time)


def _where(m) -> str:
    """Frame(s) and box of a footage match; the video is in the path column."""
    frames = f"{m.span.first_frame}-{m.span.last_frame}" if m.span is not None and m.span.rows > 1 else str(m.frame)
    x1, y1, x2, y2 = m.box or (0, 0, 0, 0)
    return f"frame {frames}, box {x1},{y1},{x2},{y2}" + (f", track {m.track}" if m.track is not None else "")


def print_matches(console: Console, result) -> None:
    """``reid query``: one table per query (a ``reid.search.QueryResult``), true matches in green; matches
    from footage add when (a tracklet's time span) and where (frames, box, tracklet) they were seen."""

    def known(v: object) -> str:
        return "-" if v is None else str(v)

    title = f"{len(result.crops)} crops of one person: {', '.join(result.crops)}" if result.crops else result.query
    if result.pid is not None:
        title += f"  (identity {result.pid}" + (f", camera {result.camid})" if result.camid is not None else ")")
    footage = any(m.media is not None for m in result.matches)
    table = Table(title=title, title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("camera", justify="right")
    if footage:
        table.add_column("seen (UTC)")
        table.add_column("where")
    else:
        table.add_column("identity", justify="right")
    table.add_column("path", overflow="fold")
    # Paths relative to the matches' common folder keep each on one line (JSON keeps them absolute).
    paths = [m.media or m.path for m in result.matches]
    common = os.path.dirname(paths[0]) if len(paths) == 1 else os.path.commonpath(paths) if paths else ""
    if len(common) > 1:
        paths = [os.path.relpath(p, common) for p in paths]
    for m, path in zip(result.matches, paths, strict=True):
        same = result.pid is not None and result.pid > 0 and m.pid == result.pid
        camera = m.camera if m.camera is not None else known(m.camid)
        middle = [_when(m), _where(m) if m.media else "-"] if footage else [known(m.pid)]
        table.add_row(str(m.rank), f"{m.score:.4f}", camera, *middle, path, style="green" if same else None)
    if not result.matches:
        table.caption = "no match above --min-score"
    console.print(table)
    if len(common) > 1:
        console.print(f"paths under {common}", soft_wrap=True)


def info_table(info: dict[str, Any]) -> Table:
    """``reid info`` (from ``GalleryStore.info``)."""
    footage = info.get("footage") or {}
    return _facts(f"index {info['index']}", [
        ("rows", str(info["rows"])),
        *([("footage", f"{footage['people']} people from {footage['sources']} videos / frame folders "
                       f"({footage['sources'] - footage['done']} unfinished)")] if footage.get("sources") else []),
        ("dimension", str(info["dim"])),
        ("kind", f"{info['kind']} ({info['vector_kind']})"),
        ("vectors.faiss", info["vectors"]),
        ("model", f"{info['model_source']} (fingerprint {info['fingerprint']})"),
        ("size on disk", human_size(info["bytes_on_disk"]) if info.get("bytes_on_disk") is not None else "-"),
        ("created", str(info["created_at"])),
        ("last update", str(info["updated_at"])),
    ])


# --- reid evaluate ----------------------------------------------------------------------------


def evaluation_table(rep: dict[str, Any], dataset: str) -> Table:
    """``reid evaluate``: mAP, CMC, mINP (± std over CUHK03 classic splits), protocol, model, timings."""

    def pct(key: str) -> str:
        if rep.get(key) is None:
            return "-"
        std = rep.get(f"{key}_std")
        return f"{rep[key] * 100:.2f}%" + (f" ± {std * 100:.2f}" if std is not None else "")

    t = rep["timings"]
    rows = [(label, pct(key)) for label, key in (("mAP", "mAP"), ("rank-1", "rank1"), ("rank-5", "rank5"),
                                                 ("rank-10", "rank10"), ("rank-20", "rank20"), ("mINP", "mINP"))]
    splits = f", {len(rep['splits'])} splits, seed {rep['seed']}" if "splits" in rep else (
        f", split {rep['split']}" if rep.get("split") is not None else "")
    rows += [
        ("queries (valid / all)", f"{rep['num_valid_queries']} / {rep['num_queries']}"),
        ("gallery images", str(rep["num_gallery"])),
        ("protocol", f"{rep['protocol']}{splits}" + (", re-ranked" if rep.get("rerank") else "")
         + (f", AP {rep['ap']}" if rep["ap"] != "standard" else "")),
        ("model", f"{rep['weights']} ({rep['fingerprint'][:12]})"),
        ("features", f"{rep['num_images_embedded']} images, cache {rep['cache']}"
         + (f", {rep['num_images_failed']} failed to decode" if rep["num_images_failed"] else "")),
        ("time", f"embed {t['embed_s']:.1f} s, metrics {t['metric_s']:.2f} s, total {t['total_s']:.1f} s"),
    ]
    return _facts(f"reid evaluate {dataset}", rows, justify="right")


# --- reid train -------------------------------------------------------------------------------


def training_progress(console: Console) -> tuple[Progress, Callable[[str, dict], None]]:
    """A progress display for ``reid.train.train`` and the ``on_event`` callback that drives it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    bar = Progress(*columns, console=console, transient=True, disable=not console.is_terminal)
    task = bar.add_task("starting", total=None, info="")
    state: dict[str, float | None] = {"mAP": None, "rank1": None}

    def on_event(kind: str, info: dict) -> None:
        if kind == "start":
            console.print(f"training on {info['num_images']} images of {info['num_ids']} identities, "
                          f"batch {info['batch_size']}, {info['device']} {info['precision']}, "
                          f"epochs {info['start_epoch'] + 1}..{info['epochs']}")
        elif kind == "step":
            seen = "" if state["mAP"] is None else f"  mAP {state['mAP']:.1%} r1 {state['rank1']:.1%}"
            bar.update(task, description=f"epoch {info['epoch']}", completed=info["step"], total=info["steps"],
                       info=f"loss {info['loss']:.3f}  lr {info['lr']:.2e}  {info['images_per_s']:.1f} img/s{seen}")
        elif kind == "eval_start":
            bar.update(task, description=f"evaluating epoch {info['epoch']}", completed=0, total=None)
        elif kind == "epoch":
            if "mAP" in info:
                state["mAP"], state["rank1"] = info["mAP"], info["rank1"]
            scored = f"  mAP {info['mAP']:.2%}  rank-1 {info['rank1']:.2%}" if "mAP" in info else ""
            console.print(f"epoch {info['epoch']}: loss {info['loss']:.4f}  lr {info['lr']:.2e}  "
                          f"{info['images_per_s']:.1f} img/s{scored}", highlight=False)

    return bar, on_event


def training_table(result, dataset: str) -> Table:
    """``reid train``: epochs, speed, last and best scores, where the checkpoints are (a ``TrainResult``)."""
    out = Path(result.out)
    rows = [("epochs", f"{result.epochs_done}" + (" (time budget reached)" if result.stopped_early else "")),
            ("training speed", f"{result.images_per_s:.1f} img/s")]
    if "loss" in result.last:
        rows.append(("last loss", f"{result.last['loss']:.4f}"))
    if "mAP" in result.last:
        rows.append(("last mAP / rank-1", f"{result.last['mAP']:.2%} / {result.last['rank1']:.2%}"))
    if result.best_epoch:
        rows.append(("best mAP", f"{result.best_map:.2%} (epoch {result.best_epoch}) -> {out / 'best'}"))
    rows += [("checkpoint", str(out / "last")), ("metrics log", str(out / "metrics.jsonl"))]
    return _facts(f"reid train {dataset}", rows, justify="right")


def adapt_progress(console: Console):
    """A progress display for ``reid.train.adapt.adapt`` -> (bar, on_epoch, progress) callbacks."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True, disable=not console.is_terminal)
    task = bar.add_task("starting", total=None)

    def on_progress(stage: str, done: int, total: int) -> None:
        bar.update(task, description="stream maps" if stage == "streams" else stage, completed=done, total=total)

    def on_epoch(record: dict) -> None:
        loss = "-" if record.get("loss") is None else f"{record['loss']:.4f}"
        console.print(f"epoch {record['epoch']}: {record['clusters']} clusters, {record['outliers']} outliers, "
                      f"loss {loss}, {record['seconds']:.1f} s", highlight=False)

    return bar, on_epoch, on_progress
