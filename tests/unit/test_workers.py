"""The pieces of ``--workers`` that need no processes: the setting, the control
channel (two ends joined in memory, on a Clock), ``Cluster.call`` and the
access log's whole-line writes."""

from __future__ import annotations

import fcntl
import os

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from afpa.ops.accesslog import AccessLog
from afpa.cli import build_parser, settings_from_args
from afpa.config import Settings, SettingError
from afpa.process.control import Channel, ControlError
from afpa.process.supervisor import Cluster, _how_it_ended


# -- the setting ------------------------------------------------------------------

def test_workers_setting_from_file_and_command_line(tmp_path):
    assert Settings().workers == 1  # one process, no supervisor, as before
    cfg = tmp_path / "afpa.toml"
    cfg.write_text('workers = "auto"\n')
    s = settings_from_args(build_parser().parse_args(["serve", "--config", str(cfg)]))
    assert s.workers == (os.cpu_count() or 1)
    s = settings_from_args(build_parser().parse_args(["serve", "--config", str(cfg), "--workers", "3"]))
    assert s.workers == 3
    assert settings_from_args(build_parser().parse_args(["serve", "--workers", "auto"])).workers >= 1


@pytest.mark.parametrize("text", ['workers = "x"', "workers = 0", "workers = 1.5", "workers = true"])
def test_bad_workers_in_a_config_file_is_one_line(tmp_path, text):
    cfg = tmp_path / "afpa.toml"
    cfg.write_text(text)
    with pytest.raises(ValueError) as info:
        settings_from_args(build_parser().parse_args(["serve", "--config", str(cfg)]))
    message = str(info.value)
    assert message.startswith(f"{cfg}: workers: expected a positive whole number or \"auto\"")
    assert "\n" not in message
    with pytest.raises(SettingError):
        Settings(workers=0)


@pytest.mark.parametrize("value", ["0", "-1", "x", "2.5"])
def test_bad_workers_on_the_command_line_is_one_line(capsys, value):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--workers", value])
    err = capsys.readouterr().err
    assert "argument --workers: expected a positive whole number or \"auto\"" in err and err.count("\n") == 1


def test_worker_slot_flag_is_hidden():
    assert "--worker-slot" not in build_parser()._subparsers._group_actions[0].choices["serve"].format_help()


# -- the control channel ----------------------------------------------------------

class _Pipe:
    """A transport delivering writes to the peer channel (in memory)."""

    def __init__(self):
        self.own: Channel | None = None
        self.peer: Channel | None = None
        self.fds: list[int] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        for fd in self.fds:
            self.peer.fileDescriptorReceived(fd)
        self.fds = []
        if not self.closed and self.peer.open:
            self.peer.dataReceived(data)

    def sendFileDescriptor(self, fd: int) -> None:
        self.fds.append(os.dup(fd))  # what SCM_RIGHTS gives the receiver: its own copy

    def loseConnection(self) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True  # a closed socket: both ends see it
            self.own.connectionLost(Failure(ConnectionDone()))
            self.peer.connectionLost(Failure(ConnectionDone()))


def joined(handlers_a: dict, handlers_b: dict, clock: Clock) -> tuple[Channel, Channel, _Pipe, _Pipe]:
    a, b = Channel(handlers_a, clock), Channel(handlers_b, clock)
    ta, tb = _Pipe(), _Pipe()
    ta.peer, tb.peer = b, a
    ta.own, tb.own = a, b
    a.makeConnection(ta)
    b.makeConnection(tb)
    return a, b, ta, tb


def results(d: Deferred) -> list:
    out: list = []
    d.addBoth(out.append)
    return out


def test_request_reply_error_and_unknown_op():
    clock = Clock()
    a, b, _, _ = joined({}, {"add": lambda args, fds: {"sum": args["x"] + args["y"]},
                             "bad": lambda args, fds: (_ for _ in ()).throw(ValueError("no such thing"))}, clock)
    assert results(a.request("add", {"x": 2, "y": 3})) == [{"sum": 5}]
    [f] = results(a.request("bad", {}))
    assert f.check(ControlError) and f.getErrorMessage() == "no such thing"
    [f] = results(a.request("nope", {}))
    assert f.check(ControlError) and "unknown op 'nope'" in f.getErrorMessage()


def test_a_deferred_answer_a_timeout_and_a_lost_peer_never_hang():
    clock = Clock()
    later: list[Deferred] = []

    def slow(args, fds):
        later.append(Deferred())
        return later[-1]
    a, b, ta, _ = joined({}, {"slow": slow}, clock)
    first = results(a.request("slow", {}, timeout=5))
    later[0].callback({"done": True})
    assert first == [{"done": True}]
    timed_out = results(a.request("slow", {}, timeout=5))
    clock.advance(5)
    assert timed_out[0].check(ControlError) and "5 s" in timed_out[0].getErrorMessage()
    later[1].callback({"late": True})  # an answer after the timeout is dropped
    gone = results(a.request("slow", {}, timeout=5))
    ta.close()  # the peer went away
    assert gone[0].check(ControlError)
    assert results(a.request("slow", {}))[0].check(ControlError)  # closed: fails at once
    assert not clock.getDelayedCalls()


def test_file_descriptors_travel_with_their_request(tmp_path):
    clock = Clock()
    got = []

    def take(args, fds):
        got.append([os.read(fd, 100) for fd in fds])
        for fd in fds:
            os.close(fd)
        return {"n": len(fds)}
    a, b, _, _ = joined({}, {"take": take}, clock)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    os.write(w1, b"one")
    os.write(w2, b"two")
    try:
        assert results(a.request("take", {}, fds=[r1, r2])) == [{"n": 2}]
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)
    assert got == [[b"one", b"two"]]


