"""The pieces of fault handling, each in isolation: the test hooks (kill only on torchrun's first attempt, sleep),
the hang watchdog (stacks, exit status), alerts (body, a failing webhook), the straggler comparison, the
restart-scoped rendezvous store and the alert config keys. The two-process runs are in tests/e2e/test_restart.py."""

import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from internlm.config import compat
from internlm.errors import EXIT_HUNG, EXIT_STATUS_FILE_ENV
from internlm.faults import KILL_ENV, SLEEP_ENV, kill_point, sleep_point
from internlm.train import distributed as train_distributed
from internlm.train import stragglers as stragglers_module
from internlm.train.alerts import Alerts
from internlm.train.stragglers import StragglerDetector
from internlm.train.watchdog import hang_timeout
from train_utils import REPO


def test_kill_hook_fires_on_the_first_torchrun_attempt_only(monkeypatch):
    monkeypatch.setenv(KILL_ENV, "step:5@1")
    monkeypatch.setenv("RANK", "1")
    assert kill_point("step", 5) and not kill_point("step", 4) and not kill_point("save", 5)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert kill_point("step", 5)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the restarted group passes step 5 again
    assert not kill_point("step", 5)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    assert not kill_point("step", 5)


def test_sleep_hook(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(SLEEP_ENV, "step:*@1=0.2")
    start = time.monotonic()
    sleep_point("step", 7)
    assert time.monotonic() - start >= 0.2
    monkeypatch.setenv(SLEEP_ENV, "step:3@0=5")  # another rank's
    start = time.monotonic()
    sleep_point("step", 3)
    assert time.monotonic() - start < 1


def test_hang_timeout_follows_the_process_group_timeout():
    assert hang_timeout(None, 30) == 0.9 * 30 * 60 and hang_timeout(12.5, 30) == 12.5 and hang_timeout(0, 30) == 0


HUNG_SCRIPT = """
import time
from internlm.train.watchdog import HangWatchdog

def stuck_in_here():
    time.sleep(60)

dog = HangWatchdog(1.0, {work_dir!r}, rank=3, grace_s=0.1)
dog.arm(1)
time.sleep(0.6)
dog.arm(2)  # re-armed in time: step 1 does not fire
stuck_in_here()
"""


def test_watchdog_writes_the_stacks_and_exits_hung(tmp_path):
    status_file = tmp_path / "status"
    env = dict(os.environ, PYTHONPATH=REPO, **{EXIT_STATUS_FILE_ENV: str(status_file), "RANK": "0"})
    script = HUNG_SCRIPT.format(work_dir=str(tmp_path))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_HUNG and time.monotonic() - start < 20, proc.stderr
    text = (tmp_path / "hang_rank3.txt").read_text()
    assert text.startswith("rank 3 (") and "step 2 made no progress for 1 s (monitor.hang_timeout_s)" in text
    assert "in stuck_in_here" in text and "internlm-hang-watchdog" not in text.split("\n")[0]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: rank 3 (") and "hang_rank3.txt" in err[0]
    assert status_file.read_text().strip() == str(EXIT_HUNG)


def test_alerts_post_json_and_a_dead_webhook_is_warned_once(webhook, capsys):
    url, bodies = webhook.url, webhook.bodies
    dead = "http://127.0.0.1:9/"  # the discard port: nothing listens
    alerts = Alerts([dead, url], "job7", rank=0, enabled=True)
    alerts.send("unhealthy", "3 steps skipped", action="stop", step=12)
    alerts.send("stop", "exit status 3", status=3)
    alerts.close()
    assert [b["event"] for b in bodies] == ["unhealthy", "stop"]
    first = bodies[0]
    assert first["text"] == first["content"]["text"] == "[job7] unhealthy: 3 steps skipped"
    assert first["msg_type"] == "text" and first["job"] == "job7" and first["rank"] == 0 and first["step"] == 12
    assert first["action"] == "stop" and first["host"]
    err = capsys.readouterr().err
    assert err.count("warning: monitor.alert: the webhook http://127.0.0.1:9/ failed") == 1
    quiet = Alerts([url], "job7", rank=1, enabled=False)  # not rank 0: nothing sent
    quiet.send("start", "x")
    quiet.close()
    assert len(bodies) == 2


def test_alert_keys():
    assert compat.alert_webhooks(dict(enable_feishu_alert=False, feishu_alert_address="https://h/x")) == []
    both = dict(enable_feishu_alert=True, feishu_alert_address="https://h/x", light_monitor_address="10.0.0.1:80")
    assert compat.alert_webhooks(compat.alert(both)) == ["https://h/x", "http://10.0.0.1:80"]
    with pytest.raises(ValueError, match="feishu_alert_address='ftp://h': only http:// and https://"):
        compat.alert(dict(enable_feishu_alert=True, feishu_alert_address="ftp://h"))


def test_straggler_named_by_rank_and_host(monkeypatch):
    """Four ranks, rank 2 3.3 times slower than the lower median: one warning line naming it, one metrics record."""
    times = [0.1, 0.11, 0.33, 0.1]
    monkeypatch.setattr(
        stragglers_module.dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), ["a", "b", "c", "d"])
    )

    def all_gather(out, mine):
        for i, t in enumerate(out):
            t.fill_(times[i])

    monkeypatch.setattr(stragglers_module.dist, "all_gather", all_gather)
    detector = StragglerDetector(1.5, rank=0, world_size=4, device=torch.device("cpu"))
    detector.begin()
    detector.end()
    warned, logged = [], []
    detector.report(8, warned.append, logged.append)
    assert len(warned) == 1 and warned[0].startswith("warning: step 8: rank 2 (c) is slow: forward/backward 0.330 s")
    assert "3.3x the median 0.100 s of 4 ranks" in warned[0]
    assert logged == [dict(step=8, step_time_ranks=times, step_time_median=0.1, step_time_max=0.33, slowest_rank=2)]


