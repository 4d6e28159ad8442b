"""Engine steps over pipeline stages (pp > 1): a step flows down the stages; the last one answers rank 0.

Rank 0 (stage 0, tp index 0) submits a step: it hands the StepInput to its tp peers (a tp broadcast),
runs stage 0's layers and posts (header, pickled StepInput, hidden states [1, T, H]) to the next stage.
Every other rank loops: take a step (rank 0's broadcast on stage 0, else the previous stage's message),
run its layers, pass it on; on the last stage, tp index 0 posts the StepOutput (argmax tokens and the
logits rows asked for) back to rank 0. Sends are posted (isend, see parallel/pipeline.py's StageLink), so
a stage never waits for its consumer: rank 0 can submit the next step while the later stages still work
on the previous ones, up to one step per stage in flight. The END header, passed down the pipe, returns
every rank to the executor's control loop (an idle server waits there, not on a timed pipeline receive).
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from meshlm.engine.model_runner import ModelRunner, StepOutput, finish
from meshlm.engine.paged_attention import StepInput
from meshlm.parallel.comm import Groups
from meshlm.parallel.pipeline import StageLink, StagePlan

END, STEP = 0, 1


class _NoTimeline:
    """The link's span recorder, switched off: a server's steps would grow a timeline without end."""

    def record(self, *args: Any, **kw: Any) -> None:
        """Drop the span."""

    @contextmanager
    def span(self, *args: Any, **kw: Any) -> Iterator[None]:
        """Run the block unrecorded."""
        yield


class StageDriver:
    """This rank's part of pipelined engine steps."""

    def __init__(self, runner: ModelRunner, groups: Groups, stage: StagePlan, hidden_size: int,
                 dtype: torch.dtype) -> None:
        self.runner, self.groups, self.stage = runner, groups, stage
        self.hidden_size, self.dtype = hidden_size, dtype
        self.link = StageLink(groups.pp, _NoTimeline())  # type: ignore[arg-type]
        self.prev, self.next, self.last = stage.index - 1, stage.index + 1, stage.count - 1
        self.busy_s = 0.0  # rank 0: seconds running stage 0 of submitted steps
        self.idle_s = 0.0  # rank 0: seconds blocked in collect() waiting for the later stages

    def bubble_fraction(self) -> float:
        """Stage 0's share of its pipelined time spent waiting for the later stages (rank 0's bubble)."""
        total = self.busy_s + self.idle_s
        return self.idle_s / total if total > 0 else 0.0

    # -- rank 0 --------------------------------------------------------------------------------------------
    def submit(self, step: StepInput) -> None:
        """Run stage 0 of a step and post it down the pipe."""
        t0 = time.perf_counter()
        self.groups.tp.broadcast_object(step, 0)
        self._pass_on(step, self.runner.forward(step))
        self.busy_s += time.perf_counter() - t0

    def collect(self) -> StepOutput:
        """The oldest submitted step's output, from the last stage (blocks until it arrives)."""
        t0 = time.perf_counter()
        k, f, v = self.link.recv((3,), torch.long, self.last).tolist()
        self.idle_s += time.perf_counter() - t0
        best = self.link.recv((k,), torch.long, self.last).tolist()
        logits = self.link.recv((f, v), torch.float32, self.last) if f else torch.zeros(0, v)
        return StepOutput(best, logits)

    def end(self) -> None:
        """Send every other rank back to the control loop (nothing may be in flight)."""
        self.groups.tp.broadcast_object(None, 0)
        self._pass_on(None, None)
        self.link.flush()

    # -- every other rank ------------------------------------------------------------------------------------
    def serve(self) -> None:
        """Run steps as they come, until END."""
        while True:
            if self.stage.first:
                step, hidden = self.groups.tp.broadcast_object(None, 0), None
            else:
                step, hidden = self._receive()
            if step is None:
                if not self.stage.last:
                    self._pass_on(None, None)
                break
            out = self.runner.forward(step, hidden)
            if not self.stage.last:
                self._pass_on(step, out)
            elif self.groups.tp.index == 0:
                self._reply(finish(out, step))
        self.link.flush()

    # -- messages --------------------------------------------------------------------------------------------
    def _pass_on(self, step: StepInput | None, hidden: torch.Tensor | None) -> None:
        if step is None:
            self.link.send(torch.tensor([END, 0, 0]), self.next)
            return
        data = torch.frombuffer(bytearray(pickle.dumps(step)), dtype=torch.uint8)
        self.link.send(torch.tensor([STEP, data.numel(), hidden.shape[1]]), self.next)
        self.link.send(data, self.next)
        self.link.send(hidden, self.next)  # [1, T, H]

    def _receive(self) -> tuple[StepInput | None, torch.Tensor | None]:
        kind, nbytes, t = self.link.recv((3,), torch.long, self.prev).tolist()
        if kind == END:
            return None, None
        step = pickle.loads(self.link.recv((nbytes,), torch.uint8, self.prev).numpy().tobytes())
        return step, self.link.recv((1, t, self.hidden_size), self.dtype, self.prev, device=self.runner.device)

    def _reply(self, out: StepOutput) -> None:
        self.link.send(torch.tensor([len(out.best), out.logits.shape[0], out.logits.shape[1]]), 0)
        self.link.send(torch.tensor(out.best, dtype=torch.long), 0)
        if out.logits.shape[0]:
            self.link.send(out.logits, 0)
