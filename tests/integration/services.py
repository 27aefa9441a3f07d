"""Real servers on 127.0.0.1 for the integration tests, each in its own temp folder with fresh random credentials:
PostgreSQL 15, a one-node Ceph cluster whose RADOS Gateway is the S3 server, and the MLflow tracking server
(PostgreSQL backend store, artifacts on the RGW bucket).

The binaries come from Debian packages (`make services`). Run by hand to get all three for a shell:
    python tests/integration/services.py up      # prints the DISTILLERY_* / AWS_* exports, Ctrl-C stops all
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
REPO = Path(__file__).resolve().parents[2]
INSTALL_HINT = "run `make services` (bash scripts/services/install.sh, as root) first"


class ServiceError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need(*binaries: str) -> None:
    missing = [b for b in binaries if not (shutil.which(b) or Path(b).is_file())]
    if missing:
        raise ServiceError(f"missing server binaries {missing}: {INSTALL_HINT}")


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    if p.returncode != 0:
        raise ServiceError(f"{what} failed (exit {p.returncode}): {' '.join(cmd)}\n{(p.stdout + p.stderr)[-3000:]}")
    return p


def _wait(check, what: str, timeout: float = 60.0, log: Path | None = None, proc=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{what} exited with code {proc.returncode} while starting\n{_tail(log) if log else ''}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.25)
    raise ServiceError(f"{what} did not come up in {timeout:.0f} s\n{_tail(log) if log else ''}")


def _stop_pids(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM processes this module started (daemons, not our children), SIGKILL what lingers after `grace`."""
    alive = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            alive.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while alive and time.time() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if _alive(pid)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        # A daemon that exited stays a zombie until init reaps it; that counts as stopped.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_children(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    for p in procs:
        p.terminate()
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


# --- PostgreSQL ---------------------------------------------------------------------------------------------------

