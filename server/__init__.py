"""multiplex server: one backbone, many adapters, one batch.

The path of a completion, one data type per hop (who owns it; where it lives):

    HTTP body (JSON)                   server/api/guard.py, body.py   auth and size from the headers; pydantic (schemas.py)
      -> prompt ids + SamplingParams   server/api                     tokenised on the event loop
      -> AdapterRef                    server/registry/adapters.py    id@version + host-side AdapterDeltas, fetched
                                                                      from Redis (store.py) without blocking the engine
      -> Request                       server/engine/request.py       handed to the engine thread through an inbox
      -> ScheduledBatch                server/engine/scheduler.py     CPU, no tensors: which requests, how many tokens
      -> ForwardBatch                  server/engine/model_runner.py  device tensors: ids, positions, KV slots, segments
      -> logits                        server/model/llama.py          base matmuls + the deltas (adapter_step.py)
      -> tokens                        server/engine/sampler.py
      -> RequestOutput                 server/engine/engine.py        text deltas, stop strings, finish reason
      -> stream chunk (SSE / JSON)     server/api/completions.py

The model never sees a Request; the scheduler never sees a tensor. Adapters reach the device through
server/engine/adapter_cache.py (slot per adapter@version, pinned while in use, LRU) into
server/model/adapter_pool.py (slots and arena ranges), whose per-kind stores (lowrank_store.py, padded_lowrank.py,
sparse_store.py, scale_store.py) hold each adapter once, in the layout of the kernels that read it.
"""
