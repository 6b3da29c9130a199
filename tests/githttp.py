"""Test helpers: git repositories, and `git http-backend` behind Basic auth on loopback."""

from __future__ import annotations

import base64
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

GIT_ID = ["-c", "user.name=Test", "-c", "user.email=test@example.invalid"]
#: Local file:// submodules are refused by default since git 2.38.1 (CVE-2022-39253).
FILE_OK = ["-c", "protocol.file.allow=always"]


def git(*args: str, cwd: Path | None = None) -> str:
    """Run git quietly and return its stdout; raise on failure."""
    result = subprocess.run(
        ["git", *GIT_ID, *FILE_OK, *args], cwd=cwd, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def commit(work: Path, name: str, text: str, message: str) -> str:
    (work / name).write_text(text)
    git("add", name, cwd=work)
    git("commit", "-q", "-m", message, cwd=work)
    return git("rev-parse", "HEAD", cwd=work)


@dataclass
class Repos:
    """Bare repos `app.git` (branches main and feature, tag v1) and `lib.git` (its submodule)."""

    root: Path
    app: Path
    lib: Path
    first: str
    feature_tip: str


def make_repos(root: Path) -> Repos:
    """Build the repos; `app`'s submodule URL is relative (`../lib.git`) as in real projects."""
    root.mkdir(parents=True, exist_ok=True)
    lib_work = root / "lib-work"
    git("init", "-q", "-b", "main", str(lib_work))
    commit(lib_work, "lib.py", "VERSION = 1\n", "lib")
    git("clone", "-q", "--bare", str(lib_work), str(root / "lib.git"))
    work = root / "app-work"
    git("init", "-q", "-b", "main", str(work))
    first = commit(work, "README", "app\n", "first")
    git("tag", "v1", cwd=work)
    git("submodule", "add", "-q", str(root / "lib.git"), "lib", cwd=work)
    git("config", "-f", ".gitmodules", "submodule.lib.url", "../lib.git", cwd=work)
    git("add", ".gitmodules", cwd=work)
    git("commit", "-q", "-m", "add lib", cwd=work)
    git("checkout", "-q", "-b", "feature", cwd=work)
    feature_tip = commit(work, "feature.txt", "feature\n", "feature work")
    git("checkout", "-q", "main", cwd=work)
    git("clone", "-q", "--bare", str(work), str(root / "app.git"))
    return Repos(root, root / "app.git", root / "lib.git", first, feature_tip)


@dataclass
class GitServer:
    """Where the server listens, and what it saw."""

    url: str
    authorized: int = 0
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def serve_git(project_root: Path, user: str, token: str) -> Iterator[GitServer]:
    """Serve the bare repos under `project_root` over smart HTTP, Basic auth `user:token`."""
    expected = "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()
    server_state = GitServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the test output stays readable."""

        def _serve(self) -> None:
            if self.headers.get("Authorization") != expected:
                with server_state.lock:
                    server_state.refused += 1
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            with server_state.lock:
                server_state.authorized += 1
            path, _, query = self.path.partition("?")
            body = self._body()
            env = {
                "PATH": "/usr/bin:/bin",
                "GIT_PROJECT_ROOT": str(project_root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "REQUEST_METHOD": self.command,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "REMOTE_USER": user,
                "REMOTE_ADDR": "127.0.0.1",
                "HTTP_GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            }
            result = subprocess.run(
                ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
            )
            head, _, payload = result.stdout.partition(b"\r\n\r\n")
            status = 200
            headers = []
            for line in head.decode("latin-1").split("\r\n"):
                key, _, value = line.partition(":")
                if key.lower() == "status":
                    status = int(value.split()[0])
                elif key:
                    headers.append((key, value.strip()))
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server_state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
