"""The shaped-network bench's pieces work (bench/shaper.py, bench/pyindex.py): the link limits,
and the index serves wheels uv locks from their metadata alone and installs. Not a timing of
bootstrap: the bench itself (bench/shaped.py) is not part of the suite."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import uv as uv_package
from pywheels import build_wheel

# Appended, not first: bench/ holds modules (stats, tools, run) that must shadow nothing.
sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))
import pyindex
from shaper import shaped

UV = uv_package.find_uv_bin()
MB = 1_000_000


def _fetch(url: str) -> int:
    with urllib.request.urlopen(url, timeout=30) as response:
        return len(response.read())


@pytest.mark.slow
def test_the_link_holds_every_service_to_one_rate(tmp_path: Path) -> None:
    rate, size = 8 * MB, 4 * MB
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "blob").write_bytes(os.urandom(size))
    with (
        shaped(rate) as link,
        pyindex.serve_dir(tmp_path / "a") as port_a,
        pyindex.serve_dir(tmp_path / "b") as port_b,
    ):
        urls = [
            f"http://127.0.0.1:{link.front(port_a, 'a')}/blob",
            f"http://127.0.0.1:{link.front(port_b, 'b')}/blob",
        ]
        start = time.perf_counter()
        assert _fetch(urls[0]) == size
        alone = time.perf_counter() - start
        # Two services at once share the one link: together no faster than the rate.
        threads = [threading.Thread(target=_fetch, args=(url,)) for url in urls]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        both = time.perf_counter() - start
        received, sent = link.counts()
    burst = link.down.burst
    assert alone >= (size - burst) / rate, alone
    assert both >= (2 * size - burst) / rate, both
    assert received["a"] >= 2 * size and received["b"] >= size
    assert 0 < sent["a"] < 10_000  # the requests only


@pytest.mark.slow
def test_the_index_serves_wheels_uv_locks_from_metadata_and_installs(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    build_wheel(wheels, "shapedpkg", "1.2.3", requires=("shapeddep>=0.1",))
    build_wheel(wheels, "shapeddep", "0.1.0")
    root = pyindex.write_simple(wheels, tmp_path / "index")
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[project]\nname = "p"\nversion = "0"\nrequires-python = ">=3.9"\n'
        'dependencies = ["shapedpkg==1.2.3"]\n'
    )
    seen: list[str] = []
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("UV_", "PIP_", "VIRTUAL_ENV"))
    }
    env |= {"UV_CACHE_DIR": str(tmp_path / "uv-cache"), "UV_PYTHON_DOWNLOADS": "never"}
    with pyindex.serve_dir(root, seen) as port:
        env["UV_INDEX_URL"] = f"http://127.0.0.1:{port}/simple"
        lock = subprocess.run(
            [UV, "lock", "--python", sys.executable],
            cwd=project, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert lock.returncode == 0, lock.stderr
        assert not [p for p in seen if p.endswith(".whl")], seen  # PEP 658 metadata only
        assert any(p.endswith(".whl.metadata") for p in seen), seen
        sync = subprocess.run(
            [UV, "sync", "--locked", "--python", sys.executable],
            cwd=project, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert sync.returncode == 0, sync.stderr
    probe = subprocess.run(
        [str(project / ".venv" / "bin" / "python"), "-c",
         "import shapedpkg, shapeddep; print(shapedpkg.__version__, shapeddep.__version__)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert probe.stdout.split() == ["1.2.3", "0.1.0"]
    assert f"127.0.0.1:{port}/files/shapedpkg-1.2.3" in (project / "uv.lock").read_text()
