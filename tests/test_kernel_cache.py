"""The CPU kernel's build cache as an attacker or an unlucky user meets it (docs/security.md): a library is
loaded only from a private folder of ours and only when its content is what minidiff built; a planted,
garbage or half-built library never runs; a relative XDG_CACHE_HOME is ignored; a compiler that hangs is
abandoned after its time limit; every fall-back to NumPy is one line on stderr and the model still works."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from minidiff.kernels import lowbit_matmul as native

needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
PLANT = '#include <stdio.h>\nstatic void __attribute__((constructor)) hit(void) { FILE* f = fopen("MARK", "w"); ' \
        'if (f) fclose(f); }\nvoid lowbit_widen(void) {}\nint lowbit_matmul(void) { return 0; }\n'


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache (XDG_CACHE_HOME) and kernel state; restored afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MINIDIFF_NATIVE", raising=False)
    native.reset()
    yield tmp_path / "cache" / "minidiff" / "native"
    native.reset()


def fresh_status() -> str:
    """native.status() in a new process (a library this one loaded stays loaded under its name)."""
    code = "from minidiff.kernels import lowbit_matmul as k; k.library(); print(k.status())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def final_path():
    """Where the library of this source, compiler and CPU lives in the cache (found by a child process)."""
    return native._cache_dir() / fresh_status()[4:-1]


def planted(tmp_path, where: Path) -> Path:
    """A shared library whose constructor writes tmp_path/MARK (checked: loading a copy of it does), at `where`."""
    src, probe = tmp_path / "plant.c", tmp_path / "probe.so"
    src.write_text(PLANT.replace("MARK", str(tmp_path / "MARK")))
    subprocess.run([shutil.which(os.environ.get("CC", "cc")), "-shared", "-fPIC", str(src), "-o", str(probe)], check=True)
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(probe)!r})"], check=True)
    assert (tmp_path / "MARK").exists()                    # the plant runs when loaded ...
    (tmp_path / "MARK").unlink()
    if where.exists():
        where.unlink()                                     # (a loaded library's file is replaced, not rewritten)
    shutil.copy(probe, where)                              # ... so minidiff must never load it
    return where


@needs_cc
def test_a_planted_library_never_runs(cache, tmp_path):
    target = final_path()                                  # the name minidiff will look for
    planted(tmp_path, target)                              # a stranger's library under the final name
    assert fresh_status().startswith("on (") and native._verified(target)
    assert not (tmp_path / "MARK").exists()                # rebuilt, never loaded
    planted(tmp_path, target)
    target.with_suffix(".sha256").write_text("0" * 64)      # and a record that does not match it
    assert fresh_status().startswith("on (") and not (tmp_path / "MARK").exists()


@needs_cc
def test_a_cache_open_to_others_is_closed_and_emptied(cache, tmp_path):
    target = final_path()
    planted(tmp_path, target)
    target.with_suffix(".sha256").write_text(native._digest(target))   # a matching record, in an open folder
    os.chmod(cache, 0o777)
    assert fresh_status().startswith("on (") and not (tmp_path / "MARK").exists()
    assert oct(os.stat(cache).st_mode & 0o777) == "0o700"
    os.chmod(cache, 0o700)                                 # the same files in a private folder: trusted (the
    planted(tmp_path, target)                              # check above is what made the difference)
    target.with_suffix(".sha256").write_text(native._digest(target))
    fresh_status()
    assert (tmp_path / "MARK").exists()


@needs_cc
@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a folder another user owns")
def test_a_cache_owned_by_another_user_is_refused(cache, tmp_path, capsys):
    cache.mkdir(parents=True)
    os.chown(cache, 12345, 12345)
    assert native.library() is None and "owned by another user" in native.status()
    assert "minidiff: note: the CPU kernel is off" in capsys.readouterr().err


@needs_cc
def test_a_relative_xdg_cache_home_is_ignored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", "cache")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    native.reset()
    try:
        assert native.library() is not None
        assert not (tmp_path / "cache").exists() and (tmp_path / "home" / ".cache" / "minidiff" / "native").is_dir()
    finally:
        native.reset()


def fake_cc(tmp_path, body: str) -> str:
    cc = tmp_path / "fake-cc"
    cc.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    cc.chmod(0o755)
    return str(cc)


def test_a_compiler_that_writes_garbage_leaves_nothing_cached(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CC", fake_cc(tmp_path, """\
        for a; do if [ "$prev" = "-o" ]; then echo garbage > "$a"; fi; prev="$a"; done
        exit 0
        """))
    assert native.library() is None and "does not load" in native.status()
    assert not list(cache.glob("*.so")) and not list(cache.glob("*.sha256"))
    assert capsys.readouterr().err.count("minidiff: note:") == 1


def test_a_compiler_that_hangs_is_abandoned(cache, tmp_path, monkeypatch, capsys):
    import time
    monkeypatch.setenv("CC", fake_cc(tmp_path, "exec sleep 60\n"))
    monkeypatch.setenv("MINIDIFF_CC_SECONDS", "1")
    t = time.monotonic()
    assert native.library() is None and "took more than 1 s" in native.status()
    assert time.monotonic() - t < 10 and not list(cache.glob("*.so"))
    assert "minidiff: note:" in capsys.readouterr().err


@needs_cc
def test_the_model_still_works_when_the_kernel_falls_back(cache, tmp_path, monkeypatch):
    """A failed build costs speed, never an answer: a 4-bit model loads and gives the kernel's logits."""
    import minidiff
    from minidiff.cli import main
    assert main(["quantize", "default", str(tmp_path / "q"), "--scope", "experts"]) == 0
    with_kernel = minidiff.load(tmp_path / "q").denoise([5, 6, 7], minidiff.load(tmp_path / "q").encode([2, 3]))
    native.reset()
    monkeypatch.setenv("CC", fake_cc(tmp_path, "exit 1\n"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other"))
    m = minidiff.load(tmp_path / "q")
    assert native.library() is None
    np.testing.assert_allclose(m.denoise([5, 6, 7], m.encode([2, 3])), with_kernel, rtol=0, atol=1e-4)


def test_ctrl_c_during_a_first_build_ends_it_at_once(tmp_path):
    """SIGINT while the compiler runs: the process ends promptly with KeyboardInterrupt's exit, no thread left
    building (the build runs in the loading thread)."""
    import signal
    import time
    cc = fake_cc(tmp_path, "exec sleep 60\n")
    code = "import minidiff.kernels.lowbit_matmul as k; print('go', flush=True); k.library()"
    env = dict(os.environ, CC=cc, XDG_CACHE_HOME=str(tmp_path / "c"))
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"go"
    time.sleep(0.5)
    t = time.monotonic()
    p.send_signal(signal.SIGINT)
    p.wait(timeout=10)
    assert time.monotonic() - t < 3 and p.returncode != 0
