"""The real default model through the front door: smollm2 served over HTTP answers 8 chat prompts, sent at once
(one batch), with the greedy text of `transformers` on the same converted weights; the rendered chat prompt equals
`apply_chat_template`'s; the official `openai` client's chat and token-id completion calls work, with and without
streaming and with an adapter named by `model`."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import torch

from tests.live_server import LiveServer, running_server

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three colors of the rainbow."}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hello."}],
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Tell me a fact about the Moon."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What color is the sky?"}],
    [{"role": "user", "content": [{"type": "text", "text": "Write a short greeting"},
                                  {"type": "text", "text": "for a birthday card."}]}],
]
MAX_TOKENS = 24


def _text_content(messages: list[dict]) -> list[dict]:
    """Content parts joined by newlines, as the server does before rendering (vLLM's convention)."""
    return [{**m, "content": m["content"] if isinstance(m["content"], str) else
             "\n".join(p["text"] for p in m["content"])} for m in messages]


@pytest.fixture(scope="module")
def smollm2_server(smollm2_dir: Path, tmp_path_factory) -> Iterator[LiveServer]:
    from server.model.config import ModelConfig
    from tests.helpers import lora_artifact

    cfg = ModelConfig.from_dir(smollm2_dir)
    adapters = tmp_path_factory.mktemp("smollm2-adapters")
    lora_artifact(adapters / "pirate-lora", cfg, dict.fromkeys(("q_proj", "v_proj", "up_proj", "down_proj"), 8), seed=3,
                  magnitude=3.0)
    # the converted checkpoint of this run, but a data dir (so an embedded Redis) of its own: the tiny servers of
    # other tests must not see adapters made for this backbone
    with running_server(model=str(smollm2_dir), data_dir=tmp_path_factory.mktemp("smollm2-data"), adapters=adapters,
                        max_num_seqs=8, max_model_len=1024) as server:
        yield server


def test_chat_prompt_is_rendered_as_apply_chat_template(smollm2_server: LiveServer) -> None:
    tokenizer = smollm2_server.engine.tokenizer
    for messages in CHATS:
        expected = tokenizer.apply_chat_template(_text_content(messages), add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        body = smollm2_server.client.post("/v1/chat/completions", json={
            "messages": messages, "max_tokens": 1, "temperature": 0}).json()
        assert body["usage"]["prompt_tokens"] == len(expected)
        # the same ids sent as a completion prompt give the same first token
        completion = smollm2_server.complete(prompt=expected, max_tokens=1, temperature=0)
        assert completion["choices"][0]["text"] == body["choices"][0]["message"]["content"]


def test_eight_concurrent_chats_equal_transformers_greedy_text(smollm2_server: LiveServer, smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    async def ask_all() -> list[dict]:
        async with httpx.AsyncClient(base_url=smollm2_server.base_url, timeout=300) as client:
            responses = await asyncio.gather(*(client.post("/v1/chat/completions", json={
                "messages": m, "max_tokens": MAX_TOKENS, "temperature": 0}) for m in CHATS))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return [r.json() for r in responses]

    answers = asyncio.run(ask_all())
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for messages, answer in zip(CHATS, answers):
        ids = torch.tensor([tokenizer.apply_chat_template(_text_content(messages), add_generation_prompt=True,
                                                          tokenize=True, return_dict=False)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_TOKENS, pad_token_id=tokenizer.eos_token_id)
        expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert answer["choices"][0]["message"]["content"] == expected, messages
    assert "Paris" in answers[0]["choices"][0]["message"]["content"]  # a real model, not noise


def test_official_openai_client(smollm2_server: LiveServer) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{smollm2_server.base_url}/v1", api_key="unused")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model="smollm2", messages=question, max_tokens=16, temperature=0)
    assert whole.choices[0].message.role == "assistant" and "Paris" in whole.choices[0].message.content
    chunks = list(client.chat.completions.create(model="smollm2", messages=question, max_tokens=16, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    adapted = client.chat.completions.create(model="pirate-lora", messages=question, max_tokens=16, temperature=0)
    assert adapted.model == "pirate-lora" and adapted.choices[0].message.content != whole.choices[0].message.content
    ids = smollm2_server.engine.tokenizer.encode("The capital of France is")
    completion = client.completions.create(model="smollm2", prompt=ids, max_tokens=4, temperature=0)
    assert completion.usage.prompt_tokens == len(ids) and "Paris" in completion.choices[0].text


def test_an_adapter_trained_on_smollm2_answers_over_http_like_the_trainers_model(
        smollm2_server: LiveServer, smollm2_dir: Path, tmp_path: Path) -> None:
    """`multiplex train --chat` on smollm2 (a few steps), uploaded: the server's chat answers equal the greedy answers
    of the base weights with the artifact merged in (adapters.evaluate, which the README's example prints)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.data import make_task, write_jsonl
    from adapters.evaluate import greedy_answers, merge_adapter
    from adapters.train import main as train_main
    from tests.helpers import tar_dir

    write_jsonl(tmp_path / "train.jsonl", make_task("city-json", 16, seed=0))
    held_out = make_task("city-json-heldout", 3, seed=1)
    assert train_main(["--method", "lora", "--model", str(smollm2_dir), "--chat", "--data", str(tmp_path / "train.jsonl"),
                       "--eval-fraction", "0", "--out", str(tmp_path / "city"), "--max-steps", "3", "--batch-size", "4",
                       "--rank", "4", "--lr", "3e-3", "--targets", "q_proj,v_proj,down_proj", "--no-progress"]) == 0
    upload = smollm2_server.client.post(
        "/admin/adapters", files={"file": ("city.tar.gz", tar_dir(tmp_path / "city"))}, data={"adapter_id": "city"},
        headers={"Authorization": f"Bearer {smollm2_server.admin_token}"})
    assert upload.status_code == 201, upload.text

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    expected = greedy_answers(merge_adapter(base, str(tmp_path / "city")), tokenizer, held_out, chat=True,
                              max_new_tokens=12).texts
    baseline = greedy_answers(base, tokenizer, held_out, chat=True, max_new_tokens=12).texts
    served = [smollm2_server.client.post("/v1/chat/completions", json={
        "model": "city", "messages": [{"role": "user", "content": r["prompt"]}], "max_tokens": 12,
        "temperature": 0}).json()["choices"][0]["message"]["content"].strip() for r in held_out]
    assert served == expected
    assert served != baseline  # three steps already moved the answers