def test_rendezvous_store_is_scoped_to_the_torchrun_attempt(monkeypatch):
    """torchrun's agent keeps one store across restarts: attempt N's keys live under internlm/attemptN/."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # a client of the agent's store, as under torchrun
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    for attempt in (0, 1):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))
        train_distributed._attempt_store(timedelta(seconds=10)).set("default_pg/key", f"from {attempt}")
    assert server.get("internlm/attempt0/default_pg/key") == b"from 0"
    assert server.get("internlm/attempt1/default_pg/key") == b"from 1"


BACKSTOP_SCRIPT = """
import time
from internlm.train import watchdog

def stuck_in_here():
    time.sleep(60)

watchdog.BACKSTOP_S = 1.0
# the watchdog thread cannot finish (as when the main thread holds the GIL): faulthandler's C timer ends the process
dog = watchdog.HangWatchdog(1.0, {work_dir!r}, rank=0, on_hang=lambda message, step: time.sleep(60), grace_s=0.1)
dog.arm(1)
stuck_in_here()
"""


def test_watchdog_backstop_needs_no_python_thread(tmp_path):
    script = BACKSTOP_SCRIPT.format(work_dir=str(tmp_path))
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Timeout (0:00:02.100000)!" in proc.stderr and "in stuck_in_here" in proc.stderr


def test_a_lost_peer_is_one_line():
    gloo = RuntimeError(
        "[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:37046: Connection reset by peer. GLHF"
    )
    line = train_distributed.peer_failure(gloo, 0)
    assert line.startswith("rank 0: a collective failed because another rank died or stopped answering ([../gloo")
    assert "torchrun --max-restarts" in line and "\n" not in line
    assert train_distributed.peer_failure(dist.DistBackendError("NCCL watchdog timeout\nmore"), 3).startswith("rank 3")
    assert train_distributed.peer_failure(RuntimeError("shape mismatch"), 0) is None  # a bug keeps its traceback


def test_run_watch_alerts_on_restart_and_unhealthy_decisions(webhook, monkeypatch):
    from internlm.train.health import CONTINUE, HealthDecision
    from internlm.train.run_watch import RunWatch
    from internlm.train.watchdog import HangWatchdog

    url, bodies = webhook.url, webhook.bodies
    off = RunWatch.off()
    watch = RunWatch(off.watchdog, off.stragglers, Alerts([url], "job", rank=0, enabled=True))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    watch.started("/w")
    watch.health(CONTINUE, 5)  # a healthy step: no alert
    watch.health(HealthDecision("rollback", "loss spike at step 9", "/w/checkpoints/6"), 9)
    watch.finished(75, "stopped after step 9")
    assert [b["event"] for b in bodies] == ["restart", "unhealthy", "stop"]
    restart, unhealthy, stop = bodies
    assert restart["attempt"] == 2 and restart["work_dir"] == "/w"
    assert (unhealthy["action"], unhealthy["step"], unhealthy["checkpoint"]) == ("rollback", 9, "/w/checkpoints/6")
    assert (
        stop["status"] == 75
        and stop["attempt"] == 2
        and stop["text"] == "[job] stop: exit status 75: stopped after step 9"
    )
    assert isinstance(off.watchdog, HangWatchdog) and not off.watchdog.enabled and not off.stragglers.enabled
