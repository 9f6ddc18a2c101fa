"""``reid index SOURCE --ray``: crop files decoded and embedded by Ray Data, stored by this process.

Only the decode + embed step of ``reid.index`` moves to Ray: the walk, the plan (new, changed, copies,
unchanged; ``reid.index._plan``), the writes to the gallery (any backend), pruning and the final sync stay
in this process, through ``reid.index.build_index``, which hands this module the crop files to embed
(its ``crop_embedder`` hook). The pipeline::

    ray.data.from_items(paths)                                   one block per batch of paths
      .map_batches(_decode, num_cpus=0.5)                        reid.images.decode_crop, in Ray tasks
      .map_batches(_Embed, compute=ActorPoolStrategy(size=N),    model workers: one per GPU of the cluster
                   num_gpus=1 where there is one)                (torch on CUDA), else one per node (its cores)
      .iter_batches(batch_size)  -> Gallery.add per batch        here, like the local path: a killed run
                                                                 loses at most the batches not yet stored

A model worker loads the gallery's model the way ``build_index`` does (``ModelRef.load`` on the device and
runtime ``reid.engine.wants_torch`` picks on the worker's machine; the export from the cache, made there when
missing), checks its fingerprint against the gallery's, and embeds with ``reid.embed.embed_batch``: the model
calls of ``reid.embed.embed_paths``, so the vectors are the local path's. Files that do not decode are
reported as the local path reports them (the same reasons). Videos and frame folders are read in this
process (``build_index`` says so on stderr).

Without an address a local cluster is started on loopback (127.0.0.1, no dashboard, no usage statistics)
and shut down at the end, also on Ctrl-C; a process that already has Ray initialised (a library caller, the
tests) keeps its cluster. With an address (``auto``, ``HOST:6379``, ``ray://HOST:10001``) this process
connects to that cluster, whose nodes need reid installed and the crop files at the same paths (and the
checkpoint, unless the model's export is in their cache already). Ray is imported only here, only then.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from reid.errors import CheckpointError, InputError, ReidError

if TYPE_CHECKING:
    from reid.index import IndexReport
    from reid.model.identity import ModelRef

log = logging.getLogger(__name__)

RAY_MISSING = ("`ray` needs Ray Data, which is not installed: `pip install 'ray[data]>=2.10'` "
               "(the ray extra: `pip install -e '.[ray]'`)")
_LOCAL = "local"  # ray.init's address for "start a new local cluster" (RAY_ADDRESS is not looked at)


@dataclass(frozen=True)
class RayOptions:
    """Where and how ``reid index --ray`` runs."""

    address: str | None = None  # None: a local cluster on loopback (or the one this process has already)
    actors: int | None = None  # model workers; None: one per GPU of the cluster, else one per node
    num_cpus: int | None = None  # CPUs of a local cluster started here (None: Ray counts this machine's)

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise InputError(f"--ray-actors must be at least 1, not {self.actors}")


def import_ray(local: bool = True):
    """``ray`` with Ray Data, or InputError (one line) when it is not installed. ``local``: Ray runs on (or this
    process talks to a cluster on) this machine only, so the settings that keep it on loopback are made before
    Ray reads them at import."""
    if local:
        _keep_on_loopback()
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data needs pyarrow and pandas: fail here, not mid-run
    except ImportError:
        raise InputError(RAY_MISSING) from None
    _quiet(ray)
    return ray


def _keep_on_loopback() -> None:
    # Ray's own "local Ray only" switch: its node address is then 127.0.0.1 (not the address this machine
    # routes to a public DNS server by), so every Ray process listens on and connects to loopback only.
    # Read at import; the processes Ray starts inherit it. No usage statistics are collected or sent.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # imported before by someone else: the switch is a module constant by now
        constants.ENABLE_RAY_CLUSTER = False


def _quiet(ray) -> None:
    """Ray's and Ray Data's own logging and progress bars off the terminal (``-v`` shows their info lines):
    ``reid index`` draws its progress on stderr itself."""
    verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.CRITICAL)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False


def start_local(ray, num_cpus: int | None = None) -> None:
    """Start a local Ray cluster on loopback (``import_ray(local=True)`` first)."""
    _keep_on_loopback()
    log.info("starting a local Ray cluster (%s CPUs)", num_cpus or "all")
    for attempt in (1, 2):  # Ray gives its raylet a fixed 30 s to register, which a busy machine can miss
        try:
            ray.init(address=_LOCAL, num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False, configure_logging=False)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for a node that did not start
            ray.shutdown()
            if attempt == 2:
                raise ReidError(f"the local Ray cluster did not start: {_last_line(e)}") from None
            log.warning("the local Ray cluster did not start (%s); trying once more", _last_line(e))


@contextmanager
def cluster(options: RayOptions) -> Iterator[Callable[[], object]]:
    """A function that returns ``ray`` connected to the cluster of ``options`` (connecting on its first call);
    a local cluster started by it is shut down when the block ends, however it ends."""
    local = options.address is None
    ray = import_ray(local=local or on_this_machine(options.address))
    if not local:
        check_reachable(options.address)  # before anything is written
    started = False

    def connect():
        nonlocal started
        if not ray.is_initialized():
            if local:
                start_local(ray, options.num_cpus)
            else:
                log.info("connecting to the Ray cluster at %s", options.address)
                try:
                    ray.init(address=options.address, log_to_driver=False, configure_logging=False)
                except (ConnectionError, RuntimeError, ValueError) as e:
                    raise InputError(f"cannot connect to the Ray cluster at {options.address}: {_last_line(e)}"
                                     ) from None
            started = True
            _quiet(ray)
        return ray

    try:
        yield connect
    finally:
        if started:
            ray.shutdown()


def _host_port(address: str) -> tuple[str, int] | None:
    m = re.fullmatch(r"(?:ray://)?\[?([^\[\]/]+?)\]?:(\d+)/?", address)
    return None if m is None else (m.group(1), int(m.group(2)))


def on_this_machine(address: str) -> bool:
    """``auto`` (the cluster this machine runs) or a loopback ``HOST:PORT``: this process then talks to the
    cluster on loopback too (Ray would otherwise swap 127.0.0.1 for this machine's network address, where a
    cluster started on loopback does not listen)."""
    hp = _host_port(address)
    return address == "auto" or (hp is not None and (hp[0] in ("localhost", "::1") or hp[0].startswith("127.")))


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """InputError unless ``HOST:PORT`` (or ``ray://HOST:PORT``) accepts a connection: Ray itself retries a wrong
    address for minutes. ``auto`` and other forms are left to Ray."""
    import socket

    hp = _host_port(address)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=timeout).close()
    except OSError as e:
        raise InputError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


# --- on the cluster -----------------------------------------------------------------------------------------


def _decode(batch: dict[str, np.ndarray], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """paths -> crops at the model's size (zeros where a file did not decode) and the reasons ("" for the others)."""
    from reid.images import decode_crop

    crops, errors = [], []
    for path in batch["path"]:
        crop, reason = decode_crop(str(path), size)
        crops.append(np.zeros((*size, 3), np.uint8) if crop is None else crop)
        errors.append(reason or "")
    return {"path": batch["path"], "crop": np.stack(crops), "error": np.asarray(errors, dtype=object)}


def load_worker_model(source: str, fingerprint: str, runtime: str, device: str, threads: int | None = None):
    """The gallery's model as ``build_index`` makes it, on the device and runtime ``reid.engine`` picks on this
    machine -> (model or export, torch device). CheckpointError when ``source`` holds another model here."""
    from reid import engine
    from reid.model.identity import ModelRef
    from reid.runtime import resolve_device

    use_torch = engine.wants_torch(runtime, device)
    dev = resolve_device(device if use_torch else "cpu")
    if use_torch and dev.type == "cpu" and threads:
        import torch

        torch.set_num_threads(threads)  # Ray gives a worker OMP_NUM_THREADS of its CPU share; the model has the node
    fmt = None if use_torch else engine.exported_runtime(runtime)
    if fmt is not None:
        found = engine.cached_embedder(fingerprint, fmt, threads=threads)
        if found is not None:
            return found, dev
    model, ref = ModelRef.load(source, dev)
    if ref.fingerprint != fingerprint:
        raise CheckpointError(f"the model {source} is {ref.fingerprint} on this Ray node, not the gallery's "
                              f"{fingerprint}")
    return (model if fmt is None else engine.ensure_exported(model, fingerprint, fmt, threads=threads)), dev


class _Embed:
    """A Ray Data model worker: crops -> embeddings (zeros for the files that did not decode)."""

    def __init__(self, source: str, fingerprint: str, runtime: str, device: str, threads: int | None,
                 total: int) -> None:
        self.model, self.device = load_worker_model(source, fingerprint, runtime, device, threads)
        self.total = total
        self.dim = int(self.model.embed_dim)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from reid.embed import embed_batch

        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        vectors = np.zeros((len(ok), self.dim), np.float32)
        if ok.any():
            vectors[ok] = embed_batch(self.model, batch["crop"][ok], device=self.device, total=self.total)
        return {"path": batch["path"], "vector": vectors, "error": batch["error"]}


# --- here ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    actors: int
    gpus: int  # per actor
    threads: int | None  # the model's CPU threads per actor (CPU workers)
    runtime: str
    device: str


def _plan_workers(ray, options: RayOptions, runtime: str, device: str) -> _Plan:
    """How many model workers, with what: a GPU each (torch on CUDA) where the cluster has GPUs and the runtime
    may use them, else the CPU cores of a node each (one per node unless ``options.actors`` says)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]
    if device == "cuda" and not gpus:
        raise InputError("`device` cuda was asked for but the Ray cluster has no GPU")
    if gpus and device != "cpu" and runtime in ("auto", "torch"):
        return _Plan(options.actors or gpus, 1, None, "torch", "cuda")
    actors = options.actors or max(1, len(nodes))
    per_node = math.ceil(actors / max(1, len(nodes)))
    cores = min((int(n["Resources"]["CPU"]) for n in nodes), default=1)
    return _Plan(actors, 0, max(1, cores // per_node), runtime, "cpu")


def _last_line(e: BaseException) -> str:
    """The last line of an error's text (Ray's end with the worker's own error), without a reid error's type."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    last = text.splitlines()[-1] if text else type(e).__name__
    return re.sub(r"^reid\.errors\.\w+: ", "", last)


def _cause(e: BaseException) -> ReidError | None:
    """The library error behind a Ray task's failure, if that is what it was."""
    seen: set[int] = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, ReidError):
            return x
        stack += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return None


