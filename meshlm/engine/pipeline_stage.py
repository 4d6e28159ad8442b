"""Engine steps over pipeline stages (pp > 1): a step flows down the stages; the last one answers rank 0.

Rank 0 (stage 0, tp index 0, cp index 0) submits a step: it hands the StepInput to the other ranks of
stage 0 (a tp broadcast, then each cp index 0 rank's cp broadcast), runs stage 0's layers and posts
(header, pickled StepInput, hidden states [1, T, H]) to the next stage. Every other rank loops: take a step
(the broadcast on stage 0, else the previous stage's message), run its layers, pass it on; on the last stage,
tp index 0 of cp index 0 posts the StepOutput (argmax tokens and the logits rows asked for) back to rank 0.
Sends are posted (Comm.isend), so a stage never waits for its consumer: rank 0 can submit the next step
while the later stages still work on the previous ones, up to one step per stage in flight. Every stage runs
the steps in submission order, so a prompt chunk always finds the KV of the chunks before it. The END header,
passed down the pipe, returns every rank to the executor's control loop (an idle server waits there, not on
a timed pipeline receive).

At cp > 1 each pipeline group is one (cp index, tp index) column of stages, so a rank's hidden states
[1, T, H] (T: its share of the step's rows, parallel/context.py) go to the same cp and tp index of the next
stage, which derives the same share from the same StepInput. Each stage's cp group rings over its own
layers' KV.

Each rank keeps a Timeline (telemetry/trace.py) of its pipelined time: totals always (the bubble metric),
every span only while a trace is recorded.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable

import torch

from meshlm.engine.model_runner import ModelRunner, StepOutput, finish
from meshlm.engine.paged_attention import StepInput
from meshlm.parallel.comm import Groups
from meshlm.parallel.pipeline import StagePlan
from meshlm.telemetry.trace import Timeline

END, STEP = 0, 1


class StageDriver:
    """This rank's part of pipelined engine steps."""

    def __init__(self, runner: ModelRunner, groups: Groups, stage: StagePlan, hidden_size: int,
                 dtype: torch.dtype, after_step: Callable[[], None] = lambda: None) -> None:
        self.runner, self.groups, self.stage = runner, groups, stage
        self.after_step = after_step  # run after each of this stage's forwards (expert rebalancing)
        self.comm = groups.pp
        self.hidden_size, self.dtype = hidden_size, dtype
        self.prev, self.next, self.last = stage.index - 1, stage.index + 1, stage.count - 1
        self.timeline = Timeline()
        self.submitted = self.collected = 0  # steps this rank has run (rank 0: submitted and collected)
        self.cp_index = groups.cp.index if groups.cp is not None else 0

    def start_timeline(self, spans: bool) -> None:
        """Every rank: restart the timeline right after a barrier, so all rows start together."""
        self.groups.world.barrier()
        self.timeline = Timeline(spans)

    def bubble_fraction(self) -> float:
        """This rank's share of its pipelined time spent waiting for another stage."""
        return self.timeline.totals()["bubble"]

    # -- rank 0 --------------------------------------------------------------------------------------------
    def submit(self, step: StepInput) -> None:
        """Run stage 0 of a step and post it down the pipe (the engine's work since the last span is compute)."""
        tl = self.timeline
        tl.resume()
        with tl.span("compute", chained=True, step=self.submitted, tokens=len(step.token_ids)):
            self._share(step)
            hidden = self.runner.forward(step)
        self._pass_on(step, hidden, self.submitted)
        self.after_step()
        self.submitted += 1

    def collect(self) -> StepOutput:
        """The oldest submitted step's output, from the last stage (blocks until it arrives)."""
        tl = self.timeline
        tl.record("compute", tl.mark, time.perf_counter(), what="engine")  # sampling, scheduling
        k, f, v = self._recv((3,), torch.long, self.last, "idle", step=self.collected)
        best = self._recv((k,), torch.long, self.last, "recv").tolist()
        logits = self._recv((f, v), torch.float32, self.last, "recv") if f else torch.zeros(0, v)
        self.collected += 1
        return StepOutput(best, logits)

    def end(self) -> None:
        """Send every other rank back to the control loop (nothing may be in flight)."""
        self._share(None)
        self._pass_on(None, None, self.submitted)
        self._wait_posted()

    # -- every other rank ------------------------------------------------------------------------------------
    def serve(self) -> None:
        """Run steps as they come, until END."""
        tl = self.timeline
        tl.resume()
        while True:
            if self.stage.first:  # a tp or cp peer of rank 0
                start = time.perf_counter()
                step, hidden = self._share(None), None
                tl.record("idle", start, time.perf_counter(), step=self.submitted)
            else:
                step, hidden = self._receive()
            if step is None:
                if not self.stage.last:
                    self._pass_on(None, None, self.submitted)
                break
            with tl.span("compute", step=self.submitted, tokens=len(step.token_ids)):
                out = self.runner.forward(step, hidden)
            if not self.stage.last:
                self._pass_on(step, out, self.submitted)
            elif self.groups.tp.index == 0 and self.cp_index == 0:  # the rank holding the sampled rows
                self._reply(finish(out, step))
            self.after_step()
            self.submitted += 1
        self._wait_posted()

    def _share(self, step: StepInput | None) -> StepInput | None:
        """Stage 0: rank 0's step (None: END) to every rank of the stage: its tp peers, then their cp peers."""
        if self.cp_index == 0:
            step = self.groups.tp.broadcast_object(step, 0)
        return self.groups.cp.broadcast_object(step, 0) if self.groups.cp is not None else step

    # -- messages --------------------------------------------------------------------------------------------
    def _send(self, t: torch.Tensor, dst: int, **args) -> None:
        start = time.perf_counter()
        self.comm.isend(t, dst)
        self.timeline.record("send", start, time.perf_counter(), to=dst, bytes=t.numel() * t.element_size(),
                             **args)

    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, span: str, **args) -> torch.Tensor:
        """A new tensor from stage src; the wait is recorded as `span` (idle: a peer has not sent yet)."""
        start = time.perf_counter()
        t = self.comm.recv_posted(torch.empty(shape, dtype=dtype), src)
        self.timeline.record(span, start, time.perf_counter(), src=src, **args)
        return t

    def _wait_posted(self) -> None:
        """Wait for this rank's posted sends, then leave the pipeline (the timeline pauses)."""
        with self.timeline.span("send", what="flush"):
            self.comm.wait_posted()
        self.timeline.pause()

    def _pass_on(self, step: StepInput | None, hidden: torch.Tensor | None, index: int) -> None:
        if step is None:
            self._send(torch.tensor([END, 0, 0]), self.next, what="end")
            return
        data = torch.frombuffer(bytearray(pickle.dumps(step)), dtype=torch.uint8)
        self._send(torch.tensor([STEP, data.numel(), hidden.shape[1]]), self.next, step=index)
        self._send(data, self.next, step=index)
        self._send(hidden, self.next, step=index)  # [1, T, H]

    def _receive(self) -> tuple[StepInput | None, torch.Tensor | None]:
        kind, nbytes, t = self._recv((3,), torch.long, self.prev, "idle", step=self.submitted).tolist()
        if kind == END:
            return None, None
        start = time.perf_counter()
        data = self.comm.recv_posted(torch.empty(nbytes, dtype=torch.uint8), self.prev)
        step = pickle.loads(data.numpy().tobytes())
        hidden = torch.empty(1, t, self.hidden_size, dtype=self.dtype, device=self.runner.device)  # on NCCL on CUDA
        self.comm.recv_posted(hidden, self.prev)
        self.timeline.record("recv", start, time.perf_counter(), src=self.prev, step=self.submitted)
        return step, hidden

    def _reply(self, out: StepOutput) -> None:
        self._send(torch.tensor([len(out.best), out.logits.shape[0], out.logits.shape[1]]), 0, what="tokens")
        self._send(torch.tensor(out.best, dtype=torch.long), 0, what="tokens")
        if out.logits.shape[0]:
            self._send(out.logits, 0, what="logits")
