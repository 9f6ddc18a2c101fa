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
    table.add_row("inference precision", info["precision"])
    out.print(table)

# --- index / query / info / demo (issue 4) ----------------------------------------------------

# --- evaluate (issue 6) -----------------------------------------------------------------------

# --- train (issue 5) --------------------------------------------------------------------------


if __name__ == "__main__":
    app()
