"""The README's two commands: `make run` and `make test` may start together on a fresh clone.

Run for real in a copy of the Makefile, with a stand-in Python whose "venv" is
made in an instant by scripts that log what they are asked to do: creating the
real venv takes a minute and the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

if shutil.which("make") is None or shutil.which("flock") is None:
    pytest.skip("make and flock(1) are needed", allow_module_level=True)

# `python -m venv DIR`: DIR/bin/ with a pip, dynupdate, ruff, mypy and pytest that log
# their arguments. Its pip waits for the test's go-ahead (the file "release"), so
# that the test sees the second make wait while the first one installs.
FAKE_PYTHON = r"""#!/bin/sh
set -e
[ "$1" = -m ] && [ "$2" = venv ] || exit 3
if [ -e "$LOG_DIR/installing" ]; then echo overlap >> "$LOG_DIR/log"; fi
touch "$LOG_DIR/installing"
echo "venv $3" >> "$LOG_DIR/log"
mkdir -p "$3/bin"
for tool in dynupdate ruff mypy pytest; do
    printf '#!/bin/sh\necho "%s $*" >> "$LOG_DIR/log"\n' "$tool" > "$3/bin/$tool"
done
cat > "$3/bin/pip" <<'EOF'
#!/bin/sh
echo "pip $*" >> "$LOG_DIR/log"
case "$*" in *-e*)
    n=0
    until [ -e "$LOG_DIR/release" ]; do
        n=$((n + 1)); [ $n -lt 600 ] || exit 4
        sleep 0.05
    done
    rm "$LOG_DIR/installing";;
esac
EOF
chmod +x "$3"/bin/*
"""


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """What the Makefile's venv rule depends on, copied; and the stand-in Python."""
    copy = tmp_path / "clone"
    (copy / "dynupdate").mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml", "dynupdate/__init__.py"):
        shutil.copyfile(ROOT / name, copy / name)
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    (tmp_path / "logs").mkdir()
    return copy


def _make(clone: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "LOG_DIR": str(clone.parent / "logs")}
    env.pop("MAKEFLAGS", None)
    env.pop("MAKELEVEL", None)
    return subprocess.Popen(
        ["make", "--no-print-directory", f"PYTHON={clone.parent / 'python'}", *args],
        cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _waiters(lock: Path) -> int:
    """Processes blocked in flock() on ``lock`` (the "->" lines of /proc/locks)."""
    try:
        inode = lock.stat().st_ino
    except FileNotFoundError:
        return 0
    lines = Path("/proc/locks").read_text().splitlines()
    return sum("->" in line and line.split()[-3].endswith(f":{inode}") for line in lines)


def test_make_run_and_make_test_started_together_make_one_venv(clone: Path):
    logs = clone.parent / "logs"
    run = _make(clone, "run", "ARGS=--host 127.0.0.1 --port 0")
    test = _make(clone, "test")
    try:
        # One make installs (its pip waits), the other waits for the lock, not for pip.
        end = time.monotonic() + 30
        while not (_waiters(clone / ".venv" / ".lock") or "overlap" in _read(logs / "log")):
            assert time.monotonic() < end, _read(logs / "log")
            assert run.poll() is None and test.poll() is None, run.communicate()[0]
            time.sleep(0.02)
        (logs / "release").touch()
        outputs = [p.communicate(timeout=60)[0] for p in (run, test)]
    finally:
        for p in (run, test):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert run.returncode == 0 and test.returncode == 0, outputs
    log = _read(logs / "log").splitlines()
    assert "overlap" not in log
    assert log.count("venv .venv") == 1, log  # the second make found the venv made
    assert log.count("pip install --quiet -e .[test]") == 1, log
    assert "dynupdate serve --host 127.0.0.1 --port 0" in log  # ARGS passed through
    assert {"ruff check .", "mypy "} <= set(log) and any(x.startswith("pytest") for x in log)


def test_make_run_without_args_serves_with_the_defaults(clone: Path):
    (clone.parent / "logs" / "release").touch()
    make = _make(clone, "run")
    assert make.communicate(timeout=60)[0] and make.returncode == 0
    log = _read(clone.parent / "logs" / "log").splitlines()
    assert log[-1] == "dynupdate serve"


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
