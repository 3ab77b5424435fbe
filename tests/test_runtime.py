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


_REUSE_PROBE = """
import resource, torch, engine
engine.keep_freed_memory()
def faults_of_one_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)          # 64 MiB: over glibc's largest mapping threshold (32 MiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
warm = [faults_of_one_block() for _ in range(3)]   # the heap grows to hold it (once or twice)
# the fewest of 5: the VM's memory reclaim (DAMON) can page a kept block out between two trials now and then;
# without the kept heap every trial faults the whole block in
print(min(faults_of_one_block() for _ in range(5)))
"""


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt only (Linux with glibc)")
def test_a_block_over_32_mib_reuses_freed_memory_without_faulting_its_pages_in_again():
    env = {k: v for k, v in os.environ.items() if k not in engine._MALLOC_ENV}
    out = subprocess.run([sys.executable, "-c", _REUSE_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    # A fresh mapping of 64 MiB faults in 16,384 pages of 4 KiB each time; memory kept in the heap, none.
    assert int(out.stdout.strip()) < 1000


_THREAD_PROBE = """
import ctypes, sys, threading, torch, engine
engine.keep_freed_memory()
def block():
    torch.empty(4 << 20).fill_(1.0)           # 16 MiB, in threads of their own
threads = [threading.Thread(target=block) for _ in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
fp = libc.fopen(sys.argv[1].encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(fp))
libc.fclose(ctypes.c_void_p(fp))
print(open(sys.argv[1]).read().count("<heap nr="))
"""


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt only (Linux with glibc)")
def test_threads_allocate_from_the_one_heap(tmp_path):
    """M_ARENA_MAX 1: threads (eval.py's metric threads) allocate from the main heap, whose freed memory is kept,
    not from arenas of their own (fresh memory, faulted in again): malloc_info lists one heap."""
    env = {k: v for k, v in os.environ.items() if k not in engine._MALLOC_ENV + (engine._ARENA_ENV,)}
    out = subprocess.run([sys.executable, "-c", _THREAD_PROBE, str(tmp_path / "malloc.xml")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    # a container's own MALLOC_ARENA_MAX wins, and the other settings still apply
    env["MALLOC_ARENA_MAX"] = "4"
    out = subprocess.run([sys.executable, "-c", _THREAD_PROBE, str(tmp_path / "malloc.xml")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and int(out.stdout.strip()) > 1, out.stderr
    assert _call_in_fresh_process({"MALLOC_ARENA_MAX": "4"}) == "True"


def test_run_cli_applies_it_before_main(monkeypatch):
    calls = []
    monkeypatch.setattr(engine, "keep_freed_memory", lambda: calls.append("malloc"))
    monkeypatch.setattr(engine, "freeze_imports", lambda: calls.append("gc"))
    parser = argparse.ArgumentParser(prog="probe")
    assert engine.run_cli(lambda args: calls.append("main") or 7, parser, []) == 7
    assert calls == ["malloc", "gc", "main"]


def test_freeze_imports_moves_the_imported_objects_out_of_the_collections_once():
    """In a fresh process (freezing this one would keep the test session's objects from the collector): the
    imports' objects go to the permanent generation, a second call freezes nothing more, and objects made later
    are still collected."""
    code = ("import gc, engine\n"
            "n = engine.freeze_imports()\n"
            "more = [[] for _ in range(1000)]\n"
            "print(n > 100000, engine.freeze_imports() == n == gc.get_freeze_count())\n"
            "a = []; a.append(a); del a\n"
            "print(gc.collect() >= 1)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True"]