@dataclass
class Postgres:
    root: Path
    port: int
    password: str  # of the superuser `postgres`; databases get roles of their own
    host: str = "127.0.0.1"

    def connect(self, db: str = "postgres", user: str = "postgres", password: str | None = None):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=user, password=password or self.password,
                                dbname=db, connect_timeout=5)

    def create_database(self, name: str, driver: str = "postgresql+psycopg2") -> str:
        """A database owned by a new role of the same name with a fresh random password; returns its URL."""
        if not name.isidentifier() or name.lower() != name:
            raise ValueError(f"database name must be a lower-case identifier, got {name!r}")
        password = secrets.token_hex(16)
        conn = self.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE ROLE {name} LOGIN PASSWORD %s", (password,))
            cur.execute(f"CREATE DATABASE {name} OWNER {name}")
        conn.close()
        return f"{driver}://{name}:{password}@{self.host}:{self.port}/{name}"

    def pg_ctl(self, action: str) -> None:
        """`pg_ctl start|stop` on this cluster's data folder, keeping the data (a restart, not a teardown)."""
        cmd = ["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.root / "data"), "-w",
               "-t", "60"]
        if action == "start":
            # Unix socket in our own folder, not /var/run/postgresql: several clusters may run side by side.
            _run([*cmd, "-l", str(self.root / "log"), "-o",
                  f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off", "start"],
                 f"PostgreSQL start (log {self.root / 'log'})")
            _wait(lambda: self.connect().close() is None, "PostgreSQL", log=self.root / "log")
        elif action == "stop":  # fast: open connections are terminated, as when a pod is deleted
            _run([*cmd, "-m", "fast", "stop"], "PostgreSQL stop")
        else:
            raise ValueError(f"action must be start or stop, got {action!r}")

    def restart(self, down_s: float = 0.0) -> None:
        """Stop (clients lose their connections), stay down `down_s` seconds, start again on the same port."""
        self.pg_ctl("stop")
        time.sleep(down_s)
        self.pg_ctl("start")

    def stop(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.root / "data"),
                        "-m", "fast", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> Postgres:
    """initdb + pg_ctl start as the `postgres` user (initdb refuses root), TCP on 127.0.0.1 only, scram passwords."""
    _need(str(PG_BIN / "initdb"), str(PG_BIN / "pg_ctl"), "runuser")
    root = Path(tempfile.mkdtemp(prefix="distillery-pg-"))
    root.chmod(0o700)
    shutil.chown(root, "postgres", "postgres")
    password = secrets.token_hex(16)
    pwfile = root / "pw"
    pwfile.write_text(password)
    shutil.chown(pwfile, "postgres", "postgres")
    port = free_port()
    as_pg = ["runuser", "-u", "postgres", "--"]
    pg = Postgres(root, port, password)
    try:
        _run([*as_pg, str(PG_BIN / "initdb"), "-D", str(root / "data"), "-U", "postgres", "-A", "scram-sha-256",
              f"--pwfile={pwfile}"], "initdb")
        pwfile.unlink()
        pg.pg_ctl("start")
    except BaseException:
        pg.stop()
        raise
    return pg


# --- Ceph RGW (S3) -----------------------------------------------------------------------------------------------

CEPH_CONF = """[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon2},v1:127.0.0.1:{mon1}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
auth allow insecure global id reclaim = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 1
osd crush chooseleaf type = 0
osd objectstore = memstore
# The whole suite writes over 1 GiB; a full OSD makes every write wait (RGW then answers nothing). Memory is taken
# only as objects are written.
memstore device bytes = 8589934592
run dir = {d}/run
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
admin socket = {d}/run/$name.asok
mon data = {d}/mon/$cluster-$id
osd data = {d}/osd/$cluster-$id
keyring = {d}/keyring
"""


@dataclass
class CephRGW:
    root: Path
    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    procs: list = field(default_factory=list)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}))

    def keys(self, prefix: str = "") -> list[str]:
        out = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def stop_gateway(self) -> None:
        """Kill radosgw (the S3 endpoint goes away; mon and the memstore OSD keep the objects)."""
        for p in self.procs:
            p.kill()
            p.wait(10)
        self.procs.clear()

    def start_gateway(self) -> None:
        """radosgw again on the same endpoint, waited for until it answers."""
        if self.procs:
            raise ServiceError("the gateway is already running")
        port = self.endpoint_url.rsplit(":", 1)[1]
        with open(self.root / "log" / "rgw.out", "ab") as out:
            self.procs.append(subprocess.Popen(
                ["radosgw", "-c", str(self.root / "ceph.conf"), "-n", "client.rgw", "-f", "--rgw-frontends",
                 f"beast endpoint=127.0.0.1:{port}", "--rgw-data", str(self.root / "rgw")],
                stdout=out, stderr=subprocess.STDOUT))
        _wait(lambda: urllib.request.urlopen(self.endpoint_url, timeout=2).status == 200, "Ceph RGW", timeout=90,
              log=self.root / "log" / "client.rgw.log", proc=self.procs[0])

    def stop(self) -> None:
        # The cluster's data is thrown away, so a short grace is enough (radosgw alone lingers ~15 s on SIGTERM).
        _stop_children(self.procs, grace=3.0)
        # mon and osd daemonize; their pid files name exactly the processes this cluster started.
        pids = []
        for pidfile in sorted((self.root / "run").glob("*.pid")):
            try:
                pids.append(int(pidfile.read_text().strip()))
            except (OSError, ValueError):
                pass
        _stop_pids(pids, grace=3.0)
        shutil.rmtree(self.root, ignore_errors=True)


def start_ceph_rgw(bucket: str = "distillery") -> CephRGW:
    """mon + memstore OSD + radosgw (beast on 127.0.0.1:PORT), an S3 user with random keys, and `bucket`."""
    _need("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph-authtool", "monmaptool", "ceph")
    d = Path(tempfile.mkdtemp(prefix="distillery-ceph-"))
    for sub in ("run", "log", "mon", "osd/ceph-0", "rgw"):
        (d / sub).mkdir(parents=True)
    fsid, mon1, mon2, rgw_port = str(uuid.uuid4()), free_port(), free_port(), free_port()
    conf = d / "ceph.conf"
    conf.write_text(CEPH_CONF.format(fsid=fsid, mon1=mon1, mon2=mon2, d=d))
    c = ["-c", str(conf)]
    access, secret = secrets.token_hex(10).upper(), secrets.token_hex(20)
    svc = CephRGW(d, f"http://127.0.0.1:{rgw_port}", access, secret, bucket)
    try:
        keyring = str(d / "keyring")
        _run(["ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"],
             "ceph-authtool")
        for name, caps in (("client.admin", ["mon", "allow *", "osd", "allow *", "mgr", "allow *"]),
                           ("osd.0", ["mon", "allow profile osd", "osd", "allow *"]),
                           ("client.rgw", ["mon", "allow rw", "osd", "allow rwx"])):
            caps_args = [x for i in range(0, len(caps), 2) for x in ("--cap", caps[i], caps[i + 1])]
            _run(["ceph-authtool", keyring, "--gen-key", "-n", name, *caps_args], "ceph-authtool")
        _run(["monmaptool", "--create", "--addv", "a", f"[v2:127.0.0.1:{mon2},v1:127.0.0.1:{mon1}]", "--fsid", fsid,
              str(d / "monmap")], "monmaptool")
        _run(["ceph-mon", *c, "--mkfs", "-i", "a", "--monmap", str(d / "monmap"), "--keyring", keyring], "ceph-mon mkfs")
        _run(["ceph-mon", *c, "-i", "a"], "ceph-mon start")
        osd_id = _run(["ceph", *c, "--connect-timeout", "30", "osd", "create"], "ceph osd create").stdout.strip()
        _run(["ceph-osd", *c, "-i", osd_id, "--mkfs"], "ceph-osd mkfs")
        _run(["ceph-osd", *c, "-i", osd_id], "ceph-osd start")
        svc.start_gateway()
        _run(["radosgw-admin", *c, "-n", "client.admin", "user", "create", "--uid=distillery",
              "--display-name=distillery", f"--access-key={access}", f"--secret-key={secret}"], "radosgw-admin user create")
        svc.client().create_bucket(Bucket=bucket)
    except BaseException:
        svc.stop()
        raise
    return svc


