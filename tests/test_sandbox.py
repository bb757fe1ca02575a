"""The execution sandbox of the HumanEval harness: results, limits, and containment of hostile programs.

The containment tests do not trust what the sandbox reports about itself: :func:`machine_namespaces` probes, in a
child process of its own, whether this machine lets a process create the namespaces the sandbox uses. Where it does,
every escape must fail (a sandbox that silently dropped a layer fails these tests); only where the machine cannot
provide a layer is its test skipped.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softmask_ext.evaluation.sandbox import Limits, run_python

FAST = Limits(wall_s=5.0, cpu_s=3)


PROBE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
flags = 0x00020000 | 0x40000000 | 0x20000000  # mount, network, PID
if os.getuid() != 0:
    flags |= 0x10000000  # user
if libc.unshare(flags) != 0:
    sys.exit(1)
if os.getuid() != 0 and not os.path.exists("/proc/self/uid_map"):
    sys.exit(1)
if os.getuid() != 0:
    open("/proc/self/setgroups", "w").write("deny")
    open("/proc/self/uid_map", "w").write(f"0 {os.geteuid()} 1")
sys.exit(0 if libc.mount(b"none", b"/", None, 0x4000 | (1 << 18), None) == 0 else 2)
"""


@pytest.fixture(scope="module")
def machine_namespaces() -> bool:
    """Whether this machine lets a process create mount, network and PID namespaces (as root, or inside a user
    namespace), probed independently of the sandbox."""
    return subprocess.run([sys.executable, "-I", "-c", PROBE], capture_output=True).returncode == 0


@pytest.fixture()
def contained(machine_namespaces) -> None:
    if not machine_namespaces:
        pytest.skip("this machine does not let a process create namespaces (probed without the sandbox)")


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


def test_the_sandbox_uses_every_layer_the_machine_supports(contained):
    layers = set(run_python("pass", FAST).isolation)
    assert {"network", "pid", "private-fs"} <= layers
    if os.getuid() == 0:
        assert "unprivileged" in layers


def test_writing_outside_the_working_directory_is_refused(tmp_path, contained):
    target = tmp_path / "escaped.txt"
    for where in (str(target), "/escaped.txt", os.path.join(sys.base_prefix, "escaped.txt")):
        result = run_python(f"open({where!r}, 'w').write('x')", FAST)
        assert result.status == "error", where
        assert "OSError" in result.stderr or "Error" in result.stderr.splitlines()[-1], where
        assert not os.path.exists(where)
    assert run_python("open('inside.txt', 'w').write('x')", FAST).ok  # the working directory stays writable


def test_a_secret_file_outside_is_unreadable(tmp_path, contained):
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret")
    secret.chmod(0o644)
    program = (
        f"import json, os\nprint(json.dumps([os.path.exists({str(secret)!r}), os.listdir('/')]))\n"
        f"print(open({str(secret)!r}).read())\n"
    )
    result = run_python(program, FAST)
    assert result.status == "error"
    assert "the secret" not in result.stdout
    assert "FileNotFoundError" in result.stderr
    exists, top_level = json.loads(result.stdout.splitlines()[0])
    # The private root: the folders holding the Python installation and the system libraries, devices, the working
    # folder's; not the rest of the machine (/proc, /sys, /run, /var, ...).
    allowed = {Path(p).parts[1] for p in (sys.base_prefix, os.path.realpath(sys.executable), tempfile.gettempdir())}
    assert not exists and set(top_level) <= allowed | {"dev", "lib", "lib32", "lib64", "usr", "etc"}
    assert not {"proc", "sys", "run", "var"} & set(top_level) - allowed


def test_a_unix_socket_outside_cannot_be_reached(tmp_path, contained):
    path = str(tmp_path / "host.sock")
    abstract = f"\0softmask-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX) as on_disk, socket.socket(socket.AF_UNIX) as in_namespace:
        on_disk.bind(path)
        on_disk.listen(1)
        in_namespace.bind(abstract)
        in_namespace.listen(1)
        for address in (path, abstract):
            program = f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({address!r})\ns.sendall(b'hi')\n"
            result = run_python(program, FAST)
            assert result.status == "error", address
            assert "FileNotFoundError" in result.stderr or "ConnectionRefusedError" in result.stderr, result.stderr
        for server in (on_disk, in_namespace):
            server.settimeout(0.2)
            with pytest.raises(TimeoutError):
                server.accept()


def test_a_fork_bomb_is_contained(contained):
    program = textwrap.dedent("""
        import os
        children = 0
        try:
            while True:
                if os.fork() == 0:
                    import time
                    time.sleep(60)
                    os._exit(0)
                children += 1
        finally:
            print(children, flush=True)
    """)
    result = run_python(program, Limits(wall_s=10.0, cpu_s=5, max_processes=4))
    assert result.status == "error"
    assert "BlockingIOError" in result.stderr or "Resource temporarily unavailable" in result.stderr
    assert int(result.stdout.strip()) <= 4


def test_no_network_not_even_loopback(contained):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", FAST)
    assert result.status == "error"
    assert "OSError" in result.stderr or "ConnectionRefusedError" in result.stderr


def test_a_detached_child_dies_with_the_program(contained):
    # The child leaves the process group (setsid) and would outlive a plain process-group kill; it execs an
    # interpreter whose command line carries a marker, so the test can find it among the machine's processes.
    marker = f"softmask-detached-{uuid.uuid4().hex}"
    program = textwrap.dedent(f"""
        import os, sys
        read_end, write_end = os.pipe()
        if os.fork() == 0:
            os.setsid()
            os.write(write_end, b"started")
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", {marker!r}])
        print(os.read(read_end, 64).decode())
    """)
    result = run_python(program, Limits(wall_s=5.0, cpu_s=3, max_processes=4))
    assert result.status == "ok", result.stderr
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and _processes_with(marker):
        time.sleep(0.05)
    assert not _processes_with(marker)


def _processes_with(marker: str) -> list[int]:
    """Live (not zombie) processes of the machine whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


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
