"""A real PostgreSQL server for tests: `initdb` and `pg_ctl` in a temp dir, on 127.0.0.1 and a free port.

The binaries are Debian's postgresql-15 (`.ci/run` installs it where `initdb` is missing). initdb
refuses to run as root, so when the tests run as root the server runs as the `postgres` user (or
`nobody`) and its directory lives under /tmp, outside pytest's root-only temp folders. Clients
authenticate with a password (scram-sha-256) given through PGPASSWORD, never in a URI. Stopped with
`pg_ctl stop -m fast` on its own data directory, so only this server stops.
"""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile

USER = "transmute"
PASSWORD = "pg-Tr4nsmute-test-5b7e"  # a test-only secret


def pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if not found:
        raise RuntimeError(f"no `{name}`: install PostgreSQL (apt-get install postgresql; .ci/run does it)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_user() -> pwd.struct_passwd | None:
    """The unprivileged user the server runs as when we are root (None: run as ourselves)."""
    if os.getuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and no `postgres` or `nobody` user to run PostgreSQL as")


class Postgres:
    """`start()` / `stop()`; `url(db)` (no password: clients get PGPASSWORD from `env()`)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host, self.port = host, free_port()
        self.user = server_user()
        self.dir = tempfile.mkdtemp(prefix="pg-")  # /tmp: reachable by the unprivileged server user
        self.data = os.path.join(self.dir, "data")
        self.log_path = os.path.join(self.dir, "server.log")

    def _run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        user = self.user

        def drop():  # in the child only: become the server user
            if user:
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)

        env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "HOME": self.dir}
        return subprocess.run(args, preexec_fn=drop, env=env, capture_output=True, text=True, check=True,
                              timeout=120, **kwargs)

    def start(self) -> "Postgres":
        pwfile = os.path.join(self.dir, "pw")
        with open(pwfile, "w") as f:
            f.write(PASSWORD)
        if self.user:
            os.chmod(self.dir, 0o755)
            for path in (self.dir, pwfile):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self._run([pg_bin("initdb"), "-D", self.data, "-U", USER, f"--pwfile={pwfile}", "-E", "UTF8",
                   "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "--no-sync"])
        options = f"-p {self.port} -c listen_addresses={self.host} -k {self.dir} -c fsync=off"
        self._run([pg_bin("pg_ctl"), "-D", self.data, "-o", options, "-l", self.log_path, "-w", "-t", "60",
                   "start"])
        return self

    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": PASSWORD}

    def create_database(self, name: str) -> str:
        subprocess.run([pg_bin("psql"), "-h", self.host, "-p", str(self.port), "-U", USER, "-d", "postgres",
                        "-v", "ON_ERROR_STOP=1", "-c", f"CREATE DATABASE {name}"],
                       env={**os.environ, **self.env()}, check=True, capture_output=True, timeout=60)
        return self.url(name)

    def url(self, db: str) -> str:
        return f"postgresql+psycopg2://{USER}@{self.host}:{self.port}/{db}"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            self._run([pg_bin("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop"])
        shutil.rmtree(self.dir, ignore_errors=True)
