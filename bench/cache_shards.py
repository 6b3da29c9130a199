"""Would a restore go faster as several archives unpacked at once? (issue 16's next lever)

    python3 bench/cache_shards.py                       # the interpreter's site-packages
    python3 bench/cache_shards.py --tree PATH --shards 1,2,4,8 --rounds 3

The step cache keeps a venv as one `tar | zstd -3` stream (provision.cache.archive), and one
`zstd -d | tar -x` pipeline unpacks it: tar is one process, writing files one after another.
On the shaped bench a warm box spent 18.8 s unpacking a 1.3 GB venv that uv installs in 8.7 s
from its cache (uv writes in parallel). This bench packs the same tree as N shards — the sorted
file list cut into N runs of about equal bytes (a file's hard links stay in one shard, so each
shard can make its links), the directories in one more small archive unpacked last (their
modes and times) — and unpacks the N at once, against the named baseline **one archive**
(N = 1, the format the cache writes today), in the same run.

Archives are read from the page cache (a restore streams from the network: the bytes are in
memory, not on disk); before each unpack the previous tree is removed and the disk synced, so
each starts with no writeback pending. The figures are this machine's: `cores` says how many
unpacks can really run at once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ZSTD = ("zstd", "-3", "-T0", "-q", "-c")
UNZSTD = ("zstd", "-d", "-q", "-c")
SKIP = {"__pycache__"}


def listing(tree: Path) -> tuple[list[tuple[str, int, tuple[int, int]]], list[str]]:
    """(files and links with their size and inode, directories), relative to the tree's parent,
    in sorted order, without SKIP."""
    base = tree.parent
    files: list[tuple[str, int, tuple[int, int]]] = []
    dirs: list[str] = []
    for root, names, leaves in os.walk(tree):
        names[:] = sorted(n for n in names if n not in SKIP)
        dirs.append(os.path.relpath(root, base))
        for leaf in sorted(leaves):
            st = os.lstat(os.path.join(root, leaf))
            files.append(
                (
                    os.path.relpath(os.path.join(root, leaf), base),
                    st.st_size,
                    (st.st_dev, st.st_ino),
                )
            )
    return files, dirs


def split(files: list[tuple[str, int, tuple[int, int]]], n: int) -> list[list[str]]:
    """The files in n contiguous runs of about equal bytes; a later hard link of an inode goes
    to the shard of its first name."""
    total = sum(size for _, size, _ in files) or 1
    shards: list[list[str]] = [[] for _ in range(n)]
    first: dict[tuple[int, int], int] = {}
    done = 0
    for name, size, inode in files:
        index = first.setdefault(inode, min(n - 1, done * n // total))
        shards[index].append(name)
        done += size
    return shards


def pack(base: Path, names: list[str], out: Path) -> int:
    """`tar -c --no-recursion -T list | zstd -3` into `out`; its size."""
    listfile = out.with_suffix(".list")
    listfile.write_text("".join(f"{n}\n" for n in names))
    with open(out, "wb") as sink:
        tar = subprocess.Popen(
            ["tar", "-c", "-f", "-", "--no-recursion", "-C", str(base), "-T", str(listfile)],
            stdout=subprocess.PIPE,
        )
        subprocess.run(ZSTD, stdin=tar.stdout, stdout=sink, check=True)
        if tar.wait() != 0:
            raise SystemExit(f"tar -c failed for {out}")
    return out.stat().st_size


def unpack_all(archives: list[Path], dest: Path) -> None:
    """Start one `zstd -d | tar -x` per archive at once and wait for all."""
    procs = []
    for path in archives:
        comp = subprocess.Popen([*UNZSTD, str(path)], stdout=subprocess.PIPE)
        tar = subprocess.Popen(["tar", "-x", "-f", "-", "-C", str(dest)], stdin=comp.stdout)
        assert comp.stdout is not None
        comp.stdout.close()
        procs += [comp, tar]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit(f"an unpack failed in {dest}")


def restore_once(shards: list[Path], dirs: Path, dest: Path) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    subprocess.run(["sync"], check=True)
    started = time.perf_counter()
    unpack_all(shards, dest)
    unpack_all([dirs], dest)
    return time.perf_counter() - started


def main() -> int:
    default = Path(sysconfig.get_paths()["purelib"])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=default)
    parser.add_argument("--shards", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    counts = [int(c) for c in args.shards.split(",")]
    if shutil.which("zstd") is None:
        raise SystemExit("zstd is not installed")
    tree = args.tree.resolve()
    files, dirs = listing(tree)
    raw = sum(size for _, size, _ in files)
    print(f"tree {tree}: {len(files)} files, {len(dirs)} directories, {raw / 1e6:.0f} MB")
    print(f"cores {os.cpu_count()}, load {os.getloadavg()[0]:.2f} at the start")
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        work = Path(tmp)
        sets: dict[int, tuple[list[Path], Path, int]] = {}
        for n in counts:
            paths = [work / f"n{n}-{i}.tar.zst" for i in range(n)]
            size = sum(
                pack(tree.parent, names, p) for names, p in zip(split(files, n), paths, strict=True)
            )
            dir_archive = work / f"n{n}-dirs.tar.zst"
            size += pack(tree.parent, dirs, dir_archive)
            sets[n] = (paths, dir_archive, size)
        times: dict[int, list[float]] = {n: [] for n in counts}
        for round_ in range(args.rounds):
            # Alternate the order: writeback and the page cache favour neither side.
            for n in counts if round_ % 2 == 0 else counts[::-1]:
                paths, dir_archive, _ = sets[n]
                times[n].append(restore_once(paths, dir_archive, work / "dest"))
        base_n = counts[0]
        base_time = statistics.median(times[base_n])
        base_size = sets[base_n][2]
        print(
            f"baseline: {base_n} archive(s); median of {args.rounds} unpacks, load {os.getloadavg()[0]:.2f} at the end"
        )
        print("shards | packed MB | vs baseline | unpack s median (min-max) | vs baseline")
        for n in counts:
            t = times[n]
            print(
                f"{n:6d} | {sets[n][2] / 1e6:9.1f} | {sets[n][2] / base_size:10.3f}x | "
                f"{statistics.median(t):6.2f} ({min(t):.2f}-{max(t):.2f})       | "
                f"{statistics.median(t) / base_time:.2f}x   rounds: "
                + " ".join(f"{x:.2f}" for x in t)
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
