"""The remote step cache's archive: which compressor, and a venv vs uv's cache.

    python3 bench/cache_archive.py                  # builds a ~400 MB venv with uv (network)
    python3 bench/cache_archive.py --venv PATH      # an existing venv or tree instead
    python3 bench/cache_archive.py --model-mb 500   # also a bf16-like safetensors blob

1. Each codec packs the tree (GNU tar through this process, as provision.cache.archive does),
   decompresses it alone, and unpacks it to disk; figures against the named baseline **tar
   alone** (no compression), measured in the same run. What a restore costs at a bandwidth B
   is modelled as max(packed / B, decompress, tar -x): download, decompression and extraction
   stream side by side, so the slowest decides (tar -x: the quickest unpack of any codec, all
   doing the same extraction).
2. For a venv: restoring the venv itself (provision's choice) against restoring uv's cache and
   then `uv pip install --offline` into a fresh venv (UV_LINK_MODE=copy, as the openpi
   playbooks set it), both archived with zstd -3.

The CPU figures are this machine's (see `cores`): zstd -T0 uses every core, so a box with more
cores compresses faster, and the choice leans to what the link allows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from provision.cache import archive

PACKAGES = ["numpy", "scipy", "pandas", "pyarrow"]
BANDWIDTHS_MB_S = (40, 200, 500)
REPEAT = 2


def codecs() -> list[archive.Codec]:
    zstd, gzip = shutil.which("zstd"), shutil.which("gzip")
    found = [archive.Codec("none", "tar", ("cat",), ("cat",))]
    if zstd:
        for level in (1, 3, 6, 9):
            found.append(
                archive.Codec(
                    f"zstd -{level}",
                    "zst",
                    (zstd, f"-{level}", "-T0", "-q", "-c"),
                    (zstd, "-d", "-q", "-c"),
                )
            )
    if gzip:
        for level in (1,):
            found.append(
                archive.Codec(f"gzip -{level}", "gz", (gzip, f"-{level}", "-c"), (gzip, "-d", "-c"))
            )
    return found


def measure(
    paths: list[str], codec: archive.Codec, work: Path
) -> tuple[int, int, float, float, float]:
    """(tar bytes, packed bytes, pack s, decompress s, unpack s) for one codec, each time the
    best of REPEAT runs (the machine may be shared: the fastest run is the least disturbed).
    Decompress: the codec alone into /dev/null; unpack: decompress and `tar -x` to disk."""
    runs = [_measure_once(paths, codec, work) for _ in range(REPEAT)]
    best = [min(r[k] for r in runs) for k in (2, 3, 4)]
    return runs[0][0], runs[0][1], best[0], best[1], best[2]


def _measure_once(
    paths: list[str], codec: archive.Codec, work: Path
) -> tuple[int, int, float, float, float]:
    blob = work / "blob"
    with open(blob, "wb") as fh:
        started = time.perf_counter()
        packed = archive.pack(paths, fh.write, codec)
        pack_s = time.perf_counter() - started
    with open(blob, "rb") as src:
        started = time.perf_counter()
        subprocess.run(list(codec.decompress), stdin=src, stdout=subprocess.DEVNULL, check=True)
        decompress_s = time.perf_counter() - started
    dest = work / "dest"
    started = time.perf_counter()
    with open(blob, "rb") as fh:
        archive.unpack(iter(lambda: fh.read(1 << 20), b""), str(dest), codec, packed.sha256)
    unpack_s = time.perf_counter() - started
    shutil.rmtree(dest)
    blob.unlink()
    return packed.raw_bytes, packed.packed_bytes, pack_s, decompress_s, unpack_s


def build_venv(work: Path) -> tuple[Path, Path, float]:
    """A venv of PACKAGES made by uv from PyPI with an empty cache (and that cache), and how
    long that took: what a box without the step cache pays (on this machine's link)."""
    venv, cache = work / "venv", work / "uv-cache"
    env = {**os.environ, "UV_CACHE_DIR": str(cache), "UV_LINK_MODE": "copy"}
    started = time.perf_counter()
    subprocess.run(["uv", "venv", "-q", "-p", sys.executable, str(venv)], check=True, env=env)
    subprocess.run(
        ["uv", "pip", "install", "-q", "-p", str(venv / "bin" / "python"), *PACKAGES],
        check=True,
        env=env,
    )
    return venv, cache, time.perf_counter() - started


def fake_model(work: Path, mb: int) -> Path:
    """bf16 weights as a trained model holds them: N(0, 0.02) truncated to bfloat16."""
    import numpy as np

    path = work / "model" / "model.safetensors"
    path.parent.mkdir()
    rng = np.random.default_rng(0)
    with open(path, "wb") as fh:
        for _ in range(mb):
            weights = rng.normal(0.0, 0.02, 1 << 19).astype(np.float32)
            fh.write((weights.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    return path.parent


def report(title: str, paths: list[str], work: Path) -> None:
    print(f"\n## {title}")
    bands = " ".join(f"{'@' + str(b) + ' MB/s':>16}" for b in BANDWIDTHS_MB_S)
    print(
        f"{'codec':<9} {'packed':>9} {'ratio':>6} {'pack s':>7} {'dec s':>6} {'unpack s':>8} {bands}"
    )
    rows = [(codec, *measure(paths, codec, work)) for codec in codecs()]
    # Every unpack does the same `tar -x`: the quickest one bounds what extraction costs.
    extract = min(row[5] for row in rows)
    print(f"(tar alone: {rows[0][1] / 1e6:.0f} MB, tar -x {extract:.1f}s)")
    base: list[float] = []
    for codec, raw, packed, pack_s, dec_s, unpack_s in rows:
        restore = [max(packed / (b * 1e6), dec_s, extract) for b in BANDWIDTHS_MB_S]
        base = base or restore
        cells = " ".join(f"{r:7.1f}s ({r / b0:.2f}x)" for r, b0 in zip(restore, base, strict=True))
        print(
            f"{codec.name:<9} {packed / 1e6:7.0f}MB {packed / raw:6.3f} {pack_s:7.1f} "
            f"{dec_s:6.1f} {unpack_s:8.1f} {cells}"
        )
    print(
        "restore = max(packed / bandwidth, decompress, tar -x alone): the three stream side by "
        "side; (NNx) against tar alone, same run"
    )


def venv_vs_cache(venv: Path, cache: Path, cold_s: float, work: Path) -> None:
    zstd = next(c for c in codecs() if c.name == "zstd -3")
    _, venv_packed, _, _, venv_unpack = measure([str(venv)], zstd, work)
    _, cache_packed, _, _, cache_unpack = measure([str(cache)], zstd, work)
    fresh = work / "fresh"
    env = {**os.environ, "UV_CACHE_DIR": str(cache), "UV_LINK_MODE": "copy"}
    started = time.perf_counter()
    subprocess.run(["uv", "venv", "-q", "-p", sys.executable, str(fresh)], check=True, env=env)
    subprocess.run(
        ["uv", "pip", "install", "-q", "--offline", "-p", str(fresh / "bin" / "python"), *PACKAGES],
        check=True,
        env=env,
    )
    install_s = time.perf_counter() - started
    shutil.rmtree(fresh)
    print("\n## a venv: the venv itself vs uv's cache + install (zstd -3 both)")
    print(f"venv itself:   {venv_packed / 1e6:6.0f} MB, restore {venv_unpack:5.1f}s (baseline)")
    print(f"no cache:      uv from PyPI, empty cache: {cold_s:.1f}s ({cold_s / venv_unpack:.2f}x)")
    total = cache_unpack + install_s
    print(
        f"uv's cache:    {cache_packed / 1e6:6.0f} MB ({cache_packed / venv_packed:.2f}x), "
        f"restore {cache_unpack:.1f}s + install {install_s:.1f}s = {total:.1f}s "
        f"({total / venv_unpack:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, help="an existing venv/tree (skips part 2)")
    parser.add_argument("--model-mb", type=int, default=0, help="also a bf16-like blob this big")
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}  tar: GNU tar through Python  zstd: {shutil.which('zstd')}")
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp:
        work = Path(tmp)
        if args.venv:
            report(f"tree {args.venv}", [str(args.venv.resolve())], work)
        else:
            venv, cache, cold_s = build_venv(work)
            report(f"venv of {', '.join(PACKAGES)} (uv)", [str(venv)], work)
            venv_vs_cache(venv, cache, cold_s, work)
        if args.model_mb:
            model = fake_model(work, args.model_mb)
            report(f"bf16-like model.safetensors, {args.model_mb} MB", [str(model)], work)


if __name__ == "__main__":
    main()
