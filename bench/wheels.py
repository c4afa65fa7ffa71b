"""Wheels for bench/gpu_check.sh: what a GPU machine without network may lack, small enough to travel.

    python -m bench.wheels OUT_DIR [--limit-mb 60]     # bench/gpu_check.sh --prepare runs this

Downloads (pip, CPython 3.12, x86_64 Linux, binary only, no dependency resolution) trl and datasets
at this checkout's versions with the dependencies the GPU machine may not have, then bitsandbytes'
wheel if it still fits under the limit. Parts no marl path imports are cut out of three wheels so the
set fits the device tool's 64 MiB: pyarrow's Flight and S3 libraries, tests and C++ headers; pandas'
tests; bitsandbytes' ROCm, XPU and CUDA 11 libraries and CUDA 12 builds older than 12.8 (torch's CUDA
12 wheels are 12.6 / 12.8 / 12.9 builds: a 12.6 machine would fall back to the CPU, which the 4-bit
rows then report). Each cut wheel's RECORD lists exactly the files it keeps.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from pathlib import Path

CORE = ("trl", "datasets", "dill", "xxhash", "multiprocess", "fsspec", "pyarrow", "pandas", "tzdata")
OPTIONAL = ("bitsandbytes",)
DROP = {  # distribution -> regex of archive paths to leave out
    "pyarrow": r"^pyarrow/(tests/|include/|.*flight|.*_s3|libarrow_s3|_pyarrow_cpp_tests)",
    "pandas": r"^pandas/tests/",
    "bitsandbytes": r"^bitsandbytes/libbitsandbytes_(rocm|xpu|cuda11|cuda12[0-7])",
}
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64")


def download(pkgs: list[str], out: Path) -> list[Path]:
    """`pip download` of `pkg==<this venv's version>` for CPython 3.12 manylinux, no dependencies."""
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.glob("*.whl"))
    pins = [f"{p}=={md.version(p)}" for p in pkgs]
    plat = [x for p in PLATFORMS for x in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps",
                    "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", *plat, "-d", str(out),
                    *pins], check=True)
    return sorted(set(out.glob("*.whl")) - before)


def trim(wheel: Path, drop: str) -> int:
    """Rewrite `wheel` without the files matching `drop` (RECORD rewritten to match); bytes saved."""
    size = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    pattern = re.compile(drop)
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        kept = [i for i in src.infolist() if not pattern.search(i.filename)]
        record = next(i.filename for i in kept if i.filename.endswith(".dist-info/RECORD"))
        lines = []
        for info in kept:
            if info.filename == record:
                continue
            data = src.read(info)
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{info.filename},sha256={digest},{len(data)}")
        dst.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
    tmp.replace(wheel)
    return size - wheel.stat().st_size


def dist_name(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def prepare(out: Path, limit_mb: float) -> None:
    core, extra = out / "core", out / "bnb"
    for d in (core, extra):
        for w in d.glob("*.whl"):
            w.unlink()
    for w in download(list(CORE), core):
        if dist_name(w) in DROP:
            print(f"wheels: {w.name}: cut {trim(w, DROP[dist_name(w)]) / 2**20:.1f} MB")
    used = sum(w.stat().st_size for w in core.glob("*.whl")) / 2**20
    for w in download(list(OPTIONAL), extra):
        if dist_name(w) in DROP:
            print(f"wheels: {w.name}: cut {trim(w, DROP[dist_name(w)]) / 2**20:.1f} MB")
        mb = w.stat().st_size / 2**20
        if used + mb > limit_mb:
            print(f"wheels: {w.name} ({mb:.1f} MB) does not fit beside the others ({used:.1f} MB) under {limit_mb} MB: "
                  "left out (the 4-bit rows will say bitsandbytes is missing)")
            w.unlink()
        else:
            used += mb
    for w in sorted(out.glob("*/*.whl")):
        print(f"wheels: {w.stat().st_size / 2**20:6.1f} MB  {w.relative_to(out)}")
    print(f"wheels: {used:.1f} MB in {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--limit-mb", type=float, default=60.0)
    a = ap.parse_args()
    prepare(a.out, a.limit_mb)
