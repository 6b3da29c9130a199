"""Fresh boxes: a minimal Debian rootfs per test, reached as root over SSH on loopback.

What a bare cloud image or a slim container gives you: `mmdebstrap --variant=minbase
--include=python3,openssh-server,ca-certificates bookworm` — python3 3.11 and sshd, and no git,
tmux, rclone, uv, pip or ensurepip. The tarball (~230 MB, ~35 s to build) is cached under
`BOOTSTRAP_FRESHBOX_CACHE` (default `~/.cache/bootstrap-tests`) between tests and between runs,
one per package list, and extracted afresh for each box.

A box is sshd chrooted into its rootfs inside a private mount namespace (`unshare -m`, `/dev`
bound, `/proc` mounted), listening on 127.0.0.N as root; it shares this machine's network, so
this machine's CA bundle, resolver and pip.conf are copied in and apt, pip and uv reach the
package registries as they do here (`resolver=False` leaves the resolver out: no network). Its
processes run under the subreaper init of `tests/boxes.py`, which reaps the orphans a runner
leaves; on teardown every process whose `/proc/PID/root` is the rootfs is killed by pid, and the
mount namespace goes with the last of them.

Variants (`extra`): `vast_like()` turns a box into what a vast.ai image looks like (root,
`/workspace`, `/venv/main` first on PATH with its own `torchrun`, a `.bashrc` that starts tmux
unless `~/.no_auto_tmux` exists, uv at `/usr/local/bin/uv`, no python3-venv).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boxes
from boxes import make_key

SUITE = "bookworm"
BASE_PACKAGES = ("python3", "openssh-server", "ca-certificates")
SSHD_CONFIG = "/etc/ssh/freshbox_sshd_config"
#: Copied from this machine so TLS and names resolve inside as they do here.
HOST_FILES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf")
_numbers = itertools.count(1)


def cache_dir() -> Path:
    return Path(
        os.environ.get("BOOTSTRAP_FRESHBOX_CACHE") or "~/.cache/bootstrap-tests"
    ).expanduser()


def unavailable() -> str | None:
    """Why fresh boxes cannot run here (None when they can): they need root and mmdebstrap."""
    if os.geteuid() != 0:
        return "fresh boxes need root (chroot, mount namespaces)"
    if not shutil.which("mmdebstrap"):
        return "mmdebstrap is not installed (apt-get install mmdebstrap; .ci/run does)"
    return None


def rootfs_tarball(extra: tuple[str, ...] = ()) -> Path:
    """The cached minbase tarball with BASE_PACKAGES and `extra`; built on first use (a lock
    keeps parallel test processes from building it twice)."""
    packages = sorted({*BASE_PACKAGES, *extra})
    digest = hashlib.sha256(",".join(packages).encode()).hexdigest()[:12]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{SUITE}-minbase-{digest}.tar"
    with open(cache / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        tmp = path.with_name(f".{os.getpid()}.{path.name}")  # mmdebstrap goes by the suffix
        argv = [
            "mmdebstrap",
            "--variant=minbase",
            f"--include={','.join(packages)}",
            SUITE,
            str(tmp),
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
        os.replace(tmp, path)
    return path


@dataclass
class FreshBox:
    """One fresh rootfs served by its own sshd; root logs in with `key`."""

    name: str
    rootfs: Path
    host: str
    port: int
    key: Path
    log: Path
    _init: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def target(self) -> str:
        return f"root@{self.host}:{self.port}"

    def inventory_entry(self) -> dict[str, str | int]:
        """This box as a host entry of inventory.yaml."""
        return {"host": self.host, "port": self.port, "user": "root", "key": str(self.key)}

    def path(self, inside: str) -> Path:
        """A path inside the box, as seen from this machine."""
        return self.rootfs / inside.lstrip("/")

    def ssh(
        self, cmd: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` in the box as root over SSH (no pty, stdin closed)."""
        argv = [
            "ssh",
            *boxes.SSH_OPTIONS,
            "-i",
            str(self.key),
            "-p",
            str(self.port),
            f"root@{self.host}",
            cmd,
        ]
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{cmd!r} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def chroot(self, script: str) -> None:
        """Prepare the box from this machine: `sh -c script` chrooted, before sshd serves it."""
        subprocess.run(
            ["chroot", str(self.rootfs), "/bin/sh", "-c", script], check=True, capture_output=True
        )

    def processes(self) -> list[int]:
        """Every live process whose root directory is this box's rootfs, by pid."""
        mine = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/root") == str(self.rootfs):
                    mine.append(int(entry))
        return mine

    def stop_init(self) -> None:
        """EOF on the init's stdin: it kills what is left of its descendants and exits."""
        if self._init is None:
            return
        try:
            self._init.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self._init.kill()
            self._init.communicate()
        self._init = None

    def close(self) -> None:
        """Kill every process of the box by pid, stop its init, remove the rootfs."""
        deadline = time.monotonic() + 20
        while (pids := self.processes()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        self.stop_init()
        if self.processes():
            raise RuntimeError(f"{self.name}: processes survive SIGKILL: {self.processes()}")
        # The /dev bind mount lived only in the box's mount namespace, gone with its last
        # process: here the rootfs is plain files.
        shutil.rmtree(self.rootfs, ignore_errors=True)


def extract(workdir: Path, extra: tuple[str, ...] = (), *, resolver: bool = True) -> Path:
    """A fresh rootfs under `workdir` from the cached tarball, with this machine's CA bundle,
    pip.conf and (when `resolver`) resolv.conf copied in."""
    rootfs = workdir / "rootfs"
    rootfs.mkdir(parents=True)
    subprocess.run(["tar", "-xf", str(rootfs_tarball(extra)), "-C", str(rootfs)], check=True)
    files = [*HOST_FILES, *(["/etc/resolv.conf"] if resolver else [])]
    for name in files:
        if os.path.exists(name):
            dest = rootfs / name.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)  # resolv.conf may be a dangling symlink there
            shutil.copyfile(name, dest)
    if not resolver:
        (rootfs / "etc" / "resolv.conf").unlink(missing_ok=True)
    return rootfs