# --- MLflow tracking server --------------------------------------------------------------------------------------

@dataclass
class MlflowServer:
    url: str
    proc: subprocess.Popen
    log: Path
    env: dict = field(default_factory=dict, repr=False)  # holds credentials: never printed

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the server, stay down `down_s` seconds, start it again on the same port and backend."""
        self.stop()
        time.sleep(down_s)
        fresh = _launch_mlflow(self.env)
        self.proc, self.log = fresh.proc, fresh.log

    def stop(self) -> None:
        # `mlflow server` runs uvicorn as a child: stop the whole process group it leads.
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.log.unlink(missing_ok=True)


def start_mlflow(backend_uri: str, artifacts_destination: str, s3: CephRGW,
                 extra_env: dict[str, str] | None = None) -> MlflowServer:
    """mlflow/start-server.sh (artifact proxying on) with the backend and the S3 credentials in its environment."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    _need(str(mlflow_bin))
    env = {**os.environ, "BACKEND_STORE_URI": backend_uri, "ARTIFACTS_DESTINATION": artifacts_destination,
           "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(free_port()), "MLFLOW_WORKERS": "1",
           "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url, "AWS_ACCESS_KEY_ID": s3.access_key,
           "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
           "PATH": f"{mlflow_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}", **(extra_env or {})}
    return _launch_mlflow(env)


def _launch_mlflow(env: dict[str, str]) -> MlflowServer:
    fd, log_name = tempfile.mkstemp(prefix="distillery-mlflow-", suffix=".log")
    log = Path(log_name)
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen(["bash", str(REPO / "mlflow" / "start-server.sh")], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{env['MLFLOW_PORT']}"
    server = MlflowServer(url, proc, log, env)
    try:
        # The first start creates the schema in PostgreSQL (alembic migrations): allow time on a busy machine.
        _wait(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, "MLflow server",
              timeout=180, log=log, proc=proc)
    except BaseException:
        server.stop()
        raise
    return server


def main(argv: list[str]) -> int:
    if argv[1:] != ["up"]:
        print(f"usage: {argv[0]} up   (start PostgreSQL, Ceph RGW and MLflow on 127.0.0.1 until Ctrl-C)",
              file=sys.stderr)
        return 2
    started = []
    try:
        pg = start_postgres()
        started.append(pg)
        s3 = start_ceph_rgw()
        started.append(s3)
        server = start_mlflow(pg.create_database("mlflow"), f"s3://{s3.bucket}/mlflow", s3)
        started.append(server)
        optuna_url = pg.create_database("optuna")
        print(f"export DISTILLERY_TRACKING_URI={server.url}\n"
              f"export DISTILLERY_ARTIFACT_LOCATION=s3://{s3.bucket}/artifacts\n"
              f"export DISTILLERY_S3_ENDPOINT_URL={s3.endpoint_url}\n"
              f"export DISTILLERY_OPTUNA_STORAGE='{optuna_url}'\n"
              f"export AWS_ACCESS_KEY_ID={s3.access_key}\nexport AWS_SECRET_ACCESS_KEY={s3.secret_key}\n"
              "# servers up; Ctrl-C stops them and deletes their data", flush=True)
        # SIGINT too: a shell ignores it for background jobs, and Python then keeps ignoring it.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: sys.exit(0))
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        for svc in reversed(started):
            svc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
