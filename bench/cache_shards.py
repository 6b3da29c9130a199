"""Would a restore go faster as several archives unpacked at once? (issue 16's next lever)

    python3 bench/cache_shards.py                       # the interpreter's site-packages
    python3 bench/cache_shards.py --tree PATH --shards 1,2,4,8 --rounds 3

The step cache kept a venv as one `tar | zstd -3` stream, which one `zstd -d | tar -x`
pipeline unpacks: tar is one process, writing files one after another. On the shaped bench a
warm box spent 18.8 s unpacking a 1.3 GB venv that uv installs in 8.7 s from its cache (uv
writes in parallel). This bench packs a tree as N shards with the cache's own code
(`provision.cache.archive.shards` and `pack`: the sorted listing cut into N runs of about
equal bytes, an inode's hard links in one run, the directories in one more archive unpacked
last, for their modes) and unpacks the N at once, against the named baseline **one archive**
(N = 1), in the same run.

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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from provision.cache import archive

UNZSTD = ("zstd", "-d", "-q", "-c")


def pack(paths: list[str], out: Path, codec: archive.Codec) -> int:
    """`provision.cache.archive.pack` of exactly `paths` (no recursion) into `out`; its size."""
    with open(out, "wb") as sink:
        archive.pack(paths, sink.write, codec, recurse=False)
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
    codec = archive.codec_for("zstd")
    if codec is None:
        raise SystemExit("zstd is not installed")
    tree = args.tree.resolve()
    runs, dirs = archive.shards([str(tree)], 1)
    raw = sum(os.lstat(p).st_size for p in runs[0])
    print(f"tree {tree}: {len(runs[0])} files, {len(dirs)} directories, {raw / 1e6:.0f} MB")
    print(f"cores {os.cpu_count()}, load {os.getloadavg()[0]:.2f} at the start")
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        work = Path(tmp)
        sets: dict[int, tuple[list[Path], Path, int]] = {}
        for n in counts:
            runs, dirs = archive.shards([str(tree)], n)
            paths = [work / f"n{n}-{i}.tar.zst" for i in range(len(runs))]
            size = sum(pack(run, p, codec) for run, p in zip(runs, paths, strict=True))
            dir_archive = work / f"n{n}-dirs.tar.zst"
            size += pack(dirs, dir_archive, codec)
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
