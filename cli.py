"""reid command line: a thin Typer layer that parses options, calls ``reid.*`` and hands the results to
``reid.console`` to draw.

Results go to stdout; progress, warnings and logs to stderr. Heavy imports (torch, faiss)
happen inside the commands so that ``reid --help`` is instant.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from enum import Enum
from pathlib import Path
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


def _workers_option(what: str):
    """--workers, defaulting to reid.embed.auto_workers."""
    return typer.Option(None, "--workers", min=0, show_default="auto",
                        help=f"{what} (auto: none on a 1-2 core CPU, more with more cores or CUDA).")


def _stream_option(role: str):
    """--stream-a / --stream-b: which CNN a stream is (a new model; a checkpoint carries its own)."""
    default = "mobilenet_v2" if role == "a" else "efficientnet_lite0"
    return typer.Option(None, f"--stream-{role}", help=f"Stream {role.upper()}: {_STREAM_HELP} \\[{default}].")


def _stream_weights_option(role: str):
    """--stream-a-weights / --stream-b-weights: local ImageNet weights of a VGG-16 / ResNet-50 stream."""
    return typer.Option(None, f"--stream-{role}-weights", help=_STREAM_WEIGHTS_HELP.format(role.upper()))


def _variant_option():
    return typer.Option(None, "--variant", help="cuhk03 / cuhk03-np: labeled or detected.")


def _protocol_option():
    return typer.Option(None, "--protocol", help="cuhk03: new or classic.")


def _split_option(default_text: str = ""):
    return typer.Option(None, "--split", help=f"cuhk03 classic split 0..19{default_text}.")


class DeviceName(str, Enum):
    """--device: auto picks CUDA when present."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class RuntimeName(str, Enum):
    """--runtime: auto is torch with CUDA; on a CPU ONNX Runtime for a query, the fastest measured for bulk
    embedding (reid.engine)."""

    auto = "auto"
    torch = "torch"
    onnx = "onnx"
    openvino = "openvino"


def _runtime_option(auto: str = "on a CPU the fastest here, measured once per model") -> typer.models.OptionInfo:
    return typer.Option(RuntimeName.auto, "--runtime",
                        help=f"Embedding runtime: auto ({auto}; torch with CUDA), torch, onnx or openvino; the "
                             "model's export is made once and cached.")


# Set when a read-only command has finished: ``run`` may then skip the interpreter's teardown.
_read_only_done = False


# Library messages name their parameters in backticks; the CLI says which option sets each.
_OPTIONS = {
    "`stream_weights['a']`": "--stream-a-weights", "`stream_weights['b']`": "--stream-b-weights",
    "`pretrained=False`": "--no-pretrained", "`weights`": "--weights", "`device`": "--device",
    "`top`": "--top", "`other_cameras`": "--other-cameras",
    # evaluate and train
    "`ap`": "--ap", "`seed`": "--seed", "`batch_size`": "--batch-size", "`workers`": "--workers",
    "`resume=True`": "--resume", "`out`": "--out", "`epochs`": "--epochs", "`lr`": "--lr",
    "`batch_p`": "--batch-p", "`batch_k`": "--batch-k", "`schedule`": "--schedule", "`precision`": "--precision",
    "`eval_every=0`": "--eval-every 0", "`eval_every`": "--eval-every",
    "`model_config`": "--input-size / --stream-a / --stream-b",
    # adapt
    "`eps`": "--eps", "`views`": "--views", "`min_samples`": "--min-samples", "`k1`": "--k1",
    # index --ray
    "`ray`": "--ray",
}


def _message(e: Exception) -> str:
    """A library error in the CLI's words: what is wrong, then which option fixes it."""
    from reid.errors import EmptyGalleryError, GalleryBusyError, GalleryNotFoundError, ModelMismatchError

    if isinstance(e, ModelMismatchError):
        theirs = "" if e.built_with.is_default else f" --weights {e.built_with.source}"
        ours = "" if e.given.is_default else f" --weights {e.given.source}"
        return (f"{e}; use{theirs or ' the default model (drop --weights)'} for its model, or re-embed the gallery: "
                f"`reid index GALLERY --index {e.gallery} --rebuild{ours}`")
    if isinstance(e, GalleryNotFoundError):
        return f"{e}; build one with `reid index GALLERY --index {e.location}`"
    if isinstance(e, EmptyGalleryError):
        return f"{e}; add images with `reid index GALLERY --index {e.location}`"
    if isinstance(e, GalleryBusyError) and not e.waited:
        return f"{e}, or pass --wait SECONDS"
    text = str(e)
    for name, option in _OPTIONS.items():
        text = text.replace(name, option)
    return text


