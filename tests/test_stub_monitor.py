"""zsad-serve's stub monitor, round by round on scripted process tables and repository indexes (no tritonserver):
it reloads a model only for a serving stub that stays gone two rounds while Triton lists its version READY, and
leaves alone what Triton retires or swaps itself (tests/test_hostile.py checks the same against a real server)."""
import pytest

from zsad.serve import server as S
from zsad.serve.server import Stub, TritonServer


class _Rounds:
    """Stands in for the monitor's stop event: each wait() starts the next scripted round; True after the last."""

    def __init__(self, n: int):
        self.n, self.round = n, -1

    def wait(self, _timeout):
        self.round += 1
        return self.round >= self.n

    def set(self):
        pass


class _Process:
    pid = 4242

    def poll(self):
        return None


def _run(monkeypatch, tmp_path, tables: list[dict[int, Stub]], indexes) -> tuple[list[tuple[str, int]], TritonServer]:
    """Run the monitor over ``tables`` (round 0 is what it sees at start) and ``indexes`` (Triton's index in rounds
    1.., one per round after the first table: a list, or a callable of the round); returns its reloads
    [(model, pid)] and the server object."""
    srv = TritonServer(tmp_path)
    srv.process = _Process()  # type: ignore[assignment]
    rounds = _Rounds(len(tables))
    srv._stop_monitor = rounds  # type: ignore[assignment]
    monkeypatch.setattr(S, "python_stubs", lambda pid: tables[max(rounds.round, 0)])
    index = indexes if callable(indexes) else lambda round_: indexes[round_ - 1]
    monkeypatch.setattr(srv, "models", lambda: index(rounds.round))
    reloads: list[tuple[str, int]] = []
    monkeypatch.setattr(srv, "_reload", lambda model, pid: reloads.append((model, pid)))
    srv._watch_stubs()
    return reloads, srv


def _index(**states: str) -> list[dict]:
    return [{"name": name, "version": "1", "state": state} for name, state in states.items()]


A = Stub("enc", "enc_0_0", "shm-a", "1")
B = Stub("head", "head_0_0", "shm-b", "1")
CONFIG = Stub("head", "head", "shm-c", "1")  # the stub Triton starts to complete a config at load: exits by itself
READY = _index(enc="READY", head="READY")


def test_a_stub_gone_two_rounds_while_ready_is_reloaded_once(monkeypatch, tmp_path):
    tables = [{1: A, 2: B}, {1: A}, {1: A}, {1: A, 3: B}]
    assert _run(monkeypatch, tmp_path, tables, [READY] * 3)[0] == [("head", 2)]


def test_a_death_seen_while_another_model_is_reloaded_is_still_judged(monkeypatch, tmp_path):
    # head's stub dies first, enc's one round later: head is reloaded in round 2, enc (a suspect then) in round 3
    c = Stub("tail", "tail_0_0", "shm-e", "1")
    tables = [{1: A, 2: B, 4: c}, {1: A, 4: c}, {4: c}, {4: c}, {4: c}]
    assert _run(monkeypatch, tmp_path, tables, [READY] * 4)[0] == [("head", 2), ("enc", 1)]


def test_a_stub_gone_for_one_round_only_is_not_reloaded(monkeypatch, tmp_path):
    # Triton swapping the stubs of a model whose files changed: none listed for a moment, then a new pid
    tables = [{1: A, 2: B}, {1: A}, {1: A, 5: B}, {1: A, 5: B}]
    assert _run(monkeypatch, tmp_path, tables, [READY] * 3)[0] == []


def test_a_stub_of_a_version_triton_retired_is_not_reloaded(monkeypatch, tmp_path):
    # an unload (or the old version after a switch): the index no longer says READY
    for state in ("UNLOADING", "UNAVAILABLE"):
        tables = [{1: A, 2: B}, {1: A}, {1: A}, {1: A}]
        assert _run(monkeypatch, tmp_path, tables, [_index(enc="READY", head=state)] * 3)[0] == [], state
    # only version 1 retired while version 2 (another folder, same instance name) serves on
    b2 = Stub("head", "head_0_0", "shm-d", "2")
    tables = [{1: A, 2: B, 6: b2}, {1: A, 6: b2}, {1: A, 6: b2}]
    index = [*_index(enc="READY"), {"name": "head", "version": "2", "state": "READY"},
             {"name": "head", "version": "1", "state": "UNLOADING"}]
    assert _run(monkeypatch, tmp_path, tables, [index] * 2)[0] == []


def test_the_config_stub_exiting_is_not_a_death(monkeypatch, tmp_path):
    tables = [{1: A, 2: B, 7: CONFIG}, {1: A, 2: B}, {1: A, 2: B}, {1: A, 2: B}]
    assert _run(monkeypatch, tmp_path, tables, [READY] * 3)[0] == []


@pytest.mark.parametrize("error", [OSError("connection refused"), ValueError("bad JSON")])
def test_no_answer_from_triton_postpones_the_verdict(monkeypatch, tmp_path, error):
    """The index could not be read: nothing reloaded that round, the gone stub still judged on the next ones."""
    tables = [{1: A, 2: B}, {1: A}, {1: A}, {1: A}]

    def index(round_):
        if round_ == 1:
            raise error
        return READY

    reloads, srv = _run(monkeypatch, tmp_path, tables, index)
    assert reloads == [("head", 2)]
    assert srv._shm_regions == {"shm-a", "shm-b"}
