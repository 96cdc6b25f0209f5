"""``vdisk serve``: build nbdkit's command line for our plugin and run it until SIGTERM/SIGINT.

nbdkit runs as our child in the foreground; we forward the stop signals, wait for it (it finishes requests
in flight and calls the plugin's cleanup, which flushes and closes the chain), then remove the socket.

Start-up order.  nbdkit creates its unix socket with mode 0755 whatever our umask, and writes its pid file
as soon as it listens.  So nbdkit binds the socket in a private 0700 directory beside the requested path and
writes its pid file there; once that pid file appears we chmod the socket to ``socket_mode`` and rename it
into place (a bound socket keeps working under its new name), and only then write the user's
``--pid-file`` (our own pid: signals sent to us are forwarded, and we remove the socket afterwards).  So
no other user can ever connect, and the pid file means "clients can connect now".

Stopping.  nbdkit 1.32 alone would wait on SIGTERM until every client disconnects.  nbdkit inherits the read
end of a pipe (plugin key ``stop-fd``); on SIGTERM/SIGINT/SIGHUP we close its write end (and forward the
signal), and the plugin then ends idle connections too (``vdisk.serving.nbdkit_plugin.stop_serving``).  If we die,
the pipe closes all the same.

Limits (what protects the server from its clients; tests/test_limits.py pins each one).  ``max_connections``
(default 64) puts nbdkit's limit filter in front of the plugin: it counts connections that completed the
handshake and refuses the next one (nbdkit closes it: "limit: too many clients").  nbdkit itself (1.32,
server/protocol.c and protocol-handshake-newstyle.c) refuses a READ or WRITE over 64 MiB with ENOMEM (it reads
and drops the payload of a refused write up to 128 MiB, closes the connection beyond), option data over 64
MiB, more than 32 options in one handshake, names over 4096 bytes.  A connection has one request in flight
when requests are serialized (the default: nbdkit --threads 1), at most ``threads`` (default 16) with
``serialize=False``, each buffer at most 64 MiB: meanwhile nbdkit does not read the socket, so a client that
pipelines more meets socket back-pressure, never unbounded buffering.  nbdkit has no handshake timeout (1.32 or
later): a client that stalls in the handshake holds a thread and a socket, but no connection slot and no image,
and it blocks nobody, because nbdkit runs its parallel model even when requests are serialized (nbdkit's
serialized model would hold its global request lock across that handshake: see ``vdisk.serving.nbdkit_plugin``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vdisk
from vdisk.block import chain
from vdisk.errors import GenericError
from vdisk.formats.qcow2.cache import CacheOptions
from vdisk.serving.config import PluginConfig, plugin_arguments

PLUGIN = Path(__file__).with_name("nbdkit_plugin.py")


@dataclasses.dataclass
class ServeOptions:
    image: str
    socket: str | None = None
    bind: str | None = None
    port: int = 10809
    export_name: str = ""
    description: str | None = None
    read_only: bool = False
    copy_on_read: bool = False
    device: str = "drive0"
    qmp: str | None = None
    pid_file: str | None = None
    format: str | None = None
    serialize: bool = True
    socket_mode: int = 0o600
    max_connections: int = 64  # nbdkit's limit filter (see limits); 0 = no limit
    tls: str = "off"  # off | on | require: nbdkit's own TLS (GnuTLS)
    # x509 directory as QEMU's tls-creds-x509: ca-cert.pem, server-cert.pem, server-key.pem
    tls_creds: str | None = None
    tls_psk: str | None = None  # PSK file, "username:hexkey" lines (QEMU's keys.psk)
    allow_backing_dirs: tuple[str, ...] = ()  # backing files must lie below one of these (empty: anywhere)
    threads: int | None = None  # nbdkit --threads: requests in flight per connection, parallel model only
    cache: CacheOptions = CacheOptions()  # QEMU's qcow2 cache options, for every qcow2 node of the chain

    def plugin_config(self, stop_fd: int | None = None) -> PluginConfig:
        """What the plugin is told; the other options are nbdkit's own (or, like ``read_only``, both's)."""
        return PluginConfig(image=self.image, format=self.format, device=self.device, read_only=self.read_only,
                            copy_on_read=self.copy_on_read, qmp=self.qmp, description=self.description,
                            allow_backing_dirs=self.allow_backing_dirs, serialize=self.serialize, cache=self.cache,
                            stop_fd=stop_fd)


def python_path() -> str:
    """What nbdkit's embedded interpreter needs on sys.path to import vdisk and the venv's packages."""
    entries = [str(Path(vdisk.__file__).resolve().parent.parent)]
    entries += [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    return os.pathsep.join(dict.fromkeys(entries))


def nbdkit_command(opts: ServeOptions, *, socket: str | None = None, pid_file: str | None = None,
                   stop_fd: int | None = None) -> list[str]:
    """nbdkit's argv; ``socket``/``pid_file`` override where nbdkit itself binds and writes (see start-up order),
    ``stop_fd`` is the pipe whose closing stops the plugin (see stopping)."""
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise GenericError("nbdkit is not installed (Debian: apt-get install nbdkit nbdkit-plugin-python)")
    cmd = [nbdkit, "--foreground", "--exit-with-parent", "--log=stderr"]
    if opts.max_connections:
        cmd.append("--filter=limit")
    threads = opts.threads or (1 if opts.serialize else None)  # serialized: one request in flight per connection
    if threads:
        cmd += ["--threads", str(threads)]
    if opts.socket:
        cmd += ["--unix", socket or opts.socket]
    else:
        cmd += ["--ipaddr", opts.bind or "127.0.0.1", "--port", str(opts.port)]
    cmd += ["--exportname", opts.export_name]
    if opts.read_only:
        cmd.append("--readonly")
    if opts.tls_creds or opts.tls_psk:
        cmd.append(f"--tls={'require' if opts.tls == 'off' else opts.tls}")
        if opts.tls_creds:
            cmd.append(f"--tls-certificates={opts.tls_creds}")
        if opts.tls_psk:
            cmd.append(f"--tls-psk={opts.tls_psk}")
    elif opts.tls != "off":
        raise GenericError(f"--tls={opts.tls} needs --tls-creds DIR or --tls-psk FILE")
    if pid_file or opts.pid_file:
        cmd += ["--pidfile", pid_file or opts.pid_file]
    cmd += ["python", str(PLUGIN), *plugin_arguments(opts.plugin_config(stop_fd))]
    if opts.max_connections:
        cmd.append(f"limit={opts.max_connections}")  # the limit filter's key, not the plugin's
    return cmd


def nbdkit_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = python_path() + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _private_dir(opts: ServeOptions) -> str:
    """A 0700 directory beside the socket (same file system, so the socket can be renamed into place)."""
    parent = os.path.dirname(os.path.abspath(opts.socket)) if opts.socket else None
    return tempfile.mkdtemp(prefix=".vd", dir=parent)


def _wait_ready(proc: subprocess.Popen, pid_file: str) -> bool:
    """Wait until nbdkit has written its pid file (it listens); False if it exited first."""
    while not os.path.exists(pid_file) or os.path.getsize(pid_file) == 0:
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return True


def _publish(opts: ServeOptions, private_socket: str | None) -> None:
    """Make the listening server visible: socket mode, socket name, then the user's pid file."""
    if opts.socket and private_socket:
        os.chmod(private_socket, opts.socket_mode)
        os.replace(private_socket, opts.socket)
    if opts.pid_file:
        tmp = f"{opts.pid_file}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, opts.pid_file)


