"""The agent's event sources (host/wake.py) on real pidfds, pipes and sockets."""
from __future__ import annotations

import os
import subprocess
import threading

from kairos_libvirt.host import wake


def test_quiet_sources_sleep_the_whole_timeout_and_report_nothing(tmp_path):
    w = wake.Wakeup(str(tmp_path / "agent.sock"))
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert w.watch_process(child.pid) and w.watches_exit
        assert w.wait(0.05) == []
    finally:
        child.kill()
        child.wait()
        w.close()


def test_a_process_exit_wakes_the_wait_at_once(tmp_path):
    w = wake.Wakeup()
    child = subprocess.Popen(["sleep", "30"])
    assert w.watch_process(child.pid)
    threading.Timer(0.05, child.kill).start()
    try:
        assert w.wait(30) == ["exit"]       # not the 30 s timeout: the pidfd woke it
    finally:
        child.wait()
        w.close()


def test_a_process_already_gone_is_reported_at_watch(tmp_path):
    child = subprocess.Popen(["true"])
    child.wait()
    w = wake.Wakeup()
    try:
        assert not w.watch_process(child.pid)
    finally:
        w.close()


def test_set_from_another_thread_wakes_once_and_coalesces(tmp_path):
    w = wake.Wakeup()
    try:
        for _ in range(1000):                 # a burst: one pending wake-up
            w.set()
        assert w.wait(5) == ["wake"]
        assert w.wait(0) == []
        threading.Timer(0.05, w.set).start()
        assert w.wait(30) == ["wake"]
    finally:
        w.close()


def test_a_poke_on_the_control_socket_wakes_it_and_the_socket_is_root_only(tmp_path):
    path = str(tmp_path / "agent.sock")
    w = wake.Wakeup(path)
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert wake.poke(path) and wake.poke(path)
        assert w.wait(5) == ["control"]
        assert w.wait(0) == []
    finally:
        w.close()
    assert not os.path.exists(path)
    assert not wake.poke(path)               # nobody listens: the CLI goes on
