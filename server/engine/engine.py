"""The synchronous engine core: add requests, then `step()` = schedule, run, postprocess.

A step's forward and sampling run on the engine's forward thread while the calling thread turns the previous
step's tokens into text (detokenisation, stop strings, logprobs, outputs): that work overlaps the forward instead
of following it (as SGLang's overlap scheduler and vLLM's async scheduling overlap output processing). What the
next step's scheduling needs, a request's new token and whether it ended by EOS or length, is settled as soon as
the forward returns; a stop string is found one step later, so a request that hits one has computed one more
token, which is dropped (its text is already cut at the stop string). `step_times` keeps, per step, how long the
model's forward took and how long the step took in all: the rest is host work not overlapped with the forward.
The overlap is on for a GPU only (`overlap_output`): on a CPU the forward's thread needs the GIL between its ops, and
text work beside it slowed streaming under load (`python -m benchmarks.serving --systems multiplex --rates 2
--temperature 1.0`, 2026-12-01 22:37-22:41 UTC, interleaved: TPOT p50 134 and 142 ms with it, 109 and 116 without).

Lookahead (`lookahead`, also for a GPU only by default): during the forward the calling thread also schedules and
builds the next step, as it will be if every request goes on decoding (Scheduler.predict_decode_step: its KV
blocks taken, its inputs built with the decode tokens left blank, the way vLLM's async scheduling fills them from
the sampled tokens). When the forward is over and its tokens accepted, `Scheduler.confirm` checks that nothing
changed what the next step would be (a request ended, arrived or was aborted): then that step runs at once with its
tokens filled in (PreparedStep.fill), else it is dropped and the next step is scheduled as usual. Either way the
steps are those `schedule()` makes, so the tokens are the same with it or without it.

When nothing overlaps the forward (both off, a CPU's default), the thread that steps the engine may take the
forward's place (`run_forwards_here`: its OpenMP team sized as the forward thread's): the forward and sampling then
run on it, without the hand-off to the forward's thread and back each step.

Only the engine thread touches it (server/engine/async_engine.py feeds it through an inbox; the API side only
reads `quarantined`). A step whose forward raises fails only the requests of the adapter versions that cause it
(server/engine/isolation.py); such a version, like one whose load onto the device raises, is quarantined: its
requests, running or waiting, fail, its slot is freed, and new requests for it are refused
(AdapterQuarantinedError). A new version of the same adapter is a different key, so it is served.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, NamedTuple

from server.engine.cpu_threads import enter_forward_thread
from server.engine.detokenizer import make_decoder, update_text
from server.engine.errors import ADAPTER_OVERFLOW, ADAPTER_QUARANTINED, AdapterQuarantinedError, PromptTooLongError
from server.engine.isolation import StepRun, execute_isolating
from server.engine.model_runner import ModelRunner, PreparedStep
from server.engine.request import AdapterRef, Request, RequestOutput, Status, TokenLogprob
from server.engine.sampler import SampleResult, make_generator, sample
from server.engine.scheduler import ScheduledBatch, Scheduler

log = logging.getLogger(__name__)

Deliver = Callable[[list[RequestOutput]], None]  # the outputs made together (a step's text: one call for them all)


class _NewToken(NamedTuple):
    """A token accepted at the end of a step; its text is made while the next step's forward runs."""

    request: Request
    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None
    reason: str | None  # "stop" (EOS) or "length" when the token ended the request, settled on acceptance


@dataclass(frozen=True)
class StepTime:
    """One step: seconds in the model's forward (ModelRunner.forward_seconds) and the step's whole period, from
    the end of the previous step's forward to the end of this one's (None for a step after an idle engine)."""

    forward_s: float
    period_s: float | None

    @property
    def host_s(self) -> float | None:
        """Time the forward was not running: schedule, batch build, sampling, token bookkeeping, text work that
        outlasted the forward."""
        return None if self.period_s is None else max(0.0, self.period_s - self.forward_s)


