"""compile_thread_yields: while XLA:CPU compiles, the thread that compiles runs under
SCHED_IDLE, so that XLA's codegen threads keep up with it (the peak RSS of a run;
benchmarks/README.md, Memory). JAX does not name its threads: these tests check the right
one is found, on a training program compiled as the command line compiles it (MLIR fusion
emitters on)."""

import contextlib
import os
import sys
import threading

import jax
import pytest

import ppo_jax as P
from helpers import tiny_config

pytestmark = pytest.mark.skipif(sys.platform != "linux",
                                reason="scheduling policy is per thread on Linux")

EMITTERS_ON = {"xla_cpu_use_fusion_emitters": True}  # conftest turns them off


@pytest.fixture(scope="module")
def lowered_run():
    config = tiny_config(compile_cache=False)
    runner = P.make_runner(config)
    return runner.run.lower(jax.eval_shape(runner.init, P.seed_keys(config)))


@pytest.fixture
def no_compilation_cache():
    """Compile for real, even if an earlier test turned JAX's persistent cache on."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", enabled)


def python_threads() -> set[int]:
    return {thread.native_id for thread in threading.enumerate()}


def test_the_thread_that_compiles_is_demoted_and_given_back(lowered_run, no_compilation_cache,
                                                              monkeypatch):
    # Whatever else runs on the machine, count only this process's CPU time.
    monkeypatch.setattr(P, "machine_busy_ticks", lambda: sum(P.thread_cpu_ticks().values()))
    # The threads that run programs: they must not be taken for the compile thread.
    square = jax.jit(lambda x: x @ x).lower(jax.numpy.ones((256, 256))).compile()
    before = P.thread_cpu_ticks()
    for _ in range(20):
        jax.block_until_ready(square(jax.numpy.ones((256, 256))))
    runners = {tid for tid, ticks in P.thread_cpu_ticks().items()
               if ticks > before.get(tid, 0) and tid not in python_threads()}
    # An independent account of the compile thread: XLA's HLO passes run on it alone, so it
    # has the most CPU time gained while no other thread (outside Python's) gained any.
    alone, policies_seen, done = {}, {}, threading.Event()

    def watch():
        last = P.thread_cpu_ticks()
        while not done.wait(0.01):
            now = P.thread_cpu_ticks()
            gained = {tid: ticks - last.get(tid, 0) for tid, ticks in now.items()
                      if ticks > last.get(tid, 0) and tid not in python_threads()}
            if len(gained) == 1:
                (tid, ticks), = gained.items()
                alone[tid] = alone.get(tid, 0) + ticks
            for tid in now:
                with contextlib.suppress(OSError):  # a thread that ended
                    policies_seen.setdefault(tid, set()).add(os.sched_getscheduler(tid))
            last = now

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with P.compile_thread_yields() as found:
        lowered_run.compile(compiler_options=EMITTERS_ON)
    done.set()
    watcher.join()

    assert len(found) == 1
    tid, policy, _ = found[0]
    assert tid == max(alone, key=alone.get), alone
    assert tid not in python_threads() and tid not in runners
    assert os.SCHED_IDLE in policies_seen[tid]
    assert not any(os.SCHED_IDLE in seen for other, seen in policies_seen.items() if other != tid)
    # Leaving SCHED_IDLE needs CAP_SYS_NICE (root); without it the thread stays idle-class
    # (from this compile, or from an earlier test's: then it is found so already).
    after = os.sched_getscheduler(tid)
    assert after == (policy if os.geteuid() == 0 else os.SCHED_IDLE)


class FakeThreads:
    """thread_cpu_ticks and machine_busy_ticks for a compile thread (id 1) that uses a
    core, XLA threads that use a little, and other processes that use `others` cores."""

    def __init__(self, others: float):
        self.others, self.start, self.tick = others, P.time.perf_counter(), os.sysconf("SC_CLK_TCK")

    def threads(self) -> dict[int, int]:
        seconds = P.time.perf_counter() - self.start
        return {1: int(self.tick * seconds), 2: int(0.2 * self.tick * seconds)}

    def machine(self) -> int:
        seconds = P.time.perf_counter() - self.start
        return sum(self.threads().values()) + int(self.others * self.tick * seconds)


OTHER, IDLE = getattr(os, "SCHED_OTHER", 0), getattr(os, "SCHED_IDLE", 5)  # Linux's values


@pytest.mark.parametrize("others, policy, found", [
    (0.0, OTHER, [(1, OTHER)]), (0.3, OTHER, [(1, OTHER)]), (2.0, OTHER, []),
    # A blip: 0.06 s over the 0.1 s it takes to find the thread, like the 0.09 to 0.11 s seen
    # with nothing else running. More than half a core, yet no reason to leave it.
    (0.6, OTHER, [(1, OTHER)]),
    (0.0, IDLE, [(1, IDLE)]),  # idle-class already (an earlier compile, without root): left so
])
def test_demotes_only_while_other_processes_leave_the_cpu_free(others, policy, found,
                                                               monkeypatch):
    fake, policies, set_to = FakeThreads(others), {1: policy, 2: OTHER}, []
    monkeypatch.setattr(P, "thread_cpu_ticks", fake.threads)
    monkeypatch.setattr(P, "machine_busy_ticks", fake.machine)
    monkeypatch.setattr(P.os, "sched_getscheduler", lambda tid: policies[tid])
    monkeypatch.setattr(P.os, "sched_getparam", lambda tid: "param")

    def sched_setscheduler(tid, new_policy, param):
        set_to.append((tid, new_policy))
        policies[tid] = new_policy

    monkeypatch.setattr(P.os, "sched_setscheduler", sched_setscheduler)
    with P.compile_thread_yields() as reported:
        P.time.sleep(0.25)  # a compile
        during = dict(policies)
    assert [(tid, before) for tid, before, _ in reported] == found
    assert during == ({1: IDLE, 2: OTHER} if found else {1: policy, 2: OTHER})
    assert policies == {1: policy, 2: OTHER}  # given back (as root may)
    if not found:
        assert set_to == []
    elif policy == IDLE:
        assert set_to == [(1, IDLE)]  # only the giving back, to what it was


def test_nothing_is_demoted_when_the_compile_ends_before_a_thread_stands_out(monkeypatch):
    fake = FakeThreads(0.0)
    monkeypatch.setattr(P, "thread_cpu_ticks", fake.threads)
    monkeypatch.setattr(P, "machine_busy_ticks", fake.machine)
    with P.compile_thread_yields() as found:
        pass
    assert found == []


def test_an_unreadable_proc_leaves_the_compile_alone(monkeypatch):
    def unreadable():
        raise PermissionError("/proc/self/task")

    errors = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    monkeypatch.setattr(P, "thread_cpu_ticks", unreadable)
    with P.compile_thread_yields() as found:
        P.time.sleep(0.05)
    assert found == [] and errors == []
