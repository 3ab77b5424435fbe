"""The process-level settings the scripts apply at start (engine.keep_freed_memory)."""
import argparse
import ctypes
import os
import subprocess
import sys

import pytest

import engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        return False


def _call_in_fresh_process(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in engine._MALLOC_ENV}
    env.update(env_extra)
    code = "import engine; print(engine.keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt only (Linux with glibc)")
def test_keep_freed_memory_sets_glibc_malloc_and_leaves_a_users_own_settings():
    assert _call_in_fresh_process({}) == "True"               # every mallopt call was accepted
    assert _call_in_fresh_process({"MALLOC_TOP_PAD_": "0"}) == "False"


def test_run_cli_applies_it_before_main(monkeypatch):
    calls = []
    monkeypatch.setattr(engine, "keep_freed_memory", lambda: calls.append("malloc"))
    parser = argparse.ArgumentParser(prog="probe")
    assert engine.run_cli(lambda args: calls.append("main") or 7, parser, []) == 7
    assert calls == ["malloc", "main"]