class LLMEngine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer, *, max_model_len: int,
                 eos_token_ids: tuple[int, ...], overlap_output: bool = True, lookahead: bool = True,
                 forward_threads: int | None = None) -> None:
        """forward_threads: on a CPU, the intra-op threads of the forward's thread, the only thread of the process
        that computes on more than one (server/engine/cpu_threads.py); None leaves threads as they are.
        overlap_output: make the previous step's text while the forward runs (see the module docstring); off, the
        text work follows the forward within the step. lookahead: build the next decode step's inputs while the
        forward runs (module docstring). The builder turns both on for a GPU only."""
        self.runner, self.scheduler, self.tokenizer = runner, scheduler, tokenizer
        self._decode = make_decoder(tokenizer)
        self.max_model_len, self.eos_token_ids = max_model_len, set(eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.num_generated_tokens = 0
        self.num_steps = 0
        self.quarantined: dict[str, str] = {}  # adapter key (id@version) -> why it is refused
        self._forward = ThreadPoolExecutor(1, thread_name_prefix="multiplex-forward",
                                           initializer=None if forward_threads is None else enter_forward_thread,
                                           initargs=() if forward_threads is None else (forward_threads,))
        self._forward_threads = forward_threads
        self._inline_thread: int | None = None  # the thread that runs forwards itself (run_forwards_here)
        self._new_tokens: list[_NewToken] = []  # accepted, their text not made yet
        self._stopped: list[Request] = []  # ended by a stop string while maybe in the forward in flight
        self._last_forward_end: float | None = None
        self.overlap_text = overlap_output
        self.lookahead = lookahead
        self._ahead: PreparedStep | None = None  # the next step, built during the last forward
        self.num_lookahead_steps = 0  # steps run from a lookahead (not scheduled after the previous forward)
        self.step_times: deque[StepTime] = deque(maxlen=256)

    def on_forward_thread(self, fn, *args):
        """fn(*args) on the forward's thread (its threads and OpenMP team), between steps; -> its result."""
        return self._forward.submit(fn, *args).result()

    def run_forwards_here(self) -> None:
        """Where nothing overlaps the forward (overlap_text and lookahead off now), steps called from this thread
        from now on run their forward and sampling on it, without the hand-off to the forward's thread and back,
        for as long as both stay off (checked at every step). Sizes this thread's OpenMP and MKL teams as the
        forward thread's (cpu_threads.py): call it from the thread that will step the engine, before its first
        step. With either on, it does nothing: the forward thread keeps the only team."""
        if self.overlap_text or self.lookahead:
            return
        if self._forward_threads is not None:
            enter_forward_thread(self._forward_threads)
        self._inline_thread = threading.get_ident()

    def close(self) -> None:
        """End the forward's thread (and with it its OpenMP team, server/engine/cpu_threads.py); no step after this."""
        self._forward.shutdown(wait=True)

    def add_request(self, req: Request) -> None:
        if len(req.prompt_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(req.prompt_ids)} tokens; this model's context is {self.max_model_len} tokens")
        if not req.prompt_ids:
            raise PromptTooLongError("prompt is empty")
        if req.adapter is not None:
            self.check_adapter(req.adapter)
        req.generator = make_generator(req.params)
        self.requests[req.request_id] = req
        self.scheduler.add(req)

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req, "abort")
        return self._output(req, "", [], None, finished=True)

    def fail(self, request_id: str, message: str, error_type: str = "internal_error") -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req, "error")
        return self._output(req, "", [], None, finished=True, error=message, error_type=error_type)

    def check_adapter(self, ref: AdapterRef) -> None:
        """Raise AdapterQuarantinedError if this adapter version is quarantined (safe from any thread)."""
        message = self.quarantined.get(ref.key)
        if message is not None:
            raise AdapterQuarantinedError(message)

    @property
    def metrics_registry(self):
        """The Prometheus registry of the engine's histograms (server/engine/metrics.py)."""
        return self.scheduler.metrics.registry

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._new_tokens)

    def step(self, deliver: Deliver | None = None) -> list[RequestOutput]:
        """Schedule and run one step. Outputs go to `deliver` as soon as they are made (the previous step's text
        during this step's forward), a list of those made together per call, or, without it, are returned when the
        step ends."""
        outputs: list[RequestOutput] = []
        emit = deliver or outputs.extend
        ahead, self._ahead = self._ahead, None
        if ahead is not None and self.scheduler.confirm(ahead.batch):
            batch, prepared = ahead.batch, ahead  # built during the previous forward
            prepared.fill()
            self.num_lookahead_steps += 1
        else:
            batch, prepared = self.scheduler.schedule(), None
            for req, exc in batch.load_failures:
                self._emit_all(emit, self._quarantine(req.adapter, exc))
            if not batch.seqs:
                self._emit_text(emit)
                self._finish_stopped()
                self._last_forward_end = None  # the engine idles: the next step's period starts anew
                return outputs
        forward_before = self.runner.forward_seconds
        overlap = self.overlap_text or self.lookahead
        if not overlap and self._inline_thread == threading.get_ident():
            run, result, forward_end = self._run(batch, prepared)  # nothing to overlap: no hand-off
        else:
            run, result, forward_end = self._overlapped_run(batch, prepared, emit)
        period = None if self._last_forward_end is None else forward_end - self._last_forward_end
        self.step_times.append(StepTime(self.runner.forward_seconds - forward_before, period))
        self._last_forward_end = forward_end
        self.num_steps += 1
        self._emit_all(emit, self._fail_culprits(batch, run))
        self._emit_all(emit, self._fail_nonfinite(run.batch, result))
        self._accept(run.batch, result)
        if not self.overlap_text:
            self._emit_text(emit)
            self._finish_stopped()
        return outputs

    def _overlapped_run(self, batch: ScheduledBatch, prepared: PreparedStep | None, emit: Deliver
                        ) -> tuple[StepRun, SampleResult | None, float]:
        """The step's forward on the forward's thread while this one makes the previous step's text and builds the
        next step (each where turned on)."""
        running = self._forward.submit(self._run, batch, prepared)
        try:
            if self.overlap_text:
                self._emit_text(emit)  # the previous step's tokens, while this step's forward runs
            if self.lookahead:
                self._ahead = self._prepare_next(batch)  # the next step's inputs, while this step's forward runs
        finally:
            wait([running])  # whatever happens here, no forward is left in flight
            self._finish_stopped()  # their KV blocks were in that forward: freed only once it is over
        return running.result()

    def _prepare_next(self, batch: ScheduledBatch) -> PreparedStep | None:
        """The step after `batch` if every request goes on decoding (Scheduler.predict_decode_step), its inputs
        built now but for the tokens `batch` is sampling; None when the scheduler cannot predict it. Never fails
        the running step: a lookahead that raises is dropped (and logged), and the next step is scheduled anew."""
        try:
            predicted = self.scheduler.predict_decode_step(batch, self.max_model_len)
            return None if predicted is None else self.runner.prepare(predicted, lookahead=True)
        except Exception:  # noqa: BLE001 - a bug here must cost the lookahead, not the requests
            log.exception("lookahead failed; the next step is scheduled anew")
            return None

    def _run(self, batch: ScheduledBatch, prepared: PreparedStep | None = None
             ) -> tuple[StepRun, SampleResult | None, float]:
        """On the forward thread: the step's forward (isolating faulty adapters) and the sampling of its tokens.
        `prepared`: the step's inputs built ahead (a sub-batch of an isolating retry is built anew)."""
        def execute(b: ScheduledBatch):
            return self.runner.run(prepared) if prepared is not None and b is batch else self.runner.execute(b)

        run = execute_isolating(execute, batch)
        reqs = [s.request for s in run.batch.seqs if s.needs_logits]
        result = None
        if reqs:
            result = sample(run.logits, [r.params for r in reqs], [r.generator for r in reqs],
                            [r.output_ids for r in reqs])
        return run, result, time.perf_counter()

    @staticmethod
    def _emit_all(emit: Deliver, outputs: list[RequestOutput]) -> None:
        if outputs:
            emit(outputs)

    def _fail_culprits(self, batch: ScheduledBatch, run: StepRun) -> list[RequestOutput]:
        """Fail what made the step fail: the faulty adapter versions' requests, or, when the engine itself failed,
        every request of the step."""
        if run.engine_error is not None:
            log.error("engine step failed even without adapters; failing its %d requests", len(batch.seqs),
                      exc_info=run.engine_error)
            ids = [s.request.request_id for s in batch.seqs]
            return [out for rid in ids if (out := self.fail(rid, "internal error in the engine")) is not None]
        return [out for ref, exc in run.faulty for out in self._quarantine(ref, exc)]

    def _fail_nonfinite(self, batch: ScheduledBatch, result: SampleResult | None) -> list[RequestOutput]:
        """Fail the requests whose logits were not finite (a NaN or an infinity: an adapter whose values overflow
        the model's dtype on this input, which other requests of the step never see) with an error saying so,
        instead of answering them with the degenerate row's token. The adapter stays served: another tenant's
        prompt must not be able to take a public adapter away. A base-model row keeps that token (logged)."""
        if result is None or not result.nonfinite:
            return []
        sampled = [s.request for s in batch.seqs if s.needs_logits]
        outputs: list[RequestOutput] = []
        for row in result.nonfinite:
            req = sampled[row]
            if req.adapter is None:
                log.warning("request %s: the base model's logits are not finite", req.request_id)
                continue
            ref = req.adapter
            log.info("request %s: adapter %r version %d gave logits that are not finite", req.request_id,
                     ref.adapter_id, ref.version)
            message = (f"adapter {ref.adapter_id!r} version {ref.version} gave logits that are not finite (NaN or "
                       f"infinity) for this request: its values overflow the model's dtype on this input")
            out = self.fail(req.request_id, message, ADAPTER_OVERFLOW)
            if out is not None:
                outputs.append(out)
        return outputs

    def _quarantine(self, ref: AdapterRef, exc: Exception) -> list[RequestOutput]:
        """Refuse this adapter version from now on, fail its requests (running or waiting), free its slot."""
        if ref.key not in self.quarantined:
            log.error("adapter %r version %d failed in the engine; quarantined", ref.adapter_id, ref.version,
                      exc_info=exc)
            self.quarantined[ref.key] = (f"adapter {ref.adapter_id!r} version {ref.version} failed in the engine "
                                         f"and was quarantined; upload a new version to use it again")
        ids = [rid for rid, r in self.requests.items() if r.adapter is not None and r.adapter.key == ref.key]
        message = self.quarantined[ref.key]
        outputs = [out for rid in ids if (out := self.fail(rid, message, ADAPTER_QUARANTINED))
                   is not None]
        self.scheduler.adapters.discard(ref)
        return outputs

    def _accept(self, batch: ScheduledBatch, result: SampleResult | None) -> None:
        """What the next schedule needs: each request's cached tokens, its new token, and whether that token (EOS,
        length) ended it. A request that ended meanwhile (stop string, abort, failure) drops its token."""
        for s in batch.seqs:
            s.request.num_computed_tokens = s.start + s.num_tokens
        sampled = [s.request for s in batch.seqs if s.needs_logits]
        if result is None:  # nobody needed a token this step (prompt chunks only)
            return
        requests, eos, max_len, new_tokens = self.requests, self.eos_token_ids, self.max_model_len, self._new_tokens
        for req, token, logprob, top in zip(sampled, result.token_ids, result.logprobs, result.top):
            if requests.get(req.request_id) is not req or req.finish_reason is not None:
                continue
            out = req.output_ids
            out.append(token)
            self.num_generated_tokens += 1
            reason = None
            if token in eos and not req.params.ignore_eos:
                out.pop()  # EOS ends the text; it is not part of it (but is counted in the usage)
                req.ended_by_eos = True
                reason = "stop"
            elif len(out) >= req.params.max_tokens or len(req.prompt_ids) + len(out) >= max_len:
                reason = "length"
            if reason is not None:
                self.scheduler.finish(req, reason)
            new_tokens.append(_NewToken(req, token, logprob, top, reason))

    def _emit_text(self, emit: Deliver) -> None:
        """The accepted tokens' text (stop strings cut), logprobs and outputs. Runs while a forward may be in flight:
        it touches no scheduler state; a request it ends by a stop string is finished after that forward."""
        new_tokens, self._new_tokens = self._new_tokens, []
        outputs = []
        requests, decoder, eos_ids, output = self.requests, self._decode, self.eos_token_ids, self._output
        for req, token, logprob, top, reason in new_tokens:
            if requests.get(req.request_id) is not req:
                continue  # aborted or failed since
            text, hit_stop = update_text(req, decoder, final=reason is not None)
            if hit_stop:
                if reason is None:
                    self._stopped.append(req)
                reason = req.finish_reason = "stop"
            eos = reason == "stop" and token in eos_ids
            logprobs = None
            if req.params.logprobs is not None and not eos:
                logprobs = [self._logprob(token, logprob, top)]
            if reason is not None:
                requests.pop(req.request_id, None)
            outputs.append(output(req, text, [] if eos else [token], logprobs, finished=reason is not None))
        self._emit_all(emit, outputs)

    def _finish_stopped(self) -> None:
        for req in self._stopped:
            self.scheduler.finish(req, "stop")
        self._stopped = []

    def _logprob(self, token: int, logprob: float, top: list[tuple[int, float]]) -> TokenLogprob:
        decode = self.tokenizer.decode
        return TokenLogprob(token, decode([token]), logprob, [(decode([t]), lp) for t, lp in top])

    def _output(self, req: Request, text, token_ids, logprobs, *, finished: bool, error: str | None = None,
                error_type: str | None = None) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id, text=text, token_ids=token_ids, logprobs=logprobs, finished=finished,
            finish_reason=req.finish_reason if finished else None, num_prompt_tokens=len(req.prompt_ids),
            num_output_tokens=len(req.output_ids) + req.ended_by_eos, error=error, error_type=error_type,
        )

    def _step_time_stats(self) -> dict:
        """Mean milliseconds per step over the recent steps that followed another step (see StepTime)."""
        busy = [t for t in tuple(self.step_times) if t.period_s is not None]  # copied at once: the engine thread appends
        if not busy:
            return {"forward_ms_per_step": None, "host_ms_per_step": None}
        return {"forward_ms_per_step": 1e3 * sum(t.forward_s for t in busy) / len(busy),
                "host_ms_per_step": 1e3 * sum(t.host_s for t in busy) / len(busy)}

    def stats(self) -> dict:
        sched = self.scheduler
        return {
            "num_waiting": len(sched.waiting),
            "num_running": len(sched.running),
            "num_free_kv_blocks": sched.blocks.num_free,
            "num_generated_tokens": self.num_generated_tokens,
            "num_steps": self.num_steps,
            "num_lookahead_steps": self.num_lookahead_steps,
            **self._step_time_stats(),
            "num_preemptions": sched.num_preemptions,
            "num_quarantined_adapters": len(self.quarantined),
            "num_waiting_adapter": sum(r.status is Status.WAITING_ADAPTER for r in sched.waiting),
            "adapter_cache": vars(sched.adapters.stats) if hasattr(sched.adapters, "stats") else {},
            "num_resident_adapters": len(self.runner.adapter_pool.slots) if self.runner.adapter_pool else 0,
            "num_pinned_adapters": sched.adapters.num_pinned if hasattr(sched.adapters, "num_pinned") else 0,
            "cuda_graphs": self.runner.graphs.stats() if self.runner.graphs else {"enabled": False},
        }
