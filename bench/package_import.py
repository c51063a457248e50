"""Benchmark ``dynupdate package add`` against ``sha256sum`` on one large file.

Prints wall time, throughput and peak RSS of each tool; asserts nothing.
The import should run near the speed of a hash-and-copy, and its peak RSS
should not grow with the file size (it streams in 1 MiB chunks).

Example: .venv/bin/python bench/package_import.py --size 256M
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BLOCK = 64 << 20
MIB = 1 << 20
TIME_V = "/usr/bin/time"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``1073741824``, ``256M``, ``1G``, ``1GiB`` or ``512MB`` (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not match or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"invalid size '{text}': use e.g. 256M or 1G")
    return int(match[1]) * _UNITS[match[2]]


def write_file(path: Path, size: int) -> None:
    """``size`` bytes of incompressible data, fast: one random block repeated."""
    block = os.urandom(min(BLOCK, size))
    with open(path, "wb") as out:
        left = size
        while left:
            n = min(left, len(block))
            out.write(block[:n] if n < len(block) else block)
            left -= n


@dataclass
class Run:
    tool: str
    size: int
    seconds: float
    peak_rss: int  # bytes
    command: list[str]

    @property
    def mb_per_s(self) -> float:
        return self.size / MIB / self.seconds


def measure(tool: str, command: list[str], size: int, workdir: Path) -> Run:
    """Wall time and peak RSS of one command (which must succeed)."""
    use_time = os.access(TIME_V, os.X_OK)
    report = workdir / "time.txt"
    argv = [TIME_V, "-v", "-o", str(report), *command] if use_time else command
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{shlex.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    if use_time:
        text = report.read_text()
        peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)[1])
    else:
        # The high-water mark of all waited children: exact only when it grows.
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if peak_kib <= before:
            print(f"note: peak RSS of {tool} is at most {peak_kib} KiB", file=sys.stderr)
    return Run(tool, size, seconds, peak_kib * 1024, command)


def print_table(runs: list[Run], reference: Run) -> None:
    header = ("tool", "size MiB", "seconds", "MiB/s", "peak RSS MiB", "x sha256sum")
    rows = [header]
    for run in runs:
        ratio = run.seconds / (reference.seconds * run.size / reference.size) if run.size else 0
        rows.append(
            (
                run.tool,
                f"{run.size / MIB:.0f}" if run.size else "-",
                f"{run.seconds:.2f}",
                f"{run.mb_per_s:.0f}" if run.size else "-",
                f"{run.peak_rss / MIB:.1f}",
                f"{ratio:.2f}" if run.size else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    rows.insert(1, tuple("-" * w for w in widths))
    for row in rows:
        first, *rest = zip(row, widths, strict=True)
        print("  ".join([first[0].ljust(first[1]), *(c.rjust(w) for c, w in rest)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="default 1G")
    parser.add_argument("--dir", type=Path, default=None, help="where the temp files go")
    args = parser.parse_args()
    size, half = args.size, args.size // 2

    with tempfile.TemporaryDirectory(prefix="dynupdate-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        free = shutil.disk_usage(work).free
        if free < 3 * size + (256 << 20):
            sys.exit(f"Not enough space in {work}: {free / MIB:.0f} MiB free, need ~3x the size.")
        big, small, home = work / "big.bin", work / "half.bin", work / "home"
        write_file(big, size)
        write_file(small, half)  # another random block: different content

        dynupdate = [sys.executable, "-m", "dynupdate", "--home", str(home)]
        add = [*dynupdate, "package", "add"]
        copy = work / "copy.bin"
        references = [("sha256sum", ["sha256sum", str(big)])]
        if shutil.which("openssl"):
            # The same SHA-256 code as Python's hashlib (coreutils may lack SHA-NI).
            references.append(("openssl sha256", ["openssl", "sha256", str(big)]))
        # What the import also does: write a copy and fsync it.
        dd = ["dd", f"if={big}", f"of={copy}", "bs=1M", "conv=fsync", "status=none"]
        references.append(("dd conv=fsync", dd))
        runs = [measure(tool, command, size, work) for tool, command in references]
        copy.unlink()

        # The first start creates the home and its database: kept out of the
        # figures. The second shows the fixed cost of a start (imports, open).
        subprocess.run([*dynupdate, "package", "list"], check=True, stderr=subprocess.DEVNULL)
        runs.append(measure("dynupdate start", [*dynupdate, "package", "list"], 0, work))
        version = ["--type", "Bench", "--version"]
        runs.append(measure("package add", [*add, str(big), *version, "1.0"], size, work))
        runs.append(measure("package add (half)", [*add, str(small), *version, "2.0"], half, work))

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {load}; ", end="")
    print("source files in the page cache")
    print_table(runs, runs[0])
    print()
    for run in runs:
        print(f"{run.tool}: {shlex.join(run.command)}")
    print(f"run as: {shlex.join([sys.executable, *sys.argv])}")


if __name__ == "__main__":
    main()
