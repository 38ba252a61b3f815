"""The allocator settings of mmtune.memory: applied once, where glibc is the allocator, and switchable off."""
import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
def test_freed_memory_is_kept_under_glibc_and_the_switch_turns_it_off():
    code = ("import ctypes, mmtune.memory as m\n"
            "glibc = hasattr(ctypes.CDLL(None), 'gnu_get_libc_version')\n"
            "print(glibc, m.keep_freed_memory(), m.keep_freed_memory())")
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"MMTUNE_KEEP_FREED_MEMORY": "0", "PATH": ""}).stdout.split()
    assert on == [on[0], on[0], on[0]]  # applied exactly where glibc is, the same answer on a second call
    assert off[1:] == ["False", "False"]


def test_the_cli_applies_the_settings_before_any_command(monkeypatch, capsys):
    import mmtune.memory as m
    from mmtune.cli import main

    calls = []
    monkeypatch.setattr(m, "keep_freed_memory", lambda: calls.append(1) or True)
    assert main(["parts"]) == 0
    assert calls == [1]