def command(*args, read_only: bool = False, **kwargs):
    """Register a Typer command whose ReidError becomes one line on stderr and exit code 1.

    ``read_only``: the command writes nothing but stdout/stderr, so the program may end without
    the interpreter's teardown once it has returned (see ``run``).
    """

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            global _read_only_done
            from reid.errors import ReidError

            try:
                result = fn(*a, **k)
                _read_only_done = read_only
                return result
            except ReidError as e:
                err.print(f"[bold red]error:[/] {_message(e)}", highlight=False, soft_wrap=True)
                _read_only_done = read_only
                raise typer.Exit(1) from None  # reported above as one line
            except KeyboardInterrupt:
                err.print("[yellow]interrupted[/]")
                raise typer.Exit(130) from None

        if fn.__doc__ and "short_help" not in kwargs:  # the command list shows the first paragraph as one line
            kwargs["short_help"] = " ".join(fn.__doc__.split("\n\n")[0].split())
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


_STREAM_HELP = "mobilenet_v2, efficientnet_lite0, vgg16 or resnet50"
_STREAM_WEIGHTS_HELP = "ImageNet weights of a vgg16 / resnet50 stream {}: torchvision's .pth file or .safetensors."


def _model_config(**fields):
    """A ModelConfig from the options that were given (None when none was); its ValueError as an InputError."""
    from reid.errors import InputError
    from reid.model import ModelConfig

    fields = {k: v for k, v in fields.items() if v is not None}
    if not fields:
        return None
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise InputError(str(e)) from None


