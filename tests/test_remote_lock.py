"""The remote workdir lock (`dpft.train.remote_lock`) under contention, on the fake gs:// store
(tests/fake_gcs.py models GCS generations: create-if-absent and compare-and-delete are atomic
across processes).

Two processes that both judge one lock stale race to take it over, ROUNDS times; each time
exactly one must win, and the winner must still hold the lock once the loser has given up. The
processes are lined up on purpose: both read the stale lock before either deletes it, then each
deletes after its own random delay, which makes the interleaving "A deletes, A creates, B
deletes" (the one that loses a fresh lock without a generation precondition) common."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import fake_gcs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
ROUNDS = 25
URL = "gs://bucket/run"

RACER = r"""
import json, os, random, sys, time
sys.path[:0] = [{tests!r}]
import fake_gcs; fake_gcs.install()
from dpft.errors import WorkdirBusyError
from dpft.train import remote_lock

me, sync, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])


def wait_for(path, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise SystemExit(f"timed out waiting for {{path}}")
        time.sleep(0.002)


def touch(path, text=""):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


real_rm = fake_gcs.FakeGCS.rm_file
state = {{}}


def lined_up_rm(self, path):  # both racers have read the stale lock; then a random delay
    if "#" in str(path) or path == state.get("lock"):
        touch(f"{{sync}}/read-{{state['round']}}-{{me}}")
        wait_for(f"{{sync}}/read-{{state['round']}}-{{1 - me}}")
        time.sleep(random.uniform(0, 0.03))
    return real_rm(self, path)


fake_gcs.FakeGCS.rm_file = lined_up_rm
for r in range(rounds):
    state["round"] = r
    wait_for(f"{{sync}}/go-{{r}}")
    lease = remote_lock.RemoteLease({url!r} + "/.dpft.lock", {url!r}, lease_s=3600, stale_after_s=60)
    state["lock"] = lease._path
    try:
        lease.acquire(lambda h: f"pid {{h.get('pid')}}")
        won = True
    except WorkdirBusyError:
        won = False
    if not won:  # the other one may never have reached its delete: let it pass the line-up
        touch(f"{{sync}}/read-{{r}}-{{me}}")
    touch(f"{{sync}}/res-{{r}}-{{me}}", json.dumps({{"won": won, "token": lease.token}}))
    wait_for(f"{{sync}}/res-{{r}}-{{1 - me}}")
    held = lease.read_holder().get("token") == lease.token
    touch(f"{{sync}}/chk-{{r}}-{{me}}", json.dumps({{"holds": held}}))
    wait_for(f"{{sync}}/chk-{{r}}-{{1 - me}}")
    if won:
        lease.release()
    touch(f"{{sync}}/done-{{r}}-{{me}}")
"""


def _wait(path: str, procs, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not os.path.exists(path):
        for p in procs:
            assert p.poll() is None or p.returncode == 0, p.stderr.read()[-3000:]
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.005)


def test_two_processes_racing_for_one_stale_lock_exactly_one_wins(gcs, tmp_path):
    from dpft import atomic_io

    sync = str(tmp_path / "sync")
    os.makedirs(sync)
    script = RACER.format(tests=TESTS, url=URL)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i), sync, str(ROUNDS)], env=gcs, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    winners, takeovers = [], 0
    try:
        for r in range(ROUNDS):
            stale = {"token": f"dead-{r}", "pid": 1, "host": "gone", "since": 0.0, "renewed": time.time() - 10_000}
            atomic_io.write_json(URL + "/.dpft.lock", stale)
            open(os.path.join(sync, f"go-{r}"), "w").close()
            for i in (0, 1):
                _wait(os.path.join(sync, f"done-{r}-{i}"), procs)
            res = [json.load(open(os.path.join(sync, f"res-{r}-{i}"))) for i in (0, 1)]
            chk = [json.load(open(os.path.join(sync, f"chk-{r}-{i}"))) for i in (0, 1)]
            won = [i for i in (0, 1) if res[i]["won"]]
            assert len(won) == 1, f"round {r}: winners {won} (exactly one expected)"
            assert chk[won[0]]["holds"], f"round {r}: the winner's lock was taken from it"
            winners.append(won[0])
            takeovers += 1
            assert not os.path.exists(fake_gcs.local(URL + "/.dpft.lock"))  # released by the winner
        for p in procs:
            p.wait(timeout=120)
            assert p.returncode == 0, p.stderr.read()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert takeovers == ROUNDS


def test_a_stale_lock_judged_by_one_process_is_not_deleted_once_replaced(gcs, capsys):
    """Compare-and-delete: the generation judged stale is the only one a takeover may delete."""
    from dpft import atomic_io
    from dpft.train import remote_lock

    lock = URL + "/.dpft.lock"
    atomic_io.write_json(lock, {"token": "dead", "pid": 1, "host": "gone", "since": 0.0, "renewed": 0.0})
    lease = remote_lock.RemoteLease(lock, URL, lease_s=3600, stale_after_s=60)
    gen, holder = lease._snapshot()
    assert holder["token"] == "dead" and gen == fake_gcs.generation(fake_gcs.local(lock))
    fresh = {"token": "fresh", "pid": 2, "host": "alive", "since": time.time(), "renewed": time.time()}
    atomic_io.write_json(lock, fresh)  # someone else replaced it meanwhile (a new generation)
    assert not lease._delete_generation(gen)
    assert json.loads(open(fake_gcs.local(lock)).read())["token"] == "fresh"


def test_renewal_never_writes_the_lock_object(gcs):
    """The heartbeat writes only its own beat object: a takeover is never overwritten by it."""
    from dpft.train import remote_lock

    lease = remote_lock.RemoteLease(URL + "/.dpft.lock", URL, lease_s=3600)
    lease.acquire(str)
    try:
        gen = fake_gcs.generation(fake_gcs.local(URL + "/.dpft.lock"))
        first = lease.read_holder()["renewed"]
        time.sleep(0.01)
        assert lease.renew() and lease.read_holder()["renewed"] > first
        assert fake_gcs.generation(fake_gcs.local(URL + "/.dpft.lock")) == gen  # untouched
        assert os.path.isfile(fake_gcs.local(f"{URL}/.dpft.lock.beat.{lease.token}"))
    finally:
        lease.release()
    assert not os.listdir(fake_gcs.local(URL))  # lock and beat objects gone