def test_a_line_split_across_reads_is_one_message():
    clock = Clock()
    seen = []
    a = Channel({"x": lambda args, fds: seen.append(args) or {}}, clock)

    class Sink:
        def write(self, data):
            pass
    a.makeConnection(Sink())
    a.dataReceived(b'{"id": 1, "op": "x", "ar')
    a.dataReceived(b'gs": {"k": 1}}\n{"id": 2, "op": "x", "args": {"k": 2}}\n')
    assert seen == [{"k": 1}, {"k": 2}]


# -- Cluster.call --------------------------------------------------------------------

def test_cluster_call_gives_one_entry_per_live_worker():
    clock = Clock()
    cluster = Cluster(Settings(workers=3), [], [], clock)
    answers = {0: lambda args, fds: {"pid": 100}, 1: lambda args, fds: Deferred(),
               2: lambda args, fds: {"pid": 102}}
    ends = []
    for slot in cluster.slots:
        a, _, _, tb = joined({}, {"ping": answers[slot.index]}, clock)
        slot.channel, slot.pid = a, 100 + slot.index
        ends.append(tb)
    got = results(cluster.call("ping", {}, timeout=5))
    ends[2].close()  # worker 2 exits before answering... it answered synchronously already
    clock.advance(5)  # worker 1 never answers
    [replies] = got
    assert replies[0] == {"worker": 0, "pid": 100}
    assert replies[1]["worker"] == 1 and "within 5 s" in replies[1]["error"]
    assert replies[2] == {"worker": 2, "pid": 102}
    # Worker 2's channel is closed now: it is no longer asked.
    got = results(cluster.call("ping", {}, timeout=5))
    ends[0].close()  # worker 0 dies while asked? it answered at once; worker 1 dies mid-call
    ends[1].close()
    [replies] = got
    assert [r["worker"] for r in replies] == [0, 1]
    assert "went away" in replies[1]["error"]
    assert results(cluster.call("ping", {}, timeout=5)) == [[]]
    assert [w.index for w in cluster.workers] == [0, 1, 2]
    assert set(cluster.workers[0].info()) == {"index", "pid", "started", "restarts", "up"}


def test_how_a_worker_ended_is_said_in_words():
    from twisted.internet.error import ProcessDone, ProcessTerminated
    assert _how_it_ended(Failure(ProcessDone(0))) == "exited with status 0"
    assert _how_it_ended(Failure(ProcessTerminated(3))) == "exited with status 3"
    assert _how_it_ended(Failure(ProcessTerminated(None, 9))) == "was killed by SIGKILL"


# -- the access log with several writers -----------------------------------------

def test_access_log_appends_whole_lines_in_one_write(tmp_path, monkeypatch):
    path = tmp_path / "access.log"
    logs = [AccessLog(str(path), lambda conn, req, now: f"{conn} {'x' * 3000}\n") for _ in range(2)]
    flags = fcntl.fcntl(logs[0].fd, fcntl.F_GETFL)
    assert flags & os.O_APPEND  # the kernel puts every write at the end, whoever wrote before
    writes = []
    real_write = os.write

    def spy(fd, data):
        writes.append(bytes(data))
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", spy)
    for i in range(20):
        logs[i % 2].request(f"w{i % 2}-{i}", None, 0.0)
    logs[0].flush()
    logs[1].flush()
    assert len(writes) == 2 and all(w.endswith(b"\n") and w.count(b"\n") == 10 for w in writes)
    for log in logs:
        log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 20 and all(line.split(" ")[1] == "x" * 3000 for line in lines)


def test_restart_backoff_doubles_to_30s_and_resets_after_a_minute_up():
    from twisted.internet.error import ProcessTerminated

    clock = Clock()
    cluster = Cluster(Settings(workers=1), [], [], clock)
    slot = cluster.slots[0]
    spawned = []

    def spawn(s):
        s.restart_call = None
        s.pid = 1000 + len(spawned)
        s.born = clock.seconds()
        spawned.append(clock.seconds())
    cluster._spawn = spawn
    spawn(slot)
    delays = []
    for uptime in (1, 1, 1, 1, 1, 1, 1, 1, 1, 61, 1):
        clock.advance(uptime)
        died = clock.seconds()
        cluster._ended(slot, slot.pid, Failure(ProcessTerminated(None, 9)))
        clock.advance(clock.getDelayedCalls()[0].getTime() - clock.seconds())
        delays.append(spawned[-1] - died)
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 0.5, 1]
    assert slot.restarts == 11
    cluster._ended(slot, 4242, Failure(ProcessTerminated(None, 9)))  # not the slot's process: ignored
    assert not clock.getDelayedCalls()
    cluster.stopping = True
    cluster._ended(slot, slot.pid, Failure(ProcessTerminated(0)))  # while stopping: no restart
    assert not clock.getDelayedCalls()


def test_a_worker_gets_its_share_of_the_cache_and_the_others_as_siblings():
    from afpa.process.supervisor import SIBLINGS_ENV, worker_settings

    s = Settings(cache_bytes=300 << 20, admin=("127.0.0.1", 9100), workers=3)
    env = {SIBLINGS_ENV: "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003", "AFPA_SIBLING_TOKEN": "t" * 32}
    w = worker_settings(s, 1, 3, env)
    assert (w.worker_index, w.worker_count, w.workers, w.admin) == (1, 3, 1, None)
    assert w.cache_bytes == 100 << 20  # the budget holds for the whole server
    assert w.module_settings.sibling_members == ("127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003")
    assert w.module_settings.sibling_self == 1
    assert worker_settings(s, 0, 3, {}).module_settings is None  # no siblings without the supervisor's list
