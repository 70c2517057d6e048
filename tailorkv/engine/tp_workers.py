"""Tensor parallelism's other ranks. Rank 0 is the Engine: it schedules, samples and detokenizes once; ranks 1 ..
N-1 are processes it starts (torch.multiprocessing, forkserver), each holding its slice of the model and its own KV
policy over its own KV heads. Every call that changes a policy's state or runs the model (`add_request`, `grow`,
`release`, `forward`) is broadcast from rank 0 before rank 0 runs it, so every rank runs the same calls in the
same order and stays in lockstep (the model's all-reduces meet); so is a calibration (`EngineRank.calibrate`), at
start before the caches are built or later (`tailorkv calibrate --tp N`)."""

from __future__ import annotations

import ctypes
import queue
import signal
import socket

import torch
import torch.multiprocessing as mp

from ..config import EngineConfig
from ..distributed.group import TPGroup

POLICY_CALLS = ("add_request", "grow", "release")
RUNNER_CALLS = ("forward", "run")


class Broadcasting:
    """`target` (a KV policy or the model runner) whose `calls` are first sent to every other rank."""

    def __init__(self, name: str, target, calls: tuple[str, ...], group: TPGroup):
        self._name, self._target, self._calls, self._group = name, target, calls, group

    def __getattr__(self, attr: str):
        value = getattr(self._target, attr)
        if attr not in self._calls:
            return value

        def call(*args, **kwargs):
            self._group.broadcast((self._name, attr, args, kwargs))
            return value(*args, **kwargs)

        return call


class Workers:
    """Ranks 1 .. size-1 of a tensor-parallel engine, and this process's place in the group as rank 0."""

    def __init__(self, config: EngineConfig, device: torch.device):
        size = config.tp_size
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        # forked from a server process that has imported the engine once (not re-imported per rank and engine);
        # it has not touched CUDA
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, "tailorkv.engine.engine_rank"])
        ready = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=_work, args=(config, rank, init, ready), daemon=True, name=f"tp-{rank}"
            )
            for rank in range(1, size)
        ]
        for p in self.procs:
            p.start()
        for _ in self.procs:  # each one has imported what it needs before the group forms
            while True:
                try:
                    ready.get(timeout=1)
                    break
                except queue.Empty:
                    if not all(p.is_alive() for p in self.procs):
                        self.kill()
                        raise RuntimeError("a tensor-parallel worker process died while starting")
        self.group = TPGroup(0, size, device, init)

    def wrap(self, policy, runner):
        """The policy and runner the engine calls, their state-changing calls broadcast first."""
        return (
            Broadcasting("policy", policy, POLICY_CALLS, self.group),
            Broadcasting("runner", runner, RUNNER_CALLS, self.group),
        )

    def stop(self) -> None:
        """Tell the other ranks to leave, wait for them, leave the group."""
        if self.procs:
            try:
                self.group.broadcast(None)
            finally:
                for p in self.procs:
                    p.join(timeout=30)
                    if p.is_alive():
                        p.kill()
                self.procs = []
                self.group.close()

    def kill(self) -> None:
        """After a failure on rank 0 (the others may be waiting in a collective): end them at once."""
        for p in self.procs:
            p.kill()
            p.join()
        self.procs = []


def rank_device(config: EngineConfig, rank: int) -> str | None:
    """Rank `rank`'s device: the rank-th GPU on CUDA."""
    if config.device in (None, "auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{rank}"
    return config.device


def _work(config: EngineConfig, rank: int, init: str, ready) -> None:
    """A rank > 0: build its slice of the engine, then run what rank 0 broadcasts until told to stop."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    # PR_SET_PDEATHSIG: never outlive the fork server, which leaves when rank 0 does
    libc.prctl(1, signal.SIGKILL)
    from .engine_rank import EngineRank, pick_device

    ready.put(rank)
    device = pick_device(rank_device(config, rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = TPGroup(rank, config.tp_size, device, init)
    part = EngineRank(config, device, group)
    objects = {"rank": part}
    while (
        message := group.broadcast()
    ) is not None:  # at start: a calibration, rank 0's TailorKV plans
        _call(objects, message)
    part.build_cache()
    objects |= {"policy": part.policy, "runner": part.runner}
    while (message := group.broadcast()) is not None:
        _call(objects, message)
    group.close()


def _call(objects: dict, message: tuple) -> None:
    name, attr, args, kwargs = message
    getattr(objects[name], attr)(*args, **kwargs)