@command("model", read_only=True)
def model_cmd(
    weights: Path | None = typer.Option(None, "--weights",
                                        help="Checkpoint (folder or .pt); default: pretrained model."),
    stream_a: str | None = _stream_option("a"),
    stream_b: str | None = _stream_option("b"),
    stream_a_weights: Path | None = _stream_weights_option("a"),
    stream_b_weights: Path | None = _stream_weights_option("b"),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained",
                                    help="ImageNet streams, or seeded random ones (sizes and FLOPs without weights)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Describe the network: streams, grid, sizes, parameters, FLOPs per image, fingerprint."""
    import json

    from reid.model import load_model
    from reid.model.summary import model_summary
    from reid.runtime import prepare_torch

    prepare_torch()
    config = _model_config(stream_a=stream_a, stream_b=stream_b)
    model = load_model(weights, config=config, pretrained=pretrained,
                       stream_weights={"a": stream_a_weights, "b": stream_b_weights})
    info = model_summary(model)
    files = [f"{role}: {path}" for role, path in (("A", stream_a_weights), ("B", stream_b_weights)) if path]
    streams = "packaged ImageNet streams" if not files else f"ImageNet streams ({'; '.join(files)})"
    from reid.model import ModelConfig
    from reid.model.net import uses_default_head

    head = "shipped head" if uses_default_head(config or ModelConfig(), pretrained=pretrained) else "seeded head"
    info["weights"] = str(weights) if weights is not None else \
        f"{streams if pretrained else 'seeded random streams'} + {head}"
    if as_json:
        typer.echo(json.dumps(info))
        return
    from reid.console import model_table

    out.print(model_table(info))


class ExportFormat(str, Enum):
    """--format of reid export."""

    onnx = "onnx"
    openvino = "openvino"


@command("export", read_only=True)
def export_cmd(
    out_file: Path = typer.Argument(..., help="File to write: model.onnx, or model.xml (+ .bin) for openvino."),
    weights: Path | None = typer.Option(None, "--weights", help="Checkpoint (folder or .pt); default: the default "
                                        "model."),
    fmt: ExportFormat = typer.Option(ExportFormat.onnx, "--format", help="onnx or openvino (IR, float32)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Export the embedding model with its input contract and fingerprint in the file, checked against torch."""
    import json

    from reid.model.export import export_model
    from reid.model.identity import ModelRef
    from reid.runtime import prepare_torch

    prepare_torch()
    model, ref = ModelRef.load(None if weights is None else str(weights), "cpu")
    report = export_model(model, out_file, fmt.value, fingerprint=ref.fingerprint)
    if as_json:
        typer.echo(json.dumps({k: v for k, v in report.items() if k != "reid.config"}))
        return
    out.print(f"exported {ref.source} ({ref.fingerprint}) as {fmt.value}: {', '.join(report['files'])}")
    out.print(f"input {report['reid.input']}, {report['reid.input_size']}; output {report['reid.embed_dim']}-d "
              f"L2-normalised; against torch: cosine min {report['cos_min']:.7f}, same top-5 {report['same_top5']}")


# --- index / query / info / demo (issue 4) ----------------------------------------------------

DEFAULT_INDEX = Path("indexes/default")
_INDEX_HELP = "Index folder, or milvus://HOST:PORT/COLLECTION (env REID_INDEX)."


def _index_option() -> str:
    return typer.Option(DEFAULT_INDEX, "--index", envvar="REID_INDEX", help=_INDEX_HELP)


class IndexKind(str, Enum):
    auto = "auto"
    flat = "flat"
    hnsw = "hnsw"
    ivfpq = "ivfpq"


def _render_index_report(report, as_json: bool) -> None:
    import json

    from reid.console import print_index_report

    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        print_index_report(out, report)


@command("index")
def index_cmd(
    gallery: Path = typer.Argument(..., help="Folder of crops and videos (searched recursively: jpg, jpeg, png, bmp, "
                                   "webp; mp4, avi, mkv, mov, ...), or one video or crop file."),
    index: str = _index_option(),
    weights: Path | None = typer.Option(
        None, "--weights",
        help="Checkpoint (folder or .pt). Default: the index's model; the pretrained model for a new index."),
    camera: str | None = typer.Option(None, "--camera", help="Camera name for the videos (default: the video's "
                                      "folder name, else a Market-style name's camera)."),
    stride: int = typer.Option(1, "--stride", min=1, help="Process every n-th video frame."),
    frames: bool | None = typer.Option(None, "--frames/--crops", help="Image folders hold full camera frames to "
                                       "find people in, or crops (default: frames when the images are landscape "
                                       "and at least 480 pixels wide)."),
    detector: str = typer.Option("ssdlite", "--detector", help="Person detector for videos."),
    det_score: float = typer.Option(0.6, "--det-score", min=0.01, max=1.0, help="Detector score a person needs."),
    min_height: float = typer.Option(32.0, "--min-height", min=0, help="Ignore people shorter than this (pixels)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    workers: int | None = _workers_option("Decoding processes"),
    device: DeviceName = typer.Option(DeviceName.auto, "--device"),
    kind: IndexKind | None = typer.Option(
        None, "--kind",
        help="Vector index kind; default: keep the index's (auto for a new index: exact below 200k rows)."),
    prune: bool = typer.Option(False, "--prune", help="Remove rows of files under GALLERY that are gone."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Drop every row and re-embed (e.g. with another model)."),
    wait: float = typer.Option(0.0, "--wait", min=0, help="Seconds to wait for another writer of the index."),
    runtime: RuntimeName = _runtime_option(),
    ray: bool = typer.Option(False, "--ray", help="Decode and embed the crop files on Ray Data (a local cluster on "
                             "loopback unless --ray-address); the index is written here. Videos are read here."),
    ray_address: str | None = typer.Option(None, "--ray-address", metavar="ADDRESS",
                                           help="Ray cluster for --ray (implies it): auto, HOST:6379 or "
                                                "ray://HOST:10001."),
    ray_actors: int | None = typer.Option(None, "--ray-actors", min=1, show_default="auto",
                                          help="Model workers on Ray (auto: one per GPU, else one per node)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """Embed every new or changed crop of GALLERY, and the people in its videos, into the index (incremental,
    resumable: a killed run goes on where it stopped)."""
    from reid.console import embedding_progress
    from reid.index import FootageOptions, build_index

    run_index, extra = build_index, {}
    if ray or ray_address is not None:
        from reid.distributed import RayOptions, index_on_ray

        run_index, extra = index_on_ray, {"ray": RayOptions(address=ray_address, actors=ray_actors)}
    elif ray_actors is not None:
        raise typer.BadParameter("needs --ray", param_hint="--ray-actors")
    footage = FootageOptions(detector=detector, score_threshold=det_score, min_height=min_height, stride=stride,
                             camera=camera, frames=frames)
    with embedding_progress(err) as bar:
        tasks: dict[str, int] = {}

        def progress(kind: str, done: int, total: int) -> None:
            if kind not in tasks:
                tasks[kind] = bar.add_task("embedding" if kind == "crops" else "video", total=None,
                                           unit="img" if kind == "crops" else "frames")
            bar.update(tasks[kind], completed=done, total=total)

        report = run_index(gallery, index, weights=None if weights is None else str(weights), batch_size=batch_size,
                           workers=workers, device=device.value, kind=kind and kind.value, prune=prune,
                           rebuild=rebuild, wait=wait, runtime=runtime.value, footage=footage,
                           progress=lambda done, total: progress("crops", done, total),
                           frame_progress=lambda done, total: progress("frames", done, total), **extra)
    _render_index_report(report, as_json)


@command("query", read_only=True)
def query_cmd(
    images: list[Path] = typer.Argument(..., help="Query crop(s)."),
    index: str = _index_option(),
    top: int = typer.Option(10, "--top", min=1, help="Matches per query."),
    as_json: bool = typer.Option(False, "--json", help="One JSON line per query on stdout."),
    save: Path | None = typer.Option(None, "--save", help="Write a picture: each query beside its matches."),
    min_score: float | None = typer.Option(None, "--min-score", help="Drop matches scoring below this cosine."),
    fuse: bool = typer.Option(False, "--fuse", help="The crops show one person: rank the gallery once by their mean "
                              "embedding (multi-shot query)."),
    other_cameras: bool = typer.Option(False, "--other-cameras", help="Leave out gallery crops from the query's own "
                                       "camera (read from a Market-style name, e.g. 0002_c1s1_...)."),
    since: str | None = typer.Option(None, "--since", help="Only matches seen at or after this time (ISO 8601, "
                                     "e.g. 2026-12-01T14:30; UTC unless it names a zone)."),
    until: str | None = typer.Option(None, "--until", help="Only matches seen at or before this time."),
    camera: list[str] | None = typer.Option(None, "--camera", help="Only matches from this camera (repeatable)."),
    per_track: bool | None = typer.Option(None, "--per-track/--per-row", help="One answer per tracklet, its best "
                                          "crop and time span (default for matches from video), or every row."),
    device: DeviceName = typer.Option(DeviceName.auto, "--device"),
    runtime: RuntimeName = _runtime_option("ONNX Runtime on a CPU: no torch import, the fastest for one crop"),
) -> None:
    """Rank the indexed gallery for each query crop (same model as the index, checked by fingerprint): who,
    where and when."""
    import json

    from reid.console import print_matches
    from reid.search import parse_time, query_images
    from reid.store import Filter

    if save is not None:
        from reid.viz import check_picture_path

        check_picture_path(save)
    where = Filter(since=parse_time(since, "--since"), until=parse_time(until, "--until"),
                   camera_names=camera or None)
    results = query_images(images, index, top=top, min_score=min_score, device=device.value, runtime=runtime.value,
                           fuse=fuse, other_cameras=other_cameras, where=where, per_track=per_track)
    for r in results:
        if as_json:
            typer.echo(json.dumps(r.to_dict()))
        else:
            print_matches(out, r)
    if save is not None:
        from reid.search_picture import save_results

        save_results(save, results)
        err.print(f"picture written to {save}")


@command("info", read_only=True)
def info_cmd(
    index: str = _index_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    repair: bool = typer.Option(False, "--repair", help="Rebuild vectors.faiss from the catalogue if it is stale."),
) -> None:
    """Rows, dimension, index kind, model, size on disk and last update of an index."""
    import json

    from reid.store import open_gallery

    with open_gallery(index) as gallery:
        if repair:
            gallery.sync()
        info = gallery.info()
    if as_json:
        typer.echo(json.dumps(info))
        return
    from reid.console import info_table

    out.print(info_table(info))


@command("demo")
def demo_cmd(
    folder: Path = typer.Argument(Path("reid-demo"), help="Where to write the gallery, the index and the picture."),
    identities: int = typer.Option(12, "--identities", min=2, help="Synthetic people in the gallery."),
    device: DeviceName = typer.Option(DeviceName.auto, "--device"),
) -> None:
    """Generate a small synthetic gallery, index it with the default model, query one crop, save the picture."""
    from reid.console import embedding_progress, print_matches
    from reid.synthetic import write_folder
    from reid.images import find_images
    from reid.search import query_images
    from reid.search_picture import save_results
    from reid.index import build_index

    data = folder / "data"
    if not (data / "gallery").is_dir():
        err.print(f"writing a synthetic gallery of {identities} people to {data}")
        write_folder(data, num_test_ids=identities, num_distractors=identities // 2, with_train=False)
    with embedding_progress(err) as bar:
        task = bar.add_task("embed", total=None)
        report = build_index(data / "gallery", folder / "index", weights="default", device=device.value,
                             progress=lambda done, total: bar.update(task, completed=done, total=total))
    _render_index_report(report, as_json=False)
    query = find_images(data / "query")[0]
    results = query_images([query], folder / "index", top=8, device=device.value)
    print_matches(out, results[0])
    picture = save_results(folder / "result.jpg", results)
    out.print(f"picture written to {picture}")
    hits = results[0].matches
    right = sum(m.pid == results[0].pid for m in hits)
    err.print(f"{right} of the {len(hits)} matches are the query's person (identity {results[0].pid}, from the file "
              f"names; the gallery holds {identities} people and distractors). The default head is fitted without "
              f"labeled re-id data (README: \"Quality on real pedestrians\"); `reid adapt` on your own crops or "
              f"`reid train` on labeled ones does better", highlight=False, soft_wrap=True)


# --- evaluate (issue 6) -----------------------------------------------------------------------


@command("evaluate")
def evaluate_cmd(
    dataset: str = typer.Argument(..., help="market1501, dukemtmcreid, cuhk03, cuhk03-np or folder."),
    root: Path = typer.Option(..., "--root", help="Folder holding the dataset as its owners ship it."),
    weights: Path | None = typer.Option(None, "--weights",
                                        help="Checkpoint (folder or .pt); default: pretrained model."),
    variant: str | None = _variant_option(),
    protocol: str | None = _protocol_option(),
    split: int | None = _split_option(" (default: all, mean ± std)"),
    rerank: bool = typer.Option(False, "--rerank", help="k-reciprocal re-ranking."),
    ap: str = typer.Option("standard", "--ap", help="standard (open-reid) or trapezoid (official Market MATLAB)."),
    flip: bool = typer.Option(False, "--flip", help="Average embeddings with horizontally flipped crops."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    workers: int | None = _workers_option("Decoding processes"),
    device: DeviceName = typer.Option(DeviceName.auto, "--device"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    plot: Path | None = typer.Option(None, "--plot", help="Write the CMC curve (ranks 1-50) to this picture."),
    ranks: Path | None = typer.Option(None, "--ranks", help="Write the top-10 of sampled queries to this picture."),
    ranks_queries: int = typer.Option(8, "--ranks-queries", min=1, help="Queries shown in --ranks."),
    attention: bool = typer.Option(False, "--attention", help="Overlay the model's attention on the --ranks crops."),
    save_features: Path | None = typer.Option(None, "--save-features", help="Write features, ids and paths (.npz)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the feature cache."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of CUHK03 classic sampling and of the --ranks queries."),
    runtime: RuntimeName = typer.Option(RuntimeName.torch, "--runtime",
                                        help="Embedding runtime: torch (the reference numbers), or the model's "
                                             "checked export on onnx / openvino (auto: the fastest on this CPU, "
                                             "measured once per model)."),
) -> None:
    """Mean AP, CMC and mINP of a model on a dataset's standard protocol."""
    import json

    from reid import viz
    from reid.console import embedding_progress
    from reid.errors import InputError
    from reid.evaluation import ScoreOptions
    from reid.evaluation import evaluate as ev_mod

    for picture in (plot, ranks):
        if picture is not None:
            viz.check_picture_path(picture)
    if save_features is not None:
        ev_mod.check_features_path(save_features)
    if attention and ranks is None:
        raise InputError("--attention draws on the --ranks picture; add --ranks FILE")
    options = ev_mod.EvalOptions(variant=variant, protocol=protocol, split=split, flip=flip, batch_size=batch_size,
                                 workers=workers, device=device.value, use_cache=not no_cache,
                                 scoring=ScoreOptions(rerank=rerank, ap=ap, seed=seed), runtime=runtime.value)
    with embedding_progress(err) as bar:
        task = bar.add_task("embed", total=None)
        ev = ev_mod.evaluate(dataset, root, options, weights=weights,
                             progress=lambda done, total: bar.update(task, completed=done, total=total))
    rep = ev.report
    if save_features is not None:
        ev_mod.save_features(save_features, ev.sets, ev.splits)
        err.print(f"features written to {save_features}")
    if plot is not None:
        title = f"CMC - {dataset}" + (f" ({rep['protocol']})" if dataset == "cuhk03" else "")
        curve_name = rep["weights"] if len(rep["weights"]) < 28 else "model"
        viz.save_image(plot, viz.plot_cmc({curve_name: ev.cmc}, title=title))
        err.print(f"CMC curve written to {plot}")
    if ranks is not None:
        viz.save_image(ranks, ev_mod.rank_picture(ev, num_queries=ranks_queries, seed=seed, attention=attention))
        err.print(f"rank lists written to {ranks}")

    if as_json:
        typer.echo(json.dumps(rep))
        return
    from reid.console import evaluation_table

    out.print(evaluation_table(rep, dataset))


# --- train (issue 5) --------------------------------------------------------------------------


def _parse_size(text: str) -> tuple[int, int]:
    """'256x128' -> (256, 128)."""
    from reid.errors import InputError

    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--input-size must look like 256x128 (height x width), not {text!r}") from None
    return h, w


@command("train")
def train_cmd(
    dataset: str = typer.Argument(..., help="market1501, dukemtmcreid, cuhk03, cuhk03-np or folder."),
    root: Path = typer.Option(..., "--root", help="Folder holding the dataset as its owners ship it."),
    out_dir: Path | None = typer.Option(None, "--out", help="Run folder (default: runs/DATASET)."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Epochs in all [60]."),
    batch_p: int | None = typer.Option(None, "--batch-p", min=1, help="Identities per batch [16]."),
    batch_k: int | None = typer.Option(None, "--batch-k", min=1, help="Images per identity [4]."),
    lr: float | None = typer.Option(None, "--lr", help="Head learning rate (AdamW) [3e-3]."),
    backbone_lr_mult: float | None = typer.Option(None, "--backbone-lr-mult", help="Streams' lr / head lr [0.1]."),
    classifier_lr_mult: float | None = typer.Option(None, "--classifier-lr-mult",
                                                    help="Identity classifier's lr / head lr [10]."),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="[5e-4]"),
    schedule: str | None = typer.Option(None, "--schedule", help="cosine, step or constant \\[cosine]."),
    warmup_epochs: int | None = typer.Option(None, "--warmup-epochs", min=0,
                                             help="Linear warm-up, at most a tenth of the run [5]."),
    milestones: str | None = typer.Option(None, "--milestones", help="Step schedule: epochs of x0.1, e.g. 40,70."),
    freeze_backbone_epochs: int | None = typer.Option(None, "--freeze-backbone-epochs", min=0,
                                                         help="Train only the head for the first N epochs [0]."),
    attention_entropy: float | None = typer.Option(None, "--attention-entropy", min=0.0,
                                                      help="Weight of the attention-entropy regulariser [0]."),
    precision: str | None = typer.Option(None, "--precision", help="auto, fp32, bf16 or fp16 (CUDA) \\[auto]."),
    seed: int | None = typer.Option(None, "--seed", min=0, help="Seed of sampling, augmentation, init [0]."),
    eval_every: int | None = typer.Option(None, "--eval-every", min=0,
                                             help="Evaluate every N epochs and at the end; 0 = never [10]."),
    input_size: str | None = typer.Option(None, "--input-size", help="Crop size HxW [256x128]."),
    stream_a: str | None = _stream_option("a"),
    stream_b: str | None = _stream_option("b"),
    stream_a_weights: Path | None = _stream_weights_option("a"),
    stream_b_weights: Path | None = _stream_weights_option("b"),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="Start from ImageNet streams."),
    variant: str | None = _variant_option(),
    protocol: str | None = _protocol_option(),
    split: int | None = _split_option(),
    device: DeviceName = typer.Option(DeviceName.auto, "--device"),
    workers: int | None = _workers_option("Decoding + augmentation processes"),
    eval_batch_size: int = typer.Option(64, "--eval-batch-size", min=1),
    max_minutes: float | None = typer.Option(None, "--max-minutes", min=0.0,
                                                help="Stop after the epoch past which another would not fit."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it stopped."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON document on stdout."),
) -> None:
    """Train the network on a dataset's training split; checkpoints in OUT/last and OUT/best, log in OUT/metrics.jsonl."""  # noqa: E501 - Typer prints this line as is in `reid --help`; a wrap would show there
    import json

    from reid.console import training_progress, training_table
    from reid.datasets import load
    from reid.errors import InputError
    from reid.train import TrainConfig, load_run_config, train

    out_dir = out_dir or Path("runs") / dataset.lower()
    changes = {k: v for k, v in dict(
        epochs=epochs, batch_p=batch_p, batch_k=batch_k, lr=lr, backbone_lr_mult=backbone_lr_mult,
        classifier_lr_mult=classifier_lr_mult,
        weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
        freeze_backbone_epochs=freeze_backbone_epochs, attention_entropy_weight=attention_entropy,
        precision=precision, seed=seed, eval_every=eval_every).items() if v is not None}
    if milestones is not None:
        try:
            changes["milestones"] = tuple(int(m) for m in milestones.split(",") if m.strip())
        except ValueError:
            raise InputError(f"--milestones must be comma-separated epochs like 40,70, not {milestones!r}") from None
    base = (load_run_config(out_dir) if resume else None) or TrainConfig()
    config = base.replace(**changes)
    model_config = _model_config(input_size=_parse_size(input_size) if input_size else None,
                                 stream_a=stream_a, stream_b=stream_b)
    options = {k: v for k, v in dict(variant=variant, protocol=protocol, split=split).items() if v is not None}
    data = load(dataset, root, **options)

    bar, on_event = training_progress(err)
    with bar:
        result = train(data, out_dir, config, model_config=model_config, pretrained=pretrained,
                       stream_weights={"a": stream_a_weights, "b": stream_b_weights}, device=device.value,
                       workers=workers, resume=resume, eval_batch_size=eval_batch_size, on_event=on_event,
                       max_seconds=max_minutes * 60 if max_minutes is not None else None)

    summary = {
        "out": str(result.out), "epochs_done": result.epochs_done, "stopped_early": result.stopped_early,
        "best_mAP": result.best_map, "best_epoch": result.best_epoch, "images_per_s": round(result.images_per_s, 2),
        "last": result.last, "last_checkpoint": str(result.out / "last"),
        "best_checkpoint": str(result.out / "best") if result.best_epoch else None,
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    out.print(training_table(result, dataset))


# --- adapt (issue 11) -----------------------------------------------------------------------------


@command("adapt")
def adapt_cmd(
    gallery: Path = typer.Argument(..., help="Folder of unlabeled pedestrian crops from your own cameras, or an "
                                   "index (its crops and the people it found in footage; a tracklet's crops are "
                                   "kept in one cluster)."),
    out_dir: Path = typer.Option(..., "--out", help="Run folder: the adapted checkpoint is OUT/last."),
    weights: Path | None = typer.Option(None, "--weights", help="Start from this checkpoint [the default model]."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Epochs of re-clustering + training [12]."),
    eps: float | None = typer.Option(None, "--eps", help="DBSCAN radius on Jaccard distances [0.6]."),
    min_samples: int | None = typer.Option(None, "--min-samples", min=1, help="Crops that make a cluster [4]."),
    k1: int | None = typer.Option(None, "--k1", min=1, help="Neighbours of the k-reciprocal Jaccard distances [30]; "
                                  "about the crops one person has in the gallery."),
    views: int | None = typer.Option(None, "--views", min=1, help="Cached views per crop, the clean one included [4]."),
    camera_aware: bool | None = typer.Option(
        None, "--camera-aware/--no-camera-aware",
        help="Use the cameras (from Market-style names): cluster with each camera's mean feature taken away, and "
             "one proxy per cluster and camera."),
    fine_tune: bool = typer.Option(False, "--fine-tune", help="Train the CNN streams too (no stream cache; about "
                                   "10x slower on a CPU, better adapted)."),
    seed: int | None = typer.Option(None, "--seed", min=0, help="Seed of views and sampling [0]."),
    device: DeviceName = typer.Option(DeviceName.auto, "--device"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON document on stdout."),
) -> None:
    """Adapt the network to your cameras without labels (cluster contrast); resumes an interrupted run in OUT."""
    import dataclasses
    import json

    from reid.console import adapt_progress
    from reid.train.adapt import AdaptConfig, adapt

    changes = {k: v for k, v in dict(epochs=epochs, eps=eps, min_samples=min_samples, k1=k1, views=views,
                                     camera_aware=camera_aware, centre_cameras=camera_aware, seed=seed,
                                     fine_tune=fine_tune or None).items() if v is not None}
    config = dataclasses.replace(AdaptConfig(), **changes)
    bar, on_epoch, on_progress = adapt_progress(err)
    with bar:
        result = adapt(gallery, out_dir, weights=weights, config=config, device=device.value, on_epoch=on_epoch,
                       progress=on_progress)
    for _, reason in result.failed:
        err.print(f"[yellow]skipped[/] {reason}", highlight=False)
    summary = {"out": str(result.out), "checkpoint": str(result.checkpoint), "crops": result.crops,
               "skipped": len(result.failed), "epochs_done": result.epochs_done, "stopped_early": result.stopped_early,
               "last": result.records[-1] if result.records else None}
    if as_json:
        typer.echo(json.dumps(summary))
        return
    last = summary["last"] or {}
    if result.stopped_early:
        kept = ("holds what the earlier epochs learned" if any(r.get("steps") for r in result.records)
                else "is the model as it came in")
        out.print(f"stopped after epoch {result.epochs_done}: its {last.get('clusters')} clusters (the largest of "
                  f"{last.get('largest')} of {result.crops} crops) gave nothing to learn, and later epochs would find "
                  f"the same; try a smaller --eps or --k1. {result.checkpoint} {kept}", highlight=False)
        return
    out.print(f"adapted to {result.crops} crops over {result.epochs_done} epochs: {last.get('clusters')} clusters, "
              f"{last.get('outliers')} outliers; use it with --weights {result.checkpoint}", highlight=False)


def run() -> None:
    """The ``reid`` program: ``app()``; after a read-only command, exit without the interpreter's teardown.

    Unloading torch, FAISS and the CUDA libraries at exit costs ~0.4 s, a sixth of a one-shot
    ``reid query`` (``benchmarks/bench_index.py``). Commands that write files finish normally.
    """
    try:
        app()
        code: object = 0
    except SystemExit as e:
        code = e.code
    if not _read_only_done:
        raise SystemExit(code)
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`reid query ... | head`): nothing left to deliver
            code = code or 1
    os._exit(code)


if __name__ == "__main__":
    run()
