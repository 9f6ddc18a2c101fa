"""reid command line: a thin Typer layer that parses, calls ``reid.*`` and renders.

Results go to stdout; progress, warnings and logs to stderr. Heavy imports (torch, faiss)
happen inside the commands so that ``reid --help`` is instant.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="Person re-identification gallery search: index crops, query, evaluate, train.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console(highlight=False)


def command(*args, **kwargs):
    """Register a Typer command whose ReidError becomes one line on stderr and exit code 1."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            from reid.errors import ReidError

            try:
                return fn(*a, **k)
            except ReidError as e:
                err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
                raise typer.Exit(1)
            except KeyboardInterrupt:
                err.print("[yellow]interrupted[/]")
                raise typer.Exit(130)

        return app.command(*args, **kwargs)(wrapper)

    return decorate


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log details to stderr.")) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, show_time=False)],
    )


# --- model (issue 2) --------------------------------------------------------------------------


@command("model")
def model_cmd(
    weights: Optional[Path] = typer.Option(None, "--weights", help="Checkpoint (folder or .pt); default: pretrained model."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Describe the network: streams, grid, sizes, parameters, FLOPs per image, fingerprint."""
    import json

    from reid.model import build_model, load_checkpoint
    from reid.model.summary import model_summary
    from reid.runtime import prepare_torch

    prepare_torch()
    model = load_checkpoint(weights) if weights is not None else build_model()
    info = model_summary(model)
    info["weights"] = str(weights) if weights is not None else "packaged ImageNet streams + seeded head"
    if as_json:
        typer.echo(json.dumps(info))
        return
    from rich.table import Table

    d, p, f = info["dims"], info["parameters"], info["flops_per_image"]
    table = Table(title="AttentionBilinearNet", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("weights", info["weights"])
    table.add_row("fingerprint", info["fingerprint"])
    table.add_row("stream A", info["streams"]["a"])
    table.add_row("stream B", info["streams"]["b"])
    table.add_row("input (H x W)", "{} x {}".format(*info["input_size"]))
    table.add_row("grid", "{} x {} (output stride {})".format(*info["grid"], info["output_stride"]))
    table.add_row("bilinear", f"{d['c_a']} x {d['c_b']} = {d['bilinear']} -> d_x {d['d_x']}")
    table.add_row("spatial LSTM", f"{d['lstm_directions']} directions x d_h {d['d_h']}")
    table.add_row("attention", f"{d['glimpses']} glimpses, hidden {d['d_att']}")
    table.add_row("embedding", f"{d['embed_dim']} (BNNeck, L2-normalised)")
    table.add_row("classifier", f"{d['num_classes']} identities" if d["num_classes"] else "none")
    table.add_row("parameters", f"{p['total'] / 1e6:.2f} M (streams {p['backbone'] / 1e6:.2f} M, head {p['head'] / 1e6:.2f} M)")
    table.add_row("FLOPs / image", f"{f['total'] / 1e9:.2f} G (streams {f['streams'] / 1e9:.2f} G, head {f['head'] / 1e9:.2f} G)")
    out.print(table)

# --- index / query / info / demo (issue 4) ----------------------------------------------------

# --- evaluate (issue 6) -----------------------------------------------------------------------


@command("evaluate")
def evaluate_cmd(
    dataset: str = typer.Argument(..., help="market1501, dukemtmcreid, cuhk03, cuhk03-np or folder."),
    root: Path = typer.Option(..., "--root", help="Folder holding the dataset as its owners ship it."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Checkpoint (folder or .pt); default: pretrained model."),
    variant: Optional[str] = typer.Option(None, "--variant", help="cuhk03 / cuhk03-np: labeled or detected."),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="cuhk03: new or classic."),
    split: Optional[int] = typer.Option(None, "--split", help="cuhk03 classic split 0..19 (default: all, mean ± std)."),
    rerank: bool = typer.Option(False, "--rerank", help="k-reciprocal re-ranking."),
    ap: str = typer.Option("standard", "--ap", help="standard (open-reid) or trapezoid (official Market MATLAB)."),
    flip: bool = typer.Option(False, "--flip", help="Average embeddings with horizontally flipped crops."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    workers: int = typer.Option(2, "--workers", min=0, help="Decoding processes."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the CMC curve (ranks 1-50) to this picture."),
    ranks: Optional[Path] = typer.Option(None, "--ranks", help="Write the top-10 of sampled queries to this picture."),
    ranks_queries: int = typer.Option(8, "--ranks-queries", min=1, help="Queries shown in --ranks."),
    attention: bool = typer.Option(False, "--attention", help="Overlay the model's attention on the --ranks crops."),
    save_features: Optional[Path] = typer.Option(None, "--save-features", help="Write features, ids and paths (.npz)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the feature cache."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of CUHK03 classic sampling and of the --ranks queries."),
) -> None:
    """Mean AP, CMC and mINP of a model on a dataset's standard protocol."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from reid import evaluate as ev_mod
    from reid import viz
    from reid.errors import InputError

    for picture in (plot, ranks):
        if picture is not None:
            viz.check_picture_path(picture)
    if save_features is not None:
        ev_mod.check_features_path(save_features)
    if attention and ranks is None:
        raise InputError("--attention draws on the --ranks picture; add --ranks FILE")

    with Progress("embedding", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err,
                  transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("embed", total=None)
        ev = ev_mod.evaluate(
            dataset, root, weights=weights, variant=variant, protocol=protocol, split=split, rerank=rerank, ap=ap,
            flip=flip, batch_size=batch_size, workers=workers, device=device, use_cache=not no_cache, seed=seed,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    rep = ev.report
    if save_features is not None:
        ev_mod.save_features(save_features, ev.sets, ev.splits)
        err.print(f"features written to {save_features}")
    if plot is not None:
        title = f"CMC - {dataset}" + (f" ({rep['protocol']})" if dataset == "cuhk03" else "")
        viz.save_image(plot, viz.plot_cmc({rep["weights"] if len(rep["weights"]) < 28 else "model": ev.cmc}, title=title))
        err.print(f"CMC curve written to {plot}")
    if ranks is not None:
        viz.save_image(ranks, ev_mod.rank_picture(ev, num_queries=ranks_queries, seed=seed, attention=attention))
        err.print(f"rank lists written to {ranks}")

    if as_json:
        typer.echo(json.dumps(rep))
        return
    from rich.table import Table

    def pct(key: str) -> str:
        if rep.get(key) is None:
            return "-"
        std = rep.get(f"{key}_std")
        return f"{rep[key] * 100:.2f}%" + (f" ± {std * 100:.2f}" if std is not None else "")

    t = rep["timings"]
    table = Table(title=f"reid evaluate {dataset}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, key in (("mAP", "mAP"), ("rank-1", "rank1"), ("rank-5", "rank5"), ("rank-10", "rank10"),
                       ("rank-20", "rank20"), ("mINP", "mINP")):
        table.add_row(label, pct(key))
    table.add_row("queries (valid / all)", f"{rep['num_valid_queries']} / {rep['num_queries']}")
    table.add_row("gallery images", str(rep["num_gallery"]))
    splits = f", {len(rep['splits'])} splits, seed {rep['seed']}" if "splits" in rep else (
        f", split {rep['split']}" if rep.get("split") is not None else "")
    table.add_row("protocol", f"{rep['protocol']}{splits}" + (", re-ranked" if rerank else "")
                  + (f", AP {rep['ap']}" if rep["ap"] != "standard" else ""))
    table.add_row("model", f"{rep['weights']} ({rep['fingerprint'][:12]})")
    table.add_row("features", f"{rep['num_images_embedded']} images, cache {rep['cache']}"
                  + (f", {rep['num_images_failed']} failed to decode" if rep["num_images_failed"] else ""))
    table.add_row("time", f"embed {t['embed_s']:.1f} s, metrics {t['metric_s']:.2f} s, total {t['total_s']:.1f} s")
    out.print(table)


# --- train (issue 5) --------------------------------------------------------------------------


if __name__ == "__main__":
    app()
