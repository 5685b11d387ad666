"""The synchronous engine core: add requests, then `step()` = schedule, run, postprocess.

Only the engine thread touches it (server/engine/async_engine.py feeds it through an inbox; the API side only
reads `quarantined`). A step whose forward raises fails only the requests of the adapter versions that cause it
(server/engine/isolation.py); such a version, like one whose load onto the device raises, is quarantined: its
requests, running or waiting, fail, its slot is freed, and new requests for it are refused
(AdapterQuarantinedError). A new version of the same adapter is a different key, so it is served.
"""
from __future__ import annotations

import logging

import torch

from server.engine.detokenizer import make_decoder, update_text
from server.engine.errors import ADAPTER_QUARANTINED, AdapterQuarantinedError, PromptTooLongError
from server.engine.isolation import StepRun, execute_isolating
from server.engine.model_runner import ModelRunner
from server.engine.request import AdapterRef, Request, RequestOutput, Status, TokenLogprob
from server.engine.sampler import make_generator, sample
from server.engine.scheduler import ScheduledBatch, Scheduler

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer, *, max_model_len: int, eos_token_ids: tuple[int, ...]) -> None:
        self.runner, self.scheduler, self.tokenizer = runner, scheduler, tokenizer
        self._decode = make_decoder(tokenizer)
        self.max_model_len, self.eos_token_ids = max_model_len, set(eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.num_generated_tokens = 0
        self.num_steps = 0
        self.quarantined: dict[str, str] = {}  # adapter key (id@version) -> why it is refused

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
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        outputs = [out for req, exc in batch.load_failures for out in self._quarantine(req.adapter, exc)]
        if not batch.seqs:
            return outputs
        run = execute_isolating(self.runner.execute, batch)
        self.num_steps += 1
        return outputs + self._fail_culprits(batch, run) + self._postprocess(run.batch, run.logits)

    def _fail_culprits(self, batch: ScheduledBatch, run: StepRun) -> list[RequestOutput]:
        """Fail what made the step fail: the faulty adapter versions' requests, or, when the engine itself failed,
        every request of the step."""
        if run.engine_error is not None:
            log.error("engine step failed even without adapters; failing its %d requests", len(batch.seqs),
                      exc_info=run.engine_error)
            ids = [s.request.request_id for s in batch.seqs]
            return [out for rid in ids if (out := self.fail(rid, "internal error in the engine")) is not None]
        return [out for ref, exc in run.faulty for out in self._quarantine(ref, exc)]

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

    def _postprocess(self, batch: ScheduledBatch, logits: torch.Tensor | None) -> list[RequestOutput]:
        sampled = [s for s in batch.seqs if s.needs_logits]
        for s in batch.seqs:
            s.request.num_computed_tokens = s.start + s.num_tokens
        if not sampled:
            return []
        reqs = [s.request for s in sampled]
        result = sample(logits, [r.params for r in reqs], [r.generator for r in reqs], [r.output_ids for r in reqs])
        outputs = []
        for row, req in enumerate(reqs):
            token = result.token_ids[row]
            req.output_ids.append(token)
            self.num_generated_tokens += 1
            reason = None
            if token in self.eos_token_ids and not req.params.ignore_eos:
                req.output_ids.pop()  # EOS ends the text; it is not part of it
                reason = "stop"
            elif len(req.output_ids) >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
                reason = "length"
            text, hit_stop = update_text(req, self._decode, final=reason is not None)
            if hit_stop:
                reason = "stop"
            logprobs = None
            if req.params.logprobs is not None and not (reason == "stop" and token in self.eos_token_ids):
                logprobs = [self._logprob(token, result.logprobs[row], result.top[row])]
            token_ids = [] if (reason == "stop" and token in self.eos_token_ids) else [token]
            if reason is not None:
                self.requests.pop(req.request_id, None)
                self.scheduler.finish(req, reason)
            outputs.append(self._output(req, text, token_ids, logprobs, finished=reason is not None))
        return outputs

    def _logprob(self, token: int, logprob: float, top: list[tuple[int, float]]) -> TokenLogprob:
        decode = self.tokenizer.decode
        return TokenLogprob(token, decode([token]), logprob, [(decode([t]), lp) for t, lp in top])

    def _output(self, req: Request, text, token_ids, logprobs, *, finished: bool, error: str | None = None,
                error_type: str | None = None) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id, text=text, token_ids=token_ids, logprobs=logprobs, finished=finished,
            finish_reason=req.finish_reason if finished else None, num_prompt_tokens=len(req.prompt_ids),
            num_output_tokens=len(req.output_ids), error=error, error_type=error_type,
        )

    def stats(self) -> dict:
        sched = self.scheduler
        return {
            "num_waiting": len(sched.waiting),
            "num_running": len(sched.running),
            "num_free_kv_blocks": sched.blocks.num_free,
            "num_generated_tokens": self.num_generated_tokens,
            "num_steps": self.num_steps,
            "num_preemptions": sched.num_preemptions,
            "num_quarantined_adapters": len(self.quarantined),
            "num_waiting_adapter": sum(r.status is Status.WAITING_ADAPTER for r in sched.waiting),
            "adapter_cache": vars(sched.adapters.stats) if hasattr(sched.adapters, "stats") else {},
            "num_resident_adapters": len(self.runner.adapter_pool.slots) if self.runner.adapter_pool else 0,
            "num_pinned_adapters": sched.adapters.num_pinned if hasattr(sched.adapters, "num_pinned") else 0,
            "cuda_graphs": self.runner.graphs.stats() if self.runner.graphs else {"enabled": False},
        }
