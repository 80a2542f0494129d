"""Leader election on a Lease, without a cluster: an in-memory Lease store that answers like the
API server (compare-and-swap on resourceVersion, a stale PUT conflicts), an injected monotonic
and wall clock, and asyncio's waits replaced by ones that advance that clock, so nothing sleeps.

What is pinned: a free, missing or expired Lease is taken; a held one is not before its holder
has gone leaseDurationSeconds without renewing (as this replica observes it); renewals keep
acquireTime and leaseTransitions; a takeover counts a transition; the times are RFC3339 with
microseconds; and a leader that loses the Lease (another holder, renewals failing past the
deadline) sets `lost` and `stop`."""

from __future__ import annotations

import asyncio
import copy
import logging
import types
from datetime import datetime, timedelta, timezone

import pytest

from finetune_operator import kube, leader
from finetune_operator.leader import LeaseElector

NAME, NAMESPACE, ME, OTHER = "finetune-operator", "ops", "replica-a", "replica-b"
WALL0 = datetime(2026, 3, 4, 5, 6, 7, 89, tzinfo=timezone.utc)
T0 = 1000.0  # monotonic seconds at the start: far from 0, so "never observed" cannot pass for "just seen"


def stamp(seconds: float) -> str:
    """The wall time `seconds` after the test's start, as a Lease's MicroTime."""
    return (WALL0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Clock:
    """One clock for both: time.monotonic() and datetime.now() move together."""

    def __init__(self) -> None:
        self.t = T0

    def monotonic(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, seconds
        self.t += seconds

    @property
    def elapsed(self) -> float:
        return self.t - T0


def frozen_datetime(clock: Clock) -> type:
    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            utc = WALL0 + timedelta(seconds=clock.elapsed)
            if tz is None:  # the host's local time, which is not UTC here
                return datetime.fromtimestamp(utc.timestamp(), timezone(timedelta(hours=2))).replace(tzinfo=None)
            return utc.astimezone(tz)

    return FrozenDatetime


class Loop:
    """leader's `asyncio`, with sleep and wait_for that advance the clock instead of waiting.
    `stop` is the event keep() waits on; `during_wait` runs inside each wait (a signal arriving)."""

    LIMIT = 200  # a loop that never ends fails instead of hanging the run

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sleeps: list[float] = []
        self.waits: list[float] = []
        self.stop: asyncio.Event | None = None
        self.during_wait = lambda n: None

    def __getattr__(self, name):
        return getattr(asyncio, name)

    async def sleep(self, seconds):
        self.sleeps.append(seconds)
        if len(self.sleeps) > self.LIMIT:
            raise AssertionError("acquire() kept sleeping")
        self.clock.advance(seconds)
        await asyncio.sleep(0)

    async def wait_for(self, aw, timeout):
        aw.close()  # stop.wait(): what it would return is read from the event itself
        self.waits.append(timeout)
        if len(self.waits) > self.LIMIT:
            raise AssertionError("keep() kept waiting")
        assert self.stop is not None
        if self.stop.is_set():
            return True
        self.clock.advance(timeout)
        self.during_wait(len(self.waits))
        if self.stop.is_set():
            return True
        raise asyncio.TimeoutError


class Leases:
    """The API server's side, for Leases: GET, POST and PUT as kube.get/create/replace see them."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.objects: dict[tuple[str, str], dict] = {}
        self.version = 100
        self.calls: list[tuple[str, dict | None]] = []  # (method, body written)
        self.failures: dict[str, list[Exception]] = {"get": [], "create": [], "replace": []}
        self.before_write = lambda method: None  # another replica writing first
        self.typeless = False  # GET answers without apiVersion and kind, as a list's items do

    def _fail(self, method: str) -> None:
        if self.failures[method]:
            raise self.failures[method].pop(0)

    def _next_version(self) -> str:
        self.version += 1
        return str(self.version)

    @staticmethod
    def _check(obj: dict) -> None:
        version, _ = kube.RESOURCES[obj["kind"]]
        if obj.get("apiVersion") != version:
            raise ValueError(f"400: the API version in the data ({obj.get('apiVersion')}) does not match {version}")

    def put(self, spec: dict | None, *, extra_metadata: dict | None = None) -> dict:
        """Someone else writes the Lease (or the test seeds it)."""
        current = self.objects.get((NAMESPACE, NAME))
        meta = {"name": NAME, "namespace": NAMESPACE, "uid": "lease-uid", "creationTimestamp": "2026-01-01T00:00:00Z"}
        if current:
            meta = dict(current["metadata"])
        meta.update(extra_metadata or {})
        meta["resourceVersion"] = self._next_version()
        obj = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta}
        if spec is not None:
            obj["spec"] = copy.deepcopy(spec)
        self.objects[(NAMESPACE, NAME)] = obj
        return obj

    @property
    def lease(self) -> dict | None:
        return self.objects.get((NAMESPACE, NAME))

    @property
    def spec(self) -> dict:
        return self.lease["spec"]

    @property
    def writes(self) -> list[tuple[str, dict]]:
        return [(method, body) for method, body in self.calls if method != "get"]

    async def get(self, kind, namespace, name):
        kube.RESOURCES[kind]
        assert kind == "Lease", kind
        self.calls.append(("get", None))
        self._fail("get")
        found = copy.deepcopy(self.objects.get((namespace, name)))
        if found is not None and self.typeless:
            del found["apiVersion"], found["kind"]
        return found

    def _writing(self, method: str, obj: dict) -> None:
        """What every write goes through first: recorded, an injected failure, the type check,
        and another replica's write that lands just before it."""
        self.calls.append((method, copy.deepcopy(obj)))
        self._fail(method)
        self._check(obj)
        self.before_write(method)

    async def create(self, obj):
        self._writing("create", obj)
        meta = obj["metadata"]
        if "resourceVersion" in meta:
            raise ValueError("400: resourceVersion should not be set on objects to be created")
        key = (meta["namespace"], meta["name"])
        if key in self.objects:  # 409: kube.create answers with the one that exists
            return copy.deepcopy(self.objects[key]), False
        stored = copy.deepcopy(obj)
        stored["metadata"].update(uid="lease-uid", creationTimestamp="2026-01-01T00:00:00Z",
                                  resourceVersion=self._next_version())
        self.objects[key] = stored
        return copy.deepcopy(stored), True

    async def replace(self, obj):
        self._writing("replace", obj)
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        current = self.objects.get(key)
        if current is None:  # 404, which kube.replace answers as None
            return None
        if meta.get("resourceVersion") not in (None, current["metadata"]["resourceVersion"]):
            return None  # 409 Conflict: someone else wrote since this was read
        stored = copy.deepcopy(obj)
        stored["metadata"].update(uid=current["metadata"]["uid"],
                                  creationTimestamp=current["metadata"]["creationTimestamp"],
                                  resourceVersion=self._next_version())
        self.objects[key] = stored
        return copy.deepcopy(stored)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(leader, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    monkeypatch.setattr(leader, "datetime", frozen_datetime(clock))
    return clock


@pytest.fixture
def loop(monkeypatch, clock) -> Loop:
    loop = Loop(clock)
    monkeypatch.setattr(leader, "asyncio", loop)
    return loop


@pytest.fixture
def api(monkeypatch, clock) -> Leases:
    api = Leases(clock)
    monkeypatch.setattr(kube, "get", api.get)
    monkeypatch.setattr(kube, "create", api.create)
    monkeypatch.setattr(kube, "replace", api.replace)
    return api


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="finetune_operator.leader")

    def read() -> list[tuple[str, str]]:
        return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "finetune_operator.leader"]

    return read


def elector(identity=ME, **kwargs) -> LeaseElector:
    return LeaseElector(NAME, NAMESPACE, identity, **kwargs)


def held(holder=OTHER, *, duration=15, transitions=3, acquired=-100.0, renewed=-1.0) -> dict:
    return {"holderIdentity": holder, "leaseDurationSeconds": duration, "acquireTime": stamp(acquired),
            "renewTime": stamp(renewed), "leaseTransitions": transitions}


# --- the time fields and the defaults ---------------------------------------------------------


def test_times_are_utc_rfc3339_with_microseconds(clock):
    assert leader._now() == "2026-03-04T05:06:07.000089Z"
    clock.advance(3600.5)
    assert leader._now() == "2026-03-04T06:06:07.500089Z"


def test_the_real_clock_writes_utc_microtime(monkeypatch):
    before = datetime.now(timezone.utc)
    written = datetime.strptime(leader._now(), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    after = datetime.now(timezone.utc)
    assert before - timedelta(seconds=1) <= written <= after + timedelta(seconds=1)


def test_defaults_follow_client_go():
    e = elector()
    assert (e.name, e.namespace, e.identity) == (NAME, NAMESPACE, ME)
    assert (e.lease_seconds, e.renew_seconds, e.retry_seconds, e.renew_deadline) == (15, 5, 2, 10)
    assert not e.lost.is_set()
    assert e._observed == (None, 0.0)


# --- try_acquire_or_renew: one round of the protocol --------------------------------------------


async def test_a_missing_lease_is_created_with_this_replica_holding_it(clock, api):
    clock.advance(2.25)
    assert await elector(lease_seconds=20).try_acquire_or_renew() is True
    [(method, body)] = api.writes
    assert method == "create"
    assert body == {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {"holderIdentity": ME, "leaseDurationSeconds": 20, "acquireTime": stamp(2.25),
                 "renewTime": stamp(2.25), "leaseTransitions": 0},
    }
    assert api.spec["holderIdentity"] == ME


async def test_a_lease_another_replica_created_first_is_not_ours(api):
    api.before_write = lambda method: api.put(held(OTHER, transitions=0)) if api.lease is None else None
    assert await elector().try_acquire_or_renew() is False
    assert api.spec["holderIdentity"] == OTHER


async def test_a_held_lease_is_not_taken_before_it_expires(clock, api):
    api.put(held(OTHER, duration=15, transitions=3))
    candidate = elector(lease_seconds=40)  # the holder's leaseDurationSeconds counts, not ours
    assert await candidate.try_acquire_or_renew() is False
    clock.advance(15)  # exactly leaseDurationSeconds since this replica saw it change: not yet
    assert await candidate.try_acquire_or_renew() is False
    assert api.writes == [] and api.spec["holderIdentity"] == OTHER
    clock.advance(0.5)
    assert await candidate.try_acquire_or_renew() is True
    [(method, body)] = api.writes
    assert method == "replace"
    # The Lease as read (a compare-and-swap on its resourceVersion), its spec rewritten.
    assert body["metadata"] == {"name": NAME, "namespace": NAMESPACE, "resourceVersion": "101",
                                "uid": "lease-uid", "creationTimestamp": "2026-01-01T00:00:00Z"}
    assert (body["apiVersion"], body["kind"]) == ("coordination.k8s.io/v1", "Lease")
    assert api.spec == {"holderIdentity": ME, "leaseDurationSeconds": 40, "acquireTime": stamp(15.5),
                        "renewTime": stamp(15.5), "leaseTransitions": 4}


async def test_a_renewal_keeps_the_leases_labels_annotations_and_unknown_fields(clock, api):
    """A Lease installed by Helm (labels) or given fields this code does not set (a newer API's
    strategy) keeps them through every takeover and renewal."""
    api.put({**held(OTHER, duration=15), "strategy": "OldestEmulationVersion"},
            extra_metadata={"labels": {"app.kubernetes.io/managed-by": "Helm"}, "annotations": {"note": "x"}})
    candidate = elector()
    assert await candidate.try_acquire_or_renew() is False
    clock.advance(16)
    assert await candidate.try_acquire_or_renew() is True  # a takeover
    clock.advance(5)
    assert await candidate.try_acquire_or_renew() is True  # a renewal
    lease = api.lease
    assert lease["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "Helm"}
    assert lease["metadata"]["annotations"] == {"note": "x"}
    assert lease["spec"]["strategy"] == "OldestEmulationVersion" and lease["spec"]["holderIdentity"] == ME


async def test_the_holders_renewals_restart_the_wait(clock, api):
    api.put(held(OTHER, duration=15))
    candidate = elector()
    assert await candidate.try_acquire_or_renew() is False
    clock.advance(10)
    api.put(held(OTHER, duration=15, renewed=10))  # the holder renews: a new resourceVersion
    clock.advance(10)
    assert await candidate.try_acquire_or_renew() is False  # 20 s since the first sight: the change is seen now
    clock.advance(15)
    assert await candidate.try_acquire_or_renew() is False  # 15 s since it saw the change
    clock.advance(0.25)
    assert await candidate.try_acquire_or_renew() is True
    assert api.spec["holderIdentity"] == ME


async def test_the_wait_is_timed_from_when_this_replica_first_saw_the_record(clock, api):
    api.put(held(OTHER, duration=15, renewed=-3600))  # renewTime long ago, by another host's clock
    candidate = elector()
    clock.advance(100)
    assert await candidate.try_acquire_or_renew() is False  # first sight: the wait starts now
    clock.advance(15.5)
    assert await candidate.try_acquire_or_renew() is True


@pytest.mark.parametrize("duration", [None, 0])
async def test_without_a_duration_on_the_lease_our_own_counts(clock, api, duration):
    spec = held(OTHER)
    spec["leaseDurationSeconds"] = duration
    api.put(spec)
    candidate = elector(lease_seconds=4)
    assert await candidate.try_acquire_or_renew() is False
    clock.advance(4)
    assert await candidate.try_acquire_or_renew() is False
    clock.advance(0.5)
    assert await candidate.try_acquire_or_renew() is True


@pytest.mark.parametrize(("spec", "transitions"), [
    ({"holderIdentity": "", "leaseDurationSeconds": 1, "leaseTransitions": 2}, 3),  # released
    ({"holderIdentity": None, "leaseDurationSeconds": 15}, 1),
    ({"leaseDurationSeconds": 15}, 1),
    (None, 1),  # a Lease with no spec at all
])
async def test_a_free_lease_is_taken_at_once(clock, api, spec, transitions):
    api.put(spec)
    clock.advance(1)
    assert await elector().try_acquire_or_renew() is True
    assert api.spec == {"holderIdentity": ME, "leaseDurationSeconds": 15, "acquireTime": stamp(1),
                        "renewTime": stamp(1), "leaseTransitions": transitions}


async def test_a_renewal_keeps_acquire_time_and_transitions(clock, api):
    api.put(held(ME, duration=15, transitions=3, acquired=-50, renewed=-5))
    e = elector(lease_seconds=15)
    for n in range(1, 4):
        clock.advance(5)
        assert await e.try_acquire_or_renew() is True
        assert api.spec == {"holderIdentity": ME, "leaseDurationSeconds": 15, "acquireTime": stamp(-50),
                            "renewTime": stamp(5 * n), "leaseTransitions": 3}
    assert [m for m, _ in api.writes] == ["replace"] * 3


async def test_renewing_a_lease_without_acquire_time_or_transitions_fills_them(clock, api):
    api.put({"holderIdentity": ME, "leaseDurationSeconds": 15})
    clock.advance(7)
    assert await elector().try_acquire_or_renew() is True
    assert api.spec == {"holderIdentity": ME, "leaseDurationSeconds": 15, "acquireTime": stamp(7),
                        "renewTime": stamp(7), "leaseTransitions": 0}


async def test_a_takeover_that_loses_the_race_changes_nothing(clock, api):
    api.put(held(OTHER, duration=15, transitions=3))
    candidate = elector()
    assert await candidate.try_acquire_or_renew() is False
    clock.advance(16)
    # The holder renews between our read and our write: our PUT carries a stale resourceVersion.
    api.before_write = lambda method: api.put(held(OTHER, duration=15, transitions=3, renewed=16))
    assert await candidate.try_acquire_or_renew() is False
    api.before_write = lambda method: None
    assert api.spec == held(OTHER, duration=15, transitions=3, renewed=16)
    # That renewal restarts the wait, from when this replica next reads it.
    clock.advance(1)
    assert await candidate.try_acquire_or_renew() is False
    clock.advance(15)
    assert await candidate.try_acquire_or_renew() is False
    clock.advance(0.5)
    assert await candidate.try_acquire_or_renew() is True


async def test_a_renewal_that_conflicts_is_not_a_renewal(clock, api):
    api.put(held(ME, transitions=1))
    api.before_write = lambda method: api.put(held(OTHER, transitions=2))
    assert await elector().try_acquire_or_renew() is False
    assert api.spec["holderIdentity"] == OTHER


async def test_api_errors_reach_the_caller(api):
    api.failures["get"].append(ConnectionError("API server unavailable"))
    with pytest.raises(ConnectionError):
        await elector().try_acquire_or_renew()


async def test_two_replicas_never_both_lead(clock, api):
    a, b = elector(ME), elector(OTHER)
    assert await a.try_acquire_or_renew() is True
    assert await b.try_acquire_or_renew() is False
    for _ in range(5):  # a renews every 5 s; b never gets it
        clock.advance(5)
        assert await a.try_acquire_or_renew() is True
        assert await b.try_acquire_or_renew() is False
    clock.advance(15.5)  # a stops renewing
    assert await b.try_acquire_or_renew() is True
    assert api.spec["holderIdentity"] == OTHER and api.spec["leaseTransitions"] == 1
    assert await a.try_acquire_or_renew() is False  # a sees b's fresh record
    assert api.spec["holderIdentity"] == OTHER


# --- acquire: wait for the Lease ----------------------------------------------------------------


async def test_acquire_takes_a_free_lease_without_waiting(loop, api, logs):
    await elector().acquire()
    assert loop.sleeps == [] and api.spec["holderIdentity"] == ME
    assert logs() == [("INFO", f"waiting to lead as {ME} (Lease {NAMESPACE}/{NAME})"),
                      ("INFO", f"became leader as {ME}")]


async def test_acquire_waits_out_a_held_lease_then_takes_it(clock, loop, api, logs):
    api.put(held(OTHER, duration=15, transitions=3))
    await elector(retry_seconds=4).acquire()
    assert loop.sleeps == [4, 4, 4, 4]  # 16 s > 15 s
    assert api.spec["holderIdentity"] == ME and api.spec["leaseTransitions"] == 4
    assert logs() == [("INFO", f"waiting to lead as {ME} (Lease {NAMESPACE}/{NAME})"),
                      ("INFO", f"became leader as {ME}")]


async def test_acquire_keeps_trying_through_api_errors(loop, api, logs):
    api.failures["get"] += [ConnectionError("API server unavailable"), ConnectionError("still down")]
    await elector(retry_seconds=0.5).acquire()
    assert loop.sleeps == [0.5, 0.5]
    assert api.spec["holderIdentity"] == ME
    assert logs() == [("INFO", f"waiting to lead as {ME} (Lease {NAMESPACE}/{NAME})"),
                      ("WARNING", "leader election: API server unavailable"),
                      ("WARNING", "leader election: still down"),
                      ("INFO", f"became leader as {ME}")]


# --- keep: renew, or stop --------------------------------------------------------------------------


async def leading(api, clock, **kwargs) -> LeaseElector:
    e = elector(**kwargs)
    assert await e.try_acquire_or_renew() is True
    api.calls.clear()
    return e


async def test_keep_returns_at_once_when_already_stopped(clock, loop, api):
    e = await leading(api, clock)
    loop.stop = stop = asyncio.Event()
    stop.set()
    await e.keep(stop)
    assert loop.waits == [] and api.calls == [] and not e.lost.is_set()


async def test_keep_renews_every_renew_seconds_until_stopped(clock, loop, api, logs):
    e = await leading(api, clock, renew_seconds=3)
    loop.stop = stop = asyncio.Event()
    loop.during_wait = lambda n: stop.set() if n == 4 else None  # SIGTERM during the 4th wait
    await e.keep(stop)
    assert loop.waits == [3, 3, 3, 3]
    assert [m for m, _ in api.writes] == ["replace"] * 3
    assert api.spec["holderIdentity"] == ME and api.spec["renewTime"] == stamp(9)
    assert not e.lost.is_set() and logs() == []


async def test_keep_stops_the_operator_when_another_replica_takes_the_lease(clock, loop, api, logs):
    e = await leading(api, clock, renew_seconds=5)
    loop.stop = stop = asyncio.Event()
    loop.during_wait = lambda n: api.put(held(OTHER, transitions=1, renewed=clock.elapsed)) if n == 2 else None
    await e.keep(stop)
    assert e.lost.is_set() and stop.is_set()
    assert loop.waits == [5, 5]
    assert [m for m, _ in api.writes] == ["replace"]  # the first renewal; none over the new holder
    assert api.spec["holderIdentity"] == OTHER
    assert logs() == [("ERROR", "leadership taken over by another replica")]


async def test_keep_retries_failed_renewals_until_the_deadline(clock, loop, api, logs):
    e = await leading(api, clock, renew_seconds=4, renew_deadline=8)
    loop.stop = stop = asyncio.Event()
    down = ConnectionError("API server unavailable")
    # t=4 fails (4 s since leading), t=8 renews, t=12 fails (4 s), t=16 fails: 8 s, the deadline.
    outcomes = iter([down, None, down, down])

    def during_wait(n):
        failure = next(outcomes)
        if failure is not None:
            api.failures["get"].append(failure)

    loop.during_wait = during_wait
    await e.keep(stop)
    assert e.lost.is_set() and stop.is_set()
    assert clock.elapsed == 16 and loop.waits == [4, 4, 4, 4]
    assert [m for m, _ in api.writes] == ["replace"] and api.spec["renewTime"] == stamp(8)
    assert logs() == [("WARNING", "could not renew the Lease, retrying: API server unavailable"),
                      ("WARNING", "could not renew the Lease, retrying: API server unavailable"),
                      ("ERROR", "could not renew the Lease within 8s: API server unavailable")]


async def test_keep_gives_up_at_once_with_a_deadline_shorter_than_the_renewal(clock, loop, api, logs):
    e = await leading(api, clock, renew_seconds=5, renew_deadline=3)
    loop.stop = stop = asyncio.Event()
    api.failures["replace"].append(ConnectionError("reset"))
    await e.keep(stop)
    assert e.lost.is_set() and stop.is_set() and loop.waits == [5]
    assert logs() == [("ERROR", "could not renew the Lease within 3s: reset")]


async def test_keep_then_release_hands_over(clock, loop, api):
    a = await leading(api, clock, renew_seconds=5)
    loop.stop = stop = asyncio.Event()
    loop.during_wait = lambda n: stop.set() if n == 3 else None
    await a.keep(stop)
    assert not a.lost.is_set()
    await a.release()
    assert await elector(OTHER).try_acquire_or_renew() is True


# --- release: hand the Lease back ---------------------------------------------------------------


async def test_release_frees_the_lease_for_an_immediate_takeover(clock, api, logs):
    api.put(held(ME, duration=15, transitions=2, acquired=-30, renewed=-2), extra_metadata={"labels": {"app": "op"}})
    clock.advance(3)
    await elector().release()
    [(method, body)] = api.writes
    assert method == "replace"
    assert (body["apiVersion"], body["kind"]) == ("coordination.k8s.io/v1", "Lease")
    assert body["metadata"]["resourceVersion"] == "101"
    assert api.spec == {"holderIdentity": "", "leaseDurationSeconds": 1, "acquireTime": stamp(-30),
                        "renewTime": stamp(3), "leaseTransitions": 2}
    assert api.lease["metadata"]["labels"] == {"app": "op"}
    assert logs() == []
    # Another replica takes it at once, not after 15 s.
    assert await elector(OTHER).try_acquire_or_renew() is True
    assert api.spec["holderIdentity"] == OTHER and api.spec["leaseTransitions"] == 3


async def test_release_writes_a_whole_lease_even_from_a_read_without_its_type(clock, api, logs):
    api.put(held(ME, transitions=2))
    api.typeless = True
    await elector().release()
    [(method, body)] = api.writes
    assert (body["apiVersion"], body["kind"]) == ("coordination.k8s.io/v1", "Lease")
    assert api.spec["holderIdentity"] == "" and api.spec["leaseDurationSeconds"] == 1
    assert logs() == []


@pytest.mark.parametrize("spec", [held(OTHER), {"holderIdentity": ""}, None])
async def test_release_leaves_a_lease_it_does_not_hold(api, logs, spec):
    api.put(spec)
    before = copy.deepcopy(api.lease)
    await elector().release()
    assert api.writes == [] and api.lease == before and logs() == []


async def test_release_without_a_lease_writes_nothing(api, logs):
    await elector().release()
    assert api.writes == [] and api.lease is None and logs() == []


@pytest.mark.parametrize("method", ["get", "replace"])
async def test_release_failing_is_only_logged(api, logs, method):
    api.put(held(ME))
    api.failures[method].append(ConnectionError("API server unavailable"))
    await elector().release()
    assert api.spec["holderIdentity"] == ME
    assert logs() == [("WARNING", "could not release the Lease: API server unavailable")]


async def test_release_does_not_overwrite_a_newer_record(api):
    api.put(held(ME))
    api.before_write = lambda method: api.put(held(OTHER, transitions=4))
    await elector().release()
    assert api.spec == held(OTHER, transitions=4)


async def test_a_renewal_that_hangs_is_given_up_at_the_deadline(clock, loop, api, logs, monkeypatch):
    """A renewal whose call never returns (a connection gone silent) must not keep the leader
    acting past its deadline, after which a standby may take the expired Lease."""
    e = await leading(api, clock, renew_seconds=0.05, renew_deadline=0.1)
    loop.stop = stop = asyncio.Event()
    hung = asyncio.Event()

    async def never_answers(kind, namespace, name):
        hung.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(kube, "get", never_answers)
    await asyncio.wait_for(e.keep(stop), timeout=30)  # the real clock: the bound is real time
    assert hung.is_set() and e.lost.is_set() and stop.is_set()
    assert logs()[-1] == ("ERROR", "could not renew the Lease within 0.1s: the API server did not answer in time")
