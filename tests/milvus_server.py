"""A real Milvus standalone server for tests: loopback only, free ports, stopped by process group.

``MilvusServer(folder).start()`` runs ``milvus-server`` (from the ``milvus`` package, Milvus 2.3.5) with
its data and logs in ``folder``, every component bound to 127.0.0.1 and every port picked free; ``stop``
kills its process group (SIGTERM, then SIGKILL): its graceful stop can hang for over a minute.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"
USER, PASSWORD = "root", "Milvus"  # Milvus's built-in administrator
# The command-line port options of milvus-server (all of its ports but the metrics port, which the
# wrapper picks itself: the first free one from 9091).
PORT_OPTIONS = ("etcd-port", "proxy-port", "proxy-internal-port", "root-coord-port", "query-coord-port",
                "query-node-port", "index-coord-port", "index-node-port", "data-coord-port", "data-node-port")
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord", "indexNode", "dataCoord", "dataNode")
# Faster time ticks: a strongly consistent read waits for the next tick (200 ms by default).
# Quicker load checks: loading a collection waits for queryCoord's check loop (1 s by default).
# Settings the template lacks go in as environment variables (Milvus reads KEY.SUB as KEYSUB, any case):
# quicker queryCoord checks make loading a new collection take well under its default ~2 s.
ENV = {"QUERYCOORD_CHECKCHANNELINTERVAL": "100", "QUERYCOORD_CHECKSEGMENTINTERVAL": "100",
       "QUERYCOORD_UPDATENEXTTARGETINTERVAL": "1", "QUERYCOORD_LEADERVIEWUPDATEINTERVAL": "1",
       "QUERYCOORD_CHECKNODEINREPLICAINTERVAL": "1"}
# Authentication on, so wrong credentials can be tested (the default user is root / Milvus).
EXTRA = {"common.security.authorizationEnabled": "true", "proxy.timeTickInterval": 20, "common.gracefulTime": 100,
         "log.level": "warn", "queryCoord.checkInterval": 100, "queryCoord.distPullInterval": 100}


def available() -> str | None:
    """None when a server can be started here, else why not."""
    try:
        import milvus  # noqa: F401
    except ImportError:
        return "the milvus package (Milvus standalone server) is not installed; pip install '.[dev]'"
    if not (Path(sys.executable).parent / "milvus-server").exists():
        return "milvus-server is not installed beside the Python interpreter"
    return None


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class MilvusServer:
    """One milvus-server process group, data in ``folder``."""

    def __init__(self, folder: str | os.PathLike, extra: dict | None = None,
                 ca: str | os.PathLike | None = None) -> None:
        """``extra``: more ``--extra-config`` settings (over EXTRA); ``ca``: the CA file the readiness check
        verifies the server's certificate with, for a one-way TLS server (``common.security.tlsMode: 1``)."""
        self.folder = Path(folder)
        self.extra = {**EXTRA, **(extra or {})}
        self.ca = ca
        ports = free_ports(len(PORT_OPTIONS) + 2)
        self.ports = dict(zip(PORT_OPTIONS, ports, strict=False))
        # The embedded etcd ignores --etcd-port (it listens on localhost:2379/2380); its own config file,
        # named by ETCD_CONFIG_PATH, moves it to free loopback ports.
        self.etcd_client, self.etcd_peer = ports[len(PORT_OPTIONS)], ports[len(PORT_OPTIONS) + 1]
        self.proc: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        """The proxy's (client) port."""
        return self.ports["proxy-port"]

    def command(self) -> list[str]:
        cmd = [str(Path(sys.executable).parent / "milvus-server"), "--data", str(self.folder)]
        for option, port in self.ports.items():
            cmd += [f"--{option}", str(port)]
        extra = {f"{c}.ip": HOST for c in COMPONENTS} | self.extra
        for key, value in extra.items():
            cmd += ["--extra-config", f"{key}={value}"]
        return cmd

    def start(self, timeout: float = 120.0) -> MilvusServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        etcd = self.folder / "embed-etcd.yaml"
        client, peer = f"http://{HOST}:{self.etcd_client}", f"http://{HOST}:{self.etcd_peer}"
        etcd.write_text(f"listen-client-urls: {client}\nadvertise-client-urls: {client}\n"
                        f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
                        f"initial-cluster: default={peer}\n")
        env = {**os.environ, "ETCD_CONFIG_PATH": str(etcd), "ETCD_ENDPOINTS": f"{HOST}:{self.etcd_client}", **ENV}
        log = open(self.folder / "server.log", "wb")  # noqa: SIM115 - the child keeps writing to it
        try:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        from pymilvus import MilvusClient

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milvus-server exited with {self.proc.returncode}; see {self.folder}/server.log "
                                   f"and {self.folder}/logs")
            try:
                tls = {"secure": True, "server_pem_path": str(self.ca)} if self.ca else {}
                client = MilvusClient(uri=f"{'https' if self.ca else 'http'}://{HOST}:{self.port}", user=USER,
                                      password=PASSWORD, timeout=5, **tls)
                try:
                    client.list_collections()
                    return
                finally:
                    client.close()
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
                time.sleep(0.5)
        raise TimeoutError(f"milvus-server did not answer on {HOST}:{self.port} within {timeout:g} s: {last}")

    def stop(self, grace: float = 3.0) -> None:
        """Kill the server's process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        # The wrapper may have gone while milvus itself (its child, same group) still runs.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def __enter__(self) -> MilvusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_shared: MilvusServer | None = None
_own_folder: Path | None = None  # a temp folder shared() made, removed by stop_shared()
_saved_env: dict[str, str | None] = {}
_names = iter(range(1, 10**9))


def shared(base: str | os.PathLike | None = None) -> MilvusServer:
    """The one server of this test session, started on first use (in ``base``, else a new temp folder); the
    credentials go to REID_MILVUS_USER / REID_MILVUS_PASSWORD (subprocesses inherit them) until ``stop_shared``."""
    global _shared, _own_folder
    if _shared is None:
        import tempfile

        if base is None:
            base = _own_folder = Path(tempfile.mkdtemp(prefix="reid-milvus-"))
        folder = Path(base)
        _shared = MilvusServer(folder).start()
        for key, value in (("REID_MILVUS_USER", USER), ("REID_MILVUS_PASSWORD", PASSWORD)):
            _saved_env[key] = os.environ.get(key)
            os.environ[key] = value
    return _shared


def stop_shared() -> None:
    """Stop the session's server, if one was started, and restore the environment."""
    global _shared, _own_folder
    if _shared is not None:
        _shared.stop()
        _shared = None
        if _own_folder is not None:
            import shutil

            shutil.rmtree(_own_folder, ignore_errors=True)
            _own_folder = None
        for key, value in _saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _saved_env.clear()


def collection_name(hint: str = "") -> str:
    """A collection name not used before in this session (letters, digits, underscores)."""
    clean = re.sub(r"[^A-Za-z0-9_]", "_", hint)[-40:]
    return f"t{next(_names)}_{clean}"


def location(hint: str = "") -> str:
    """``milvus://127.0.0.1:PORT/NEW_COLLECTION`` on the session's server."""
    return f"milvus://{HOST}:{shared().port}/{collection_name(hint)}"