def serve(rootfs: Path, client_key: Path, name: str) -> FreshBox:
    """Start sshd in `rootfs` (root's key: `client_key`); returns once it listens."""
    n = next(_numbers)
    host = f"127.0.{200 + os.getpid() % 50}.{1 + n % 250}"  # away from tests/boxes.py's 127.0.0.N
    ssh_dir = rootfs / "root" / ".ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copyfile(f"{client_key}.pub", ssh_dir / "authorized_keys")
    (ssh_dir / "authorized_keys").chmod(0o600)
    host_key = rootfs / "etc" / "ssh" / "ssh_host_ed25519_key"
    for old in rootfs.glob("etc/ssh/ssh_host_*"):
        old.unlink()
    make_key(host_key, f"host-{name}")
    box = FreshBox(name, rootfs, host, 0, client_key, rootfs.parent / "sshd.log")
    for attempt in range(3):
        box.port = boxes._free_port(host)
        (rootfs / SSHD_CONFIG.lstrip("/")).write_text(
            f"ListenAddress {host}:{box.port}\n"
            "HostKey /etc/ssh/ssh_host_ed25519_key\n"
            "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nAuthorizedKeysFile .ssh/authorized_keys\n"
            "Subsystem sftp internal-sftp\nMaxStartups 200\nMaxSessions 200\n"
        )
        script = (
            f"mount --rbind /dev {rootfs}/dev && mount -t proc proc {rootfs}/proc"
            f" && mkdir -p -m 755 {rootfs}/run/sshd"
            f" && exec chroot {rootfs} /usr/sbin/sshd -D -e -f {SSHD_CONFIG}"
        )
        argv = ["/usr/bin/unshare", "-m", "--propagation", "private", "/bin/sh", "-c", script]
        offset = box.log.stat().st_size if box.log.exists() else 0
        with box.log.open("ab") as log:
            box._init = subprocess.Popen(
                [sys.executable, boxes.__file__, *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        assert box._init.stdin and box._init.stdout
        box._init.stdin.write(b"start\n")
        box._init.stdin.flush()
        pid = int(box._init.stdout.readline())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = box.log.read_bytes()[offset:].decode(errors="replace")
            if "Server listening on" in text:
                return box
            if not boxes._alive(pid):
                break
            time.sleep(0.01)
        box.stop_init()
        if "Address already in use" not in text or attempt == 2:
            raise RuntimeError(f"sshd in {rootfs} did not start:\n{text}")
    raise AssertionError("unreachable")


@contextlib.contextmanager
def fresh_box(
    workdir: Path,
    client_key: Path,
    name: str = "fresh",
    *,
    extra: tuple[str, ...] = (),
    resolver: bool = True,
) -> Iterator[FreshBox]:
    """A bare box for the duration of the block."""
    rootfs = extract(workdir, extra, resolver=resolver)
    box = None
    try:
        box = serve(rootfs, client_key, name)
        yield box
    finally:
        if box is not None:
            box.close()
        else:
            shutil.rmtree(rootfs, ignore_errors=True)


VAST_BASHRC = """\
# what a vast.ai image's ~/.bashrc does: its python first, tmux on every SSH login
export PATH=/venv/main/bin:$PATH
if [ -z "$TMUX" ] && [ -n "$SSH_CONNECTION" ] && [ ! -e ~/.no_auto_tmux ]; then
  tmux attach-session -t ssh_tmux 2>/dev/null || tmux new-session -s ssh_tmux
fi
"""

TORCHRUN = """\
#!/venv/main/bin/python
# stands in for the image's torch launcher: a second python's own console script
import sys
print("torchrun (vast.ai image stand-in)", sys.argv[1:])
"""


def vast_like(box_rootfs: Path, uv_binary: str) -> None:
    """Make an extracted rootfs (with tmux) look like a vast.ai box, before it is served."""
    shutil.copyfile(uv_binary, box_rootfs / "usr/local/bin/uv")
    (box_rootfs / "usr/local/bin/uv").chmod(0o755)
    (box_rootfs / "workspace").mkdir()
    subprocess.run(
        [
            "chroot",
            str(box_rootfs),
            "/usr/local/bin/uv",
            "venv",
            "-q",
            "--python",
            "/usr/bin/python3",
            "/venv/main",
        ],
        check=True,
        capture_output=True,
        env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "UV_PYTHON_DOWNLOADS": "never",
            "HOME": "/root",
        },
    )
    torchrun = box_rootfs / "venv/main/bin/torchrun"
    torchrun.write_text(TORCHRUN)
    torchrun.chmod(0o755)
    bashrc = box_rootfs / "root/.bashrc"
    bashrc.write_text(VAST_BASHRC + (bashrc.read_text() if bashrc.exists() else ""))