def ray_embedder(connect: Callable[[], object], options: RayOptions, runtime: str, device: str
                 ) -> Callable[[ModelRef], Callable[..., None]]:
    """``build_index``'s ``crop_embedder``: for the gallery's model, a stand-in for ``reid.embed.embed_paths``
    that runs the Ray pipeline and hands each embedded batch to ``on_batch`` in this process."""

    wanted = device

    def for_model(ref: ModelRef) -> Callable[..., None]:
        def embed(model, paths: Sequence[Path], *, batch_size: int = 32, workers=None, device=None,
                  on_batch: Callable[[list[Path], np.ndarray, list[tuple[Path, str]]], None]) -> None:
            from reid.embed import model_input_size

            del workers, device  # Ray decides how many decode; the model workers pick their own device
            run_pipeline(connect(), options, ref, runtime=runtime, device=wanted, paths=[str(p) for p in paths],
                         size=model_input_size(model), batch_size=batch_size, on_batch=on_batch)

        return embed

    return for_model


def run_pipeline(ray, options: RayOptions, ref: ModelRef, *, runtime: str, device: str, paths: list[str],
                 size: tuple[int, int], batch_size: int,
                 on_batch: Callable[[list[Path], np.ndarray, list[tuple[Path, str]]], None]) -> None:
    """Decode and embed ``paths`` on the cluster; ``on_batch(paths, vectors, failures)`` per batch, here."""
    from ray.data import ActorPoolStrategy

    plan = _plan_workers(ray, options, runtime, device)
    log.info("Ray: %d model workers (%s), %d crops", plan.actors,
             f"{plan.gpus} GPU each" if plan.gpus else f"CPU, {plan.threads} threads each", len(paths))
    blocks = max(1, math.ceil(len(paths) / batch_size))  # a block of paths per batch, not one per path
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
    # num_cpus 0.5: decoding is light, and differing resources keep Ray from fusing it into the model workers.
    ds = ds.map_batches(_decode, batch_size=batch_size, fn_kwargs={"size": tuple(size)}, num_cpus=0.5)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        # max_restarts 0: a worker that dies stops the run (what was stored is kept, the next run resumes)
        # rather than being restarted from constructor arguments Ray may have dropped.
        ds = ds.map_batches(_Embed, batch_size=batch_size, compute=ActorPoolStrategy(size=plan.actors),
                            num_cpus=1, num_gpus=plan.gpus,
                            fn_constructor_kwargs={"source": ref.source, "fingerprint": ref.fingerprint,
                                                   "runtime": plan.runtime, "device": plan.device,
                                                   "threads": plan.threads, "total": len(paths)},
                            max_restarts=0)
    batches = iter(ds.iter_batches(batch_size=batch_size, batch_format="numpy"))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001 - Ray's (and the workers') errors, whatever their type: one line
            cause = _cause(e)
            reason = str(cause) if cause is not None else _last_line(e)
            raise ReidError(f"the Ray pipeline stopped: {reason}; the batches stored before are kept, and the "
                            f"next run goes on from there") from e
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        failures = [(Path(p), str(e)) for p, e in zip(batch["path"], batch["error"], strict=True) if e]
        for _, reason in failures:
            log.warning("skipped %s", reason)
        on_batch([Path(p) for p in batch["path"][ok]], np.ascontiguousarray(batch["vector"][ok], np.float32), failures)


def index_on_ray(gallery: str | os.PathLike, index: str | os.PathLike, *, ray: RayOptions | None = None,
                 runtime: str = "auto", device: str = "auto", **kwargs) -> IndexReport:
    """``reid.index.build_index`` with the crop files decoded and embedded on Ray (``ray``: where and how);
    everything else, and every keyword, as there."""
    from reid.index import build_index

    options = ray or RayOptions()
    with cluster(options) as connect:
        return build_index(gallery, index, runtime=runtime, device=device,
                           crop_embedder=ray_embedder(connect, options, runtime, device), **kwargs)
