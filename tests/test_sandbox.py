"""The execution sandbox of the HumanEval harness: results, limits, and containment of hostile programs."""

from __future__ import annotations

import os
import socket
import textwrap
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softmask_ext.evaluation.sandbox import Limits, run_python

FAST = Limits(wall_s=5.0, cpu_s=3)


@pytest.fixture(scope="module")
def isolation() -> tuple[str, ...]:
    """The layers this machine grants (namespaces need root or unprivileged user namespaces)."""
    return run_python("pass", FAST).isolation


def test_passing_program_reports_ok_and_output():
    result = run_python("print('hello from the sandbox')", FAST)
    assert result.status == "ok" and result.ok
    assert result.returncode == 0
    assert result.stdout.strip() == "hello from the sandbox"
    assert {"rlimits", "tmpdir"} <= set(result.isolation)


def test_without_isolation_only_the_basic_layers_apply():
    result = run_python("import os\nprint(os.getcwd())", FAST, isolate=False)
    assert result.ok
    assert result.isolation == ("rlimits", "tmpdir")
    assert "softmask-sandbox-" in result.stdout


def test_failing_assertion_reports_error_with_traceback():
    result = run_python("assert 1 + 1 == 3, 'arithmetic'", FAST)
    assert result.status == "error"
    assert result.returncode == 1
    assert "AssertionError: arithmetic" in result.stderr


@settings(max_examples=6, deadline=None)
@given(code=st.integers(min_value=0, max_value=120))
def test_exit_code_is_reported(code):
    result = run_python(f"raise SystemExit({code})", FAST)
    assert result.returncode == code
    assert result.status == ("ok" if code == 0 else "error")


def test_busy_infinite_loop_is_stopped_by_the_cpu_limit():
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", Limits(wall_s=10.0, cpu_s=1))
    assert result.status == "cpu_limit"
    assert time.monotonic() - start < 5.0


def test_sleeping_forever_is_stopped_by_the_wall_clock():
    start = time.monotonic()
    result = run_python("import time\ntime.sleep(3600)\n", Limits(wall_s=1.0, cpu_s=5))
    assert result.status == "timeout"
    assert not result.ok
    assert time.monotonic() - start < 4.0


def test_memory_hog_fails_instead_of_taking_the_machine():
    result = run_python("block = bytearray(8 << 30)", Limits(wall_s=10.0, cpu_s=5, memory_bytes=512 << 20))
    assert result.status == "error"
    assert "MemoryError" in result.stderr


def test_files_written_in_the_working_directory_vanish(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    program = "import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())\n"
    result = run_python(program, FAST)
    assert result.status == "ok"
    workdir = result.stdout.strip()
    assert workdir != str(tmp_path)
    assert not os.path.exists(workdir)
    assert list(tmp_path.iterdir()) == []


def test_a_huge_file_is_cut_off_by_the_file_size_limit():
    program = "with open('big.bin', 'wb') as f:\n    f.write(b'x' * (64 << 20))\n"
    result = run_python(program, Limits(wall_s=10.0, cpu_s=5, file_bytes=1 << 20))
    assert result.status == "error"
    assert "File too large" in result.stderr


def test_writing_outside_the_working_directory_is_refused(tmp_path, isolation):
    if "readonly-fs" not in isolation:
        pytest.skip(f"this machine grants no mount namespace (isolation: {isolation})")
    target = tmp_path / "escaped.txt"
    result = run_python(f"open({str(target)!r}, 'w').write('x')", FAST)
    assert result.status == "error"
    assert "Read-only file system" in result.stderr
    assert not target.exists()


def test_no_network_not_even_loopback(isolation):
    if "network" not in isolation:
        pytest.skip(f"this machine grants no network namespace (isolation: {isolation})")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", FAST)
    assert result.status == "error"
    assert "OSError" in result.stderr or "ConnectionRefusedError" in result.stderr


def test_a_detached_child_dies_with_the_program(isolation):
    if "pid" not in isolation:
        pytest.skip(f"this machine grants no PID namespace (isolation: {isolation})")
    # The child leaves the process group (setsid) and would outlive a plain process-group kill.
    program = textwrap.dedent("""
        import os, sys, time
        read_end, write_end = os.pipe()
        if os.fork() == 0:
            os.setsid()
            # /proc belongs to the machine's PID namespace, so this is the pid the test can see.
            os.write(write_end, os.readlink('/proc/self').encode())
            time.sleep(60)
            os._exit(0)
        print(os.read(read_end, 64).decode())
    """)
    result = run_python(program, FAST)
    assert result.status == "ok"
    pid = int(result.stdout.strip())
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_output_flood_is_capped():
    result = run_python("import sys\nwhile True:\n    sys.stdout.write('spam' * 1000)\n", Limits(wall_s=2.0, cpu_s=1))
    assert result.status in ("cpu_limit", "timeout")
    assert 0 < len(result.stdout) <= 64 * 1024


def test_bad_arguments_are_clear_errors():
    with pytest.raises(TypeError, match="source must be a str"):
        run_python(b"print(1)")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="wall_s"):
        Limits(wall_s=0)
    with pytest.raises(ValueError, match="max_processes"):
        Limits(max_processes=-1)
