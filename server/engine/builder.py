"""Assemble the synchronous engine (model, KV cache, adapter pool, scheduler, runner) from a model name or path
(server/model/catalog.py) and the engine options; server/service.py wraps it for serving."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kernels import cpu_matmul
from kernels.dispatch import use_triton
from server.engine.adapter_cache import AdapterCache
from server.engine.block_manager import BlockManager
from server.engine.cpu_threads import use_cpu_threads
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.engine import LLMEngine
from server.engine.metrics import EngineMetrics
from server.engine.onednn_caches import bound_onednn_caches
from server.engine.model_runner import ModelRunner
from server.engine.scheduler import Scheduler
from server.model.adapter_pool import AdapterPool
from server.model.catalog import resolve_model_path
from server.model.config import ModelConfig
from server.model.llama import LlamaModel
from server.model.loader import load_state_dict

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineOptions:
    device: str = "auto"
    dtype: str = "auto"
    lora_dtype: str = "auto"  # the adapters' low-rank factors on a CPU: auto (fp32), float32 or bfloat16
    max_num_seqs: int = 64
    max_model_len: int | None = None
    num_kv_blocks: int | None = None
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int = 512
    adapter_pool_bytes: int = 256 << 20
    max_adapter_slots: int = 64
    max_queue: int = 1024
    max_queue_per_tenant: int | None = None  # None: max_queue
    data_dir: str = ".multiplex"
    cuda_graphs: bool = True  # on CUDA with the Triton kernels: decode steps replayed from graphs
    cpu_threads: int | None = None  # on a CPU: the forward thread's intra-op threads (None: cpu_threads.py's default)
    lookahead: bool | None = None  # the next decode step built during the forward (None: on a GPU only)


def build_engine_options(settings) -> EngineOptions:
    """EngineOptions from the server's Settings (server/config.py)."""
    on_gpu = settings.device.startswith("cuda")
    return EngineOptions(
        device=settings.device, dtype=settings.dtype, lora_dtype=settings.lora_dtype,
        max_num_seqs=settings.max_num_seqs,
        max_model_len=settings.max_model_len, num_kv_blocks=settings.num_kv_blocks, block_size=settings.block_size,
        adapter_pool_bytes=settings.adapter_pool_bytes or ((2 << 30) if on_gpu else (256 << 20)),
        max_num_batched_tokens=8192 if on_gpu else 2048,
        # on a CPU every slot also costs a padded copy (padded_lowrank.py)
        max_adapter_slots=settings.max_adapter_slots or (64 if on_gpu else 16),
        # the engine bounds every request it holds; max_queue counts those waiting beyond the running batch
        max_queue=settings.max_num_seqs + settings.max_queue, data_dir=str(settings.data_dir),
        # one tenant may hold half of what the engine holds: its flood cannot shut the others out
        max_queue_per_tenant=settings.max_queue_per_tenant or max(1, (settings.max_num_seqs + settings.max_queue) // 2),
        cuda_graphs=settings.cuda_graphs, cpu_threads=settings.cpu_threads, lookahead=settings.lookahead,
    )


def build_llm_engine(model: str, opts: EngineOptions) -> LLMEngine:
    device = torch.device("cuda" if opts.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if opts.device == "auto" else opts.device))
    dtype = DTYPES[opts.dtype] if opts.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    forward_threads = use_cpu_threads(opts.cpu_threads) if device.type == "cpu" else None
    if forward_threads is not None:
        caches = bound_onednn_caches()  # before the model load's prepacking, the process's first oneDNN call
        log.info("CPU forward on %d intra-op threads; fp32 projections by %s; oneDNN caches %s", forward_threads,
                 f"our {cpu_matmul.VARIANT} kernel (kernels/cpu_matmul.c)" if cpu_matmul.enabled() else "oneDNN", caches)
    path = resolve_model_path(model, opts.data_dir)
    cfg = ModelConfig.from_dir(path)
    llama = LlamaModel(cfg, load_state_dict(path), device, dtype)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    max_len = min(cfg.max_context, opts.max_model_len or cfg.max_context)
    num_blocks = opts.num_kv_blocks or -(-max(opts.max_num_seqs * min(max_len, 1024), max_len) // opts.block_size)
    max_len = min(max_len, num_blocks * opts.block_size)
    pool = AdapterPool(cfg, opts.max_adapter_slots, opts.adapter_pool_bytes, device, dtype,
                       max_requests=opts.max_num_seqs,
                       lora_dtype=None if opts.lora_dtype == "auto" else DTYPES[opts.lora_dtype])
    metrics = EngineMetrics()
    cache = AdapterCache(pool, metrics)
    blocks = BlockManager(num_blocks, opts.block_size)
    scheduler = Scheduler(blocks, cache, max_num_seqs=opts.max_num_seqs,
                          max_num_batched_tokens=max(opts.max_num_batched_tokens, opts.max_prefill_chunk),
                          max_prefill_chunk=opts.max_prefill_chunk,
                          sliding_window=cfg.sliding_window if len(cfg.sliding_layers) == cfg.num_layers else 0,
                          metrics=metrics, para_rows=pool.max_requests)
    graphs = None
    if opts.cuda_graphs and device.type == "cuda" and use_triton(device):
        graphs = DecodeGraphs.for_device(device, opts.max_num_seqs)
    runner = ModelRunner(llama, num_blocks, opts.block_size, pool, max_model_len=max_len, graphs=graphs)
    runner.capture_decode_graphs()
    eos = cfg.eos_token_ids or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    log.info("model %s on %s/%s: %d layers, context %d, %d KV blocks of %d, CUDA graphs %s, adapters' factors in "
             "%s", path, device, dtype, cfg.num_layers, max_len, num_blocks, opts.block_size,
             "on" if graphs else "off", pool.lowrank_dtype)
    return LLMEngine(runner, scheduler, tokenizer, max_model_len=max_len, eos_token_ids=eos,
                     overlap_output=device.type == "cuda",
                     lookahead=device.type == "cuda" if opts.lookahead is None else opts.lookahead,
                     forward_threads=forward_threads)