def serve(opts: ServeOptions) -> int:
    """Run the server in the foreground; returns nbdkit's exit status."""
    # Fail fast, with our one-line error, on an image that cannot be served (also repairs a dirty image).
    chain.open_chain(opts.image, opts.format, read_only=opts.read_only, cache=opts.cache,
                     allowed_dirs=[os.path.abspath(d) for d in opts.allow_backing_dirs] or None).close()
    for path in (opts.socket, opts.qmp, opts.pid_file):
        if path and os.path.exists(path):
            os.unlink(path)
    private = _private_dir(opts)
    private_socket = os.path.join(private, "s") if opts.socket else None
    private_pid = os.path.join(private, "pid")
    stop_read, stop_write = os.pipe()
    old_umask = os.umask(0o777 & ~opts.socket_mode)  # the sockets nbdkit and the monitor create
    try:
        cmd = nbdkit_command(opts, socket=private_socket, pid_file=private_pid, stop_fd=stop_read)
        proc = subprocess.Popen(cmd, env=nbdkit_env(), pass_fds=(stop_read,))
    finally:
        os.umask(old_umask)
        os.close(stop_read)

    def forward(signum, _frame):
        nonlocal stop_write
        if stop_write >= 0:  # the plugin stops nbdkit, and ends idle client connections (see stopping)
            os.close(stop_write)
            stop_write = -1
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        if _wait_ready(proc, private_pid):
            _publish(opts, private_socket)
        while True:
            try:
                status = proc.wait()
                break
            except InterruptedError:
                continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for path in (opts.socket, opts.qmp, opts.pid_file):
            if path and os.path.exists(path):
                os.unlink(path)
        shutil.rmtree(private, ignore_errors=True)
        if stop_write >= 0:
            os.close(stop_write)
    return status if status >= 0 else 128 - status
