"""The Serve deployment over real HTTP on 127.0.0.1 (httpx and the official openai client),
one application per task on the session's Ray, every answer checked against the oracle
(PEFT, one adapter at a time, each row alone)."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import oracle
from testkit.data import SENTENCES, jpeg_bytes, png_bytes

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 6
REPLICA = {"num_cpus": 0.25, "access_log": False, "batch_wait_timeout_s": 0.1}  # 4 apps fit 2 CPUs
TIMEOUT = httpx.Timeout(120.0)


class App(NamedTuple):
    url: str  # the application's base URL; the API is under url + "/v1"
    model: str
    store: str

    @property
    def base(self) -> str:
        """The base model's name in requests."""
        return Path(self.model).name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_url(ray_cluster):
    """Serve's HTTP proxy on a free loopback port; shut down after this module."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _deploy(serve_url: str, name: str, model: str, store: str, task: str, **args) -> App:
    from ray import serve

    from actors.serve import build_app

    app = build_app({"model": model, "adapters": store, "task": task, **REPLICA, **args})
    serve.run(app, name=name, route_prefix=f"/{name}")
    return App(f"{serve_url}/{name}", model, store)


@pytest.fixture(scope="module")
def gen(serve_url, llama, tmp_path_factory) -> App:
    """Generate on the Llama adapters (a private copy of the store: the tests add to it)."""
    model, store = llama
    copy = tmp_path_factory.mktemp("serve") / "store"
    shutil.copytree(store, copy)
    return _deploy(serve_url, "gen", model, str(copy), "generate", max_new_tokens=MAX_TOKENS, max_batch_size=16,
                   max_pending_rows=24, enable_adapter_management=True)


@pytest.fixture(scope="module")
def gen_coalescer(serve_url, llama) -> App:
    """Generate on the Llama adapters with the coalescer (whole batches, no streaming)."""
    return _deploy(serve_url, "gen_coalescer", *llama, "generate", max_new_tokens=MAX_TOKENS, max_batch_size=16,
                   batcher="coalescer")


@pytest.fixture(scope="module")
def cls(serve_url, bert) -> App:
    return _deploy(serve_url, "cls", *bert, "classify", batcher="serve.batch")  # Ray's batching, the other batcher


@pytest.fixture(scope="module")
def emb(serve_url, bert_embed) -> App:
    return _deploy(serve_url, "emb", *bert_embed, "embed")


@pytest.fixture(scope="module")
def img(serve_url, vit) -> App:
    return _deploy(serve_url, "img", *vit, "classify-image")


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=TIMEOUT) as c:
        yield c


def _post_all(requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    """POST every (url, body) at once, as concurrent clients do."""
    async def run():
        async with httpx.AsyncClient(timeout=TIMEOUT) as c:
            return await asyncio.gather(*(c.post(url, json=body) for url, body in requests))

    return asyncio.run(run())


def _stats(app: App) -> dict:
    return httpx.get(f"{app.url}/v1/stats", timeout=TIMEOUT).json()


def _new_batches(app: App, before: dict) -> list[dict]:
    """The batches served since `before` (a /v1/stats answer)."""
    after = _stats(app)
    new = after["batches"] - before["batches"]
    return after["recent_batches"][-new:] if new else []


def _adapters(app: App) -> list[str]:
    return sorted(p.name for p in Path(app.store).iterdir())


def _expected_completion(app: App, model: str, prompt: str, **kw) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of the oracle."""
    adapter = None if model == app.base else model
    text, n, reason = oracle.generate(app.model, app.store, adapter, prompt, kw.pop("max_tokens", MAX_TOKENS), **kw)
    return text, reason, n


def _check_completion(app: App, response: httpx.Response, model: str, prompts: list[str]) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["object"], body["model"], len(body["choices"])) == ("text_completion", model, len(prompts))
    tokens = 0
    for i, (choice, prompt) in enumerate(zip(body["choices"], prompts)):
        text, reason, n = _expected_completion(app, model, prompt)
        assert (choice["index"], choice["text"], choice["finish_reason"], choice["logprobs"]) == (i, text, reason, None)
        tokens += n
    prompt_tokens = sum(len(oracle.processor(app.model, "generate")(p).input_ids) for p in prompts)
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                             "total_tokens": prompt_tokens + tokens}


def _assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


# ---------------------------------------------------------------------------------------
# Generate
# ---------------------------------------------------------------------------------------


def test_models_lists_base_and_adapters(gen, client):
    body = client.get(f"{gen.url}/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [gen.base, *_adapters(gen)]
    assert all(m["object"] == "model" for m in body["data"])


def test_completions_equal_oracle(gen, client):
    prompts = [SENTENCES[0][:20], SENTENCES[5][:9]]
    for model in (gen.base, "lora-qv", "vera"):
        response = client.post(f"{gen.url}/v1/completions", json={"model": model, "prompt": prompts,
                                                                   "max_tokens": MAX_TOKENS})
        _check_completion(gen, response, model, prompts)
    one = client.post(f"{gen.url}/v1/completions", json={"model": "lora-rs", "prompt": "the cat"})  # server default
    _check_completion(gen, one, "lora-rs", ["the cat"])


def test_concurrent_adapters_coalesce_into_mixed_batches(gen_coalescer):
    gen = gen_coalescer
    models = [gen.base, *_adapters(gen)]
    prompts = [SENTENCES[i][: 8 + 3 * i] for i in range(len(models))]
    before = _stats(gen)
    responses = _post_all([(f"{gen.url}/v1/completions", {"model": m, "prompt": p})
                           for m, p in zip(models, prompts)])
    for model, prompt, response in zip(models, prompts, responses):
        _check_completion(gen, response, model, [prompt])
    batches = _new_batches(gen, before)
    assert sum(b["requests"] for b in batches) == len(models)
    assert any(b["requests"] > 1 and b["adapters"] > 1 for b in batches), batches


def test_bad_request_fails_alone_in_its_batch(gen_coalescer):
    gen = gen_coalescer
    too_long = " ".join(SENTENCES)  # far over the 128-token context
    requests = [("lora-qv", "the cat"), ("lora-rs", ""), ("vera", too_long), (gen.base, "hello"),
                ("lora-pattern", "we went to")]
    before = _stats(gen)
    responses = _post_all([(f"{gen.url}/v1/completions", {"model": m, "prompt": p}) for m, p in requests])
    _assert_error(responses[1], 400, "empty_input")
    _assert_error(responses[2], 400, "too_long")
    for i in (0, 3, 4):
        model, prompt = requests[i]
        _check_completion(gen, responses[i], model, [prompt])
    assert max(b["requests"] for b in _new_batches(gen, before)) == len(requests)  # all in one batch


def test_request_sampling_options_equal_oracle(gen):
    sampled = {"model": "lora-rs", "prompt": "the cat", "temperature": 0.9, "top_p": 0.8, "seed": 7}
    greedy = {"model": "lora-rs", "prompt": "the cat"}
    responses = _post_all([(f"{gen.url}/v1/completions", sampled), (f"{gen.url}/v1/completions", greedy)])
    text, reason, n = _expected_completion(gen, "lora-rs", "the cat", temperature=0.9, top_p=0.8, seed=7)
    choice = responses[0].json()["choices"][0]
    assert (choice["text"], choice["finish_reason"], responses[0].json()["usage"]["completion_tokens"]) == (
        text, reason, n)
    _check_completion(gen, responses[1], "lora-rs", ["the cat"])


def test_stop_string_ends_the_completion(gen, client):
    prompt = SENTENCES[0][:19]
    full, _, _ = _expected_completion(gen, gen.base, prompt, max_tokens=16)
    word = re.search(r"[a-z]{3,}", full[1:])
    if word is None:
        pytest.skip(f"the base model's text {full!r} has no word to stop on")
    stop = word.group(0)
    response = client.post(f"{gen.url}/v1/completions", json={"model": gen.base, "prompt": prompt, "max_tokens": 16,
                                                              "stop": [stop, "never-seen"]})
    choice = response.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (full[: full.find(stop)], "stop")


def _nested(levels: int) -> dict:
    """A JSON object nested `levels` deep."""
    value: dict = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize("body, code", [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_body"),
    ({"prompt": "x"}, "invalid_body"),  # no model
    ({"model": "lora-qv", "prompt": [1, 2, 3]}, "invalid_body"),  # token ids
    ({"model": "lora-qv", "prompt": []}, "empty_input"),
    ({"model": "lora-qv", "prompt": "x", "max_tokens": 0}, "invalid_body"),
    ({"model": "lora-qv", "prompt": "x", "temperature": -1}, "invalid_body"),
    ({"model": "lora-qv", "prompt": "x", "top_p": 1.5}, "invalid_body"),
    ({"model": "lora-qv", "prompt": "x", "n": 0}, "invalid_body"),
    ({"model": "lora-qv", "prompt": "x", "logprobs": 21}, "invalid_body"),  # over vLLM's 20
    ({"model": "lora-qv", "prompt": "x", "best_of": 3}, "unsupported"),
    ({"model": "lora-qv", "prompt": "x", "echo": True}, "unsupported"),
    ({"model": "lora-qv", "prompt": "x", "stream_options": {"include_usage": True}}, "bad_parameter"),  # no stream
    ({"model": "lora-qv", "prompt": "x", "stream": True, "stream_options": {"colour": 1}}, "bad_parameter"),
    ({"model": "lora-qv", "prompt": "x", "stop": ""}, "bad_parameter"),
    ({"model": "lora-qv", "prompt": "x", "colour": "red"}, "invalid_body"),
    ({"model": "lora-qv", "prompt": "x", "max_tokens": 500}, "too_long"),
    ({"model": "lora-qv", "prompt": ["x"] * 25}, "too_many_inputs"),  # over max_pending_rows
    (b"[" * 100_000, "invalid_json"),  # nested deeper than the JSON reader recurses: 400, not a 500
    (b'{"model": "lora-qv", "prompt": "x", "logit_bias": ' + b'{"a": ' * 64 + b"1" + b"}" * 65, "invalid_json"),
    ({"model": "lora-qv", "prompt": "x", "stream_options": _nested(63)}, "bad_parameter"),  # 64 levels: parsed
], ids=lambda v: None if isinstance(v, (dict, bytes)) else v)
def test_bad_bodies_get_400(gen, client, body, code):
    url = f"{gen.url}/v1/completions"
    response = client.post(url, content=body) if isinstance(body, bytes) else client.post(url, json=body)
    assert _assert_error(response, 400, code)["type"] == "invalid_request_error"


def test_deep_nesting_gets_400_in_json_not_a_500(gen, client):
    for body in (b"[" * 100_000, b'{"model": "lora-qv", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        response = client.post(f"{gen.url}/v1/completions", content=body)
        assert response.headers["content-type"] == "application/json"
        error = _assert_error(response, 400, "invalid_json")
        assert re.search(r"nests arrays and objects 10000[01] levels deep; at most 64", error["message"]), error


def test_unknown_model_and_other_tasks_get_404(gen, client):
    _assert_error(client.post(f"{gen.url}/v1/completions", json={"model": "nope", "prompt": "x"}), 404,
                  "model_not_found")
    _assert_error(client.post(f"{gen.url}/v1/completions", json={"model": "../lora-qv", "prompt": "x"}), 404)
    _assert_error(client.post(f"{gen.url}/v1/embeddings", json={"model": gen.base, "input": "x"}), 404, "not_found")
    _assert_error(client.post(f"{gen.url}/v1/classify", json={"model": gen.base, "input": "x"}), 404, "not_found")
    _assert_error(client.get(f"{gen.url}/v1/nothing-here"), 404, "not_found")


def test_body_over_10_mib_gets_413(gen, client):
    big = b"x" * (10 * 1024 * 1024 + 1)
    _assert_error(client.post(f"{gen.url}/v1/completions", content=big), 413, "request_too_large")

    def chunks():  # no Content-Length: the size is counted while reading
        for _ in range(11):
            yield b" " * (1024 * 1024)

    _assert_error(client.post(f"{gen.url}/v1/completions", content=chunks()), 413, "request_too_large")
    ok = client.post(f"{gen.url}/v1/completions", json={"model": "lora-qv", "prompt": "x" * 50})
    assert ok.status_code == 200, ok.text


def test_overload_gets_503_and_the_admitted_request_completes(gen):
    body = {"model": "lora-qv", "prompt": [SENTENCES[i][:12] for i in range(20)], "max_tokens": 20}
    first, second = _post_all([(f"{gen.url}/v1/completions", body)] * 2)  # 40 rows > max_pending_rows 24
    statuses = sorted([first.status_code, second.status_code])
    assert statuses == [200, 503], (first.text, second.text)
    refused = first if first.status_code == 503 else second
    _assert_error(refused, 503, "overloaded")
    assert refused.headers["retry-after"] == "1"
    assert _stats(gen)["pending_rows"] == 0


def test_openai_client_completions(gen):
    import openai

    client = openai.OpenAI(base_url=f"{gen.url}/v1", api_key="unused", max_retries=0)
    prompts = ["the cat", SENTENCES[3][:15]]
    completion = client.completions.create(model="lora-pattern", prompt=prompts, max_tokens=MAX_TOKENS)
    for choice, prompt in zip(completion.choices, prompts):
        assert (choice.text, choice.finish_reason) == _expected_completion(gen, "lora-pattern", prompt)[:2]
    assert [m.id for m in client.models.list()] == [gen.base, *_adapters(gen)]
    with pytest.raises(openai.NotFoundError, match="'missing' does not exist") as missing:
        client.completions.create(model="missing", prompt="x")
    with pytest.raises(openai.BadRequestError, match="exceed the model's context") as too_long:
        client.completions.create(model=gen.base, prompt="x", max_tokens=1000)
    assert (missing.value.code, too_long.value.code) == ("model_not_found", "too_long")


def _openai(app: App):
    import openai

    return openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0)


def test_streamed_completions_equal_the_answer_without_streaming(gen):
    """The openai client's stream=True for every adapter and the base model at once (their
    rows share decoding steps): the chunks add up to PEFT's text and to the non-streamed
    answer; the last chunk carries the usage."""
    import concurrent.futures

    client = _openai(gen)
    models = [gen.base, *_adapters(gen)]
    prompts = {m: SENTENCES[i][: 8 + 4 * i] for i, m in enumerate(models)}

    def streamed(model: str) -> list:
        return list(client.completions.create(model=model, prompt=prompts[model], max_tokens=MAX_TOKENS, stream=True,
                                              stream_options={"include_usage": True}))

    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        chunks = dict(zip(models, pool.map(streamed, models)))
    for model, got in chunks.items():
        text, reason, n = _expected_completion(gen, model, prompts[model])
        with_choice = [c for c in got if c.choices]
        assert len(with_choice) > 1 and all(c.object == "text_completion" and c.model == model for c in got)
        assert "".join(c.choices[0].text for c in with_choice) == text, model
        assert [c.choices[0].finish_reason for c in with_choice] == [None] * (len(with_choice) - 1) + [reason]
        assert got[-1].choices == [] and got[-1].usage.completion_tokens == n
        plain = client.completions.create(model=model, prompt=prompts[model], max_tokens=MAX_TOKENS)
        assert (plain.choices[0].text, plain.usage) == (text, got[-1].usage)


def test_n_copies_sample_with_seed_plus_k_streamed_or_not(gen, client):
    """n > 1: choice i * n + k is input i's copy k, sampled with seed + k (PEFT's generate with
    that seed); the stream interleaves the choices by index and adds up to the same texts."""
    prompts = ["the cat", SENTENCES[2][:12]]
    body = {"model": "lora-rs", "prompt": prompts, "n": 2, "temperature": 0.9, "seed": 5, "max_tokens": MAX_TOKENS}
    answer = client.post(f"{gen.url}/v1/completions", json=body).json()
    expected = [_expected_completion(gen, "lora-rs", p, temperature=0.9, seed=5 + k) for p in prompts for k in (0, 1)]
    assert [(c["index"], c["text"], c["finish_reason"]) for c in answer["choices"]] == [
        (i, text, reason) for i, (text, reason, _) in enumerate(expected)]
    assert expected[0][0] != expected[1][0], "both copies drew the same text: the seed rule would go unseen"
    prompt_tokens = sum(len(oracle.processor(gen.model, "generate")(p).input_ids) for p in prompts)
    assert answer["usage"]["prompt_tokens"] == prompt_tokens  # each prompt counted once, as OpenAI does
    assert answer["usage"]["completion_tokens"] == sum(n for _, _, n in expected)
    texts = [""] * 4
    for chunk in _openai(gen).completions.create(**body, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [text for text, _, _ in expected]


def test_completion_logprobs_are_the_models_log_softmax(gen, client):
    """logprobs=2: each token, its logprob and the two likeliest tokens are PEFT's
    log_softmax over the prompt and the tokens before it; streamed, the same entries."""
    import torch

    body = {"model": "vera", "prompt": "the cat", "max_tokens": 3, "logprobs": 2}
    logprobs = client.post(f"{gen.url}/v1/completions", json=body).json()["choices"][0]["logprobs"]
    tokenizer = oracle.processor(gen.model, "generate")
    peft = oracle.oracle_model(gen.model, gen.store, "vera", "generate")
    ids = tokenizer("the cat").input_ids
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        with torch.no_grad():
            expected = torch.log_softmax(peft(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        chosen = int(expected.argmax())
        assert token == tokenizer.decode([chosen]) and logprob == pytest.approx(float(expected[chosen]), abs=1e-4)
        values, best = expected.topk(2)
        assert top == pytest.approx({tokenizer.decode([t]): float(v) for t, v in zip(best, values)}, abs=1e-4)
        ids.append(chosen)
    assert len(logprobs["tokens"]) == 3 and logprobs["text_offset"][0] == 0
    streamed = [c.choices[0].logprobs for c in _openai(gen).completions.create(**body, stream=True) if c.choices]
    assert [t for lp in streamed if lp for t in lp.tokens] == logprobs["tokens"]
    assert [v for lp in streamed if lp for v in lp.token_logprobs] == pytest.approx(logprobs["token_logprobs"])


def test_a_client_that_disconnects_frees_its_row(gen):
    """Closing the connection mid-stream takes the row out of the batch at the next step."""
    before = _stats(gen)["continuous"]
    body = {"model": "lora-qv", "prompt": "x", "max_tokens": 120, "stream": True, "logprobs": 20}
    with httpx.stream("POST", f"{gen.url}/v1/completions", json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith("data: "))  # it is decoding
    deadline = time.monotonic() + 60
    while True:
        stats = _stats(gen)
        if stats["continuous"]["rows_cancelled"] > before["rows_cancelled"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert stats["continuous"]["rows_cancelled"] == before["rows_cancelled"] + 1
    assert stats["continuous"]["live_rows"] == 0 and stats["pending_rows"] == 0


@pytest.mark.parametrize("field", [{"stream": True}, {"n": 2}, {"logprobs": 1}])
def test_the_coalescer_refuses_what_needs_the_continuous_batcher(gen_coalescer, client, field):
    response = client.post(f"{gen_coalescer.url}/v1/completions", json={"model": "lora-qv", "prompt": "x", **field})
    assert "start it with batcher=continuous" in _assert_error(response, 400, "unsupported")["message"]


def test_load_and_unload_adapter(gen, client):
    url = f"{gen.url}/v1"
    shutil.copytree(Path(gen.store) / "lora-rs", Path(gen.store) / "late")
    prompt = {"model": "late", "prompt": "the cat"}
    _assert_error(client.post(f"{url}/completions", json=prompt), 404, "model_not_found")
    loaded = client.post(f"{url}/load_lora_adapter", json={"lora_name": "late"})
    assert loaded.status_code == 200 and loaded.json()["status"] == "loaded", loaded.text
    assert "late" in [m["id"] for m in client.get(f"{url}/models").json()["data"]]
    _check_completion(gen, client.post(f"{url}/completions", json=prompt), "late", ["the cat"])
    again = client.post(f"{url}/load_lora_adapter", json={"lora_name": "late", "lora_path": str(Path(gen.store) / "late")})
    assert again.json()["status"] == "already_loaded"

    outside = Path(gen.store).parent / "outside"
    shutil.copytree(Path(gen.store) / "lora-qv", outside)
    _assert_error(client.post(f"{url}/load_lora_adapter", json={"lora_name": "outside", "lora_path": str(outside)}),
                  400, "path_outside_store")
    _assert_error(client.post(f"{url}/load_lora_adapter", json={"lora_name": "late", "lora_path": "../outside"}),
                  400, "path_outside_store")
    _assert_error(client.post(f"{url}/load_lora_adapter", json={"lora_name": "../outside"}), 400, "bad_adapter_id")
    _assert_error(client.post(f"{url}/load_lora_adapter", json={"lora_name": "absent"}), 404, "adapter_not_found")
    _assert_error(client.post(f"{url}/load_lora_adapter", json={"lora_name": gen.base}), 400, "bad_adapter_id")
    rotten = Path(shutil.copytree(Path(gen.store) / "lora-qv", Path(gen.store) / "rotten")) / "adapter_model.safetensors"
    tensors = load_file(str(rotten))
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(rotten))
    refused = _assert_error(client.post(f"{url}/load_lora_adapter", json={"lora_name": "rotten"}), 400, "bad_adapter")
    assert refused["message"] == f"adapter 'rotten': its weights are not finite (NaN or inf in {key}); the adapter is " \
        "broken (e.g. a diverged training run): retrain or re-save it"  # the message every entry point gives
    shutil.rmtree(rotten.parent)

    assert client.post(f"{url}/unload_lora_adapter", json={"lora_name": "late"}).json()["status"] == "unloaded"
    _assert_error(client.post(f"{url}/completions", json=prompt), 404, "model_not_found")
    _assert_error(client.post(f"{url}/unload_lora_adapter", json={"lora_name": "late"}), 404, "adapter_not_found")
    shutil.rmtree(Path(gen.store) / "late")


def test_every_kind_loads_and_serves_in_one_mixed_batch(gen, client):
    """DoRA, trainable tokens, AdaLoRA, LoHa, IA3, LoKr, OFT, BOFT, prompt-tuning, P-tuning and
    prefix-tuning adapters copied into the store (which holds LoRA and VeRA) load through
    /v1/load_lora_adapter (the canary runs for each) and answer concurrent requests of every
    type as PEFT does."""
    from peft import (AdaLoraConfig, BOFTConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig,
                      PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig)
    from transformers import AutoModelForCausalLM

    from testkit.adapters import save_adapter

    configs = {
        "late-dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, target_modules=["q_proj"]),
        "late-tokens": LoraConfig(r=2, init_lora_weights=False, target_modules=["v_proj"],
                                  trainable_token_indices=oracle.processor(gen.model, "generate")("the cat").input_ids),
        "late-adalora": AdaLoraConfig(init_r=4, lora_alpha=8, total_step=10, target_modules=["q_proj", "v_proj"]),
        "late-loha": LoHaConfig(r=2, alpha=4, target_modules=["v_proj", "up_proj"]),
        "late-ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "late-lokr": LoKrConfig(r=2, alpha=64, target_modules=["v_proj", "up_proj"]),
        "late-oft": OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "gate_proj"]),
        "late-boft": BOFTConfig(boft_block_size=8, target_modules=["o_proj"]),
        "late-prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "late-ptune": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=32),
        "late-prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }
    url = f"{gen.url}/v1"
    for seed, (name, config) in enumerate(configs.items(), start=21):
        save_adapter(gen.model, gen.store, name, config, model_class=AutoModelForCausalLM, seed=seed)
        loaded = client.post(f"{url}/load_lora_adapter", json={"lora_name": name})
        assert loaded.status_code == 200 and loaded.json()["status"] == "loaded", loaded.text
    try:
        models = [*configs, gen.base, "lora-qv", "vera", *list(configs)[::2]]  # within max_pending_rows
        prompts = [SENTENCES[i % 5][: 7 + 5 * (i % 4)] for i in range(len(models))]
        responses = _post_all([(f"{url}/completions", {"model": m, "prompt": p}) for m, p in zip(models, prompts)])
        for model, prompt, response in zip(models, prompts, responses):
            _check_completion(gen, response, model, [prompt])
    finally:
        for name in configs:
            client.post(f"{url}/unload_lora_adapter", json={"lora_name": name})
            shutil.rmtree(Path(gen.store) / name)


# ---------------------------------------------------------------------------------------
# Classify, embed, classify-image
# ---------------------------------------------------------------------------------------


def test_classify_equals_oracle(cls):
    models = [cls.base, *_adapters(cls)]
    texts = [[SENTENCES[i][:14], SENTENCES[i + 7][:30]] for i in range(len(models))]
    before = _stats(cls)
    responses = _post_all([(f"{cls.url}/v1/classify", {"model": m, "input": t}) for m, t in zip(models, texts)])
    for model, pair, response in zip(models, texts, responses):
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        for i, (row, text) in enumerate(zip(data, pair)):
            expected = oracle.scores(cls.model, cls.store, None if model == cls.base else model, "classify", text)
            oracle.assert_close(row["scores"], expected, what=model)
            assert row["index"] == i and row["label_id"] == max(range(len(expected)), key=expected.__getitem__)
            assert row["label"] == {0: "negative", 1: "neutral", 2: "positive"}[row["label_id"]]
    assert any(b["adapters"] > 1 for b in _new_batches(cls, before))


def test_classify_refuses_images_and_adapter_management_is_off(cls, client):
    _assert_error(client.post(f"{cls.url}/v1/classify", json={"model": cls.base, "images": ["aGk="]}), 400,
                  "invalid_body")
    _assert_error(client.post(f"{cls.url}/v1/classify", json={"model": cls.base, "input": ""}), 400, "empty_input")
    _assert_error(client.post(f"{cls.url}/v1/completions", json={"model": cls.base, "prompt": "x"}), 404, "not_found")
    for endpoint in ("load_lora_adapter", "unload_lora_adapter"):
        _assert_error(client.post(f"{cls.url}/v1/{endpoint}", json={"lora_name": "head-a"}), 404, "not_found")


def test_embeddings_equal_oracle(emb):
    models = [emb.base, *_adapters(emb)]
    texts = [SENTENCES[2][:25], SENTENCES[9]]
    responses = _post_all([(f"{emb.url}/v1/embeddings", {"model": m, "input": texts}) for m in models])
    tokens = sum(len(oracle.processor(emb.model, "embed")(t).input_ids) for t in texts)
    for model, response in zip(models, responses):
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["object"], body["model"], body["usage"]) == (
            "list", model, {"prompt_tokens": tokens, "total_tokens": tokens})
        for i, (row, text) in enumerate(zip(body["data"], texts)):
            assert (row["object"], row["index"]) == ("embedding", i)
            expected = oracle.embedding(emb.model, emb.store, None if model == emb.base else model, text)
            oracle.assert_close(row["embedding"], expected, what=model)


def test_openai_client_embeddings(emb):
    import openai

    client = openai.OpenAI(base_url=f"{emb.url}/v1", api_key="unused", max_retries=0)
    texts = ["the cat sat", SENTENCES[4]]
    expected = [oracle.embedding(emb.model, emb.store, "emb-a", t) for t in texts]
    for options in ({}, {"encoding_format": "float"}):  # by default the client asks for base64 and decodes it
        result = client.embeddings.create(model="emb-a", input=texts, **options)
        for row, vector in zip(result.data, expected):
            oracle.assert_close(row.embedding, vector, what=str(options))
    raw = client.embeddings.create(model="emb-a", input=texts, encoding_format="base64")
    for row, vector in zip(raw.data, expected):
        oracle.assert_close(np.frombuffer(base64.b64decode(row.embedding), dtype="<f4").tolist(), vector, what="raw")
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="emb-a", input="x", dimensions=8)


def test_classify_images_equals_oracle(img, client):
    images = [png_bytes(1, (40, 28)), jpeg_bytes(2, (32, 32))]
    encoded = [base64.b64encode(images[0]).decode(), "data:image/jpeg;base64," + base64.b64encode(images[1]).decode()]
    for model in (img.base, *_adapters(img)):
        response = client.post(f"{img.url}/v1/classify", json={"model": model, "images": encoded})
        assert response.status_code == 200, response.text
        for row, image in zip(response.json()["data"], images):
            expected = oracle.scores(img.model, img.store, None if model == img.base else model, "classify-image", image)
            oracle.assert_close(row["scores"], expected, what=model)
    _assert_error(client.post(f"{img.url}/v1/classify", json={"model": img.base, "images": ["%%%"]}), 400, "bad_image")
    not_an_image = base64.b64encode(b"hello").decode()
    _assert_error(client.post(f"{img.url}/v1/classify", json={"model": img.base, "images": [not_an_image]}), 400,
                  "bad_image")
    _assert_error(client.post(f"{img.url}/v1/classify", json={"model": img.base, "input": "x"}), 400, "invalid_body")


# ---------------------------------------------------------------------------------------
# Batching, options and entry points (no HTTP)
# ---------------------------------------------------------------------------------------


def test_coalescer_merges_what_arrives_during_a_call():
    from actors.serve.batching import Coalescer

    calls: list[list] = []

    async def run(items: list) -> list:
        calls.append(items)
        await asyncio.sleep(0.05)
        if "bad" in items:
            raise RuntimeError("model failed")
        return [f"out-{i}" for i in items]

    async def scenario():
        coalescer = Coalescer(run, max_items=4, wait_s=0.0)
        first = asyncio.ensure_future(coalescer.submit("a"))
        await asyncio.sleep(0.01)  # "a" runs alone; the next six arrive during its call
        rest = [asyncio.ensure_future(coalescer.submit(x)) for x in ("b", "bad", "c", "d", "e", "f")]
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        return results, coalescer.alive

    results, alive = asyncio.run(scenario())
    assert calls == [["a"], ["b", "bad", "c", "d"], ["e", "f"]]  # at most max_items per call, in arrival order
    assert results[0] == "out-a" and results[5:] == ["out-e", "out-f"]
    assert all(isinstance(r, RuntimeError) for r in results[1:5])  # a failed call fails only its own items
    assert alive


def test_coalescer_waits_for_company_when_idle():
    from actors.serve.batching import Coalescer

    calls: list[list] = []

    async def run(items: list) -> list:
        calls.append(items)
        return items

    async def scenario():
        coalescer = Coalescer(run, max_items=8, wait_s=0.1)
        first = asyncio.ensure_future(coalescer.submit(1))
        await asyncio.sleep(0.02)
        return await asyncio.gather(first, coalescer.submit(2))

    assert asyncio.run(scenario()) == [1, 2]
    assert calls == [[1, 2]]


def test_build_app_converts_and_checks_args(llama):
    from actors.serve.options import split_args

    model, store = llama
    predictor, options = split_args({"model": model, "adapters": store, "task": "generate", "max_batch_size": "8",
                                     "enable_adapter_management": "true", "stop": "###", "seed": "none",
                                     "num_cpus": "2"})
    assert (options.max_batch_size, options.enable_adapter_management, options.max_ongoing_requests) == (8, True, 32)
    assert (predictor["stop"], predictor["seed"], predictor.get("num_threads", 2)) == (["###"], None, 2)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['batch_size'\]"):
        split_args({"model": model, "task": "generate", "batch_size": 4})
    with pytest.raises(ValueError, match=r"max_ongoing_requests \(4\) must be >= max_batch_size \(8\)"):
        split_args({"model": model, "task": "generate", "max_batch_size": 8, "max_ongoing_requests": 4})
    with pytest.raises(ValueError, match="not a valid bool"):
        split_args({"model": model, "task": "generate", "canary": "maybe"})
    with pytest.raises(ValueError, match="no readable config.json"):
        split_args({"model": str(Path(store) / "missing"), "task": "generate"})
    with pytest.raises(ValueError, match="is not a readable folder"):
        split_args({"model": model, "adapters": str(Path(store) / "missing"), "task": "generate"})
    with pytest.raises(ValueError, match="batcher continuous decodes \\(task generate\\); task 'embed' takes"):
        split_args({"model": model, "task": "embed", "batcher": "continuous"})
    with pytest.raises(ValueError, match="batcher"):
        split_args({"model": model, "task": "generate", "batcher": "vllm"})
    assert [split_args({"model": model, "task": t})[1].batcher_for(t) for t in ("generate", "embed")] == [
        "continuous", "coalescer"]


def test_every_flag_has_help_from_its_field_metadata():
    from dataclasses import fields

    from actors.config import PredictorConfig
    from actors.serve.launch import build_parser
    from actors.serve.options import ServeOptions

    missing = [f.name for cls in (PredictorConfig, ServeOptions) for f in fields(cls) if not f.metadata.get("help")]
    assert missing == []
    helps = {a.dest: a.help for a in build_parser()._actions}
    assert helps["batcher"].startswith('"continuous" (task generate: requests join')
    assert helps["batcher"].endswith("(default: auto)")
    assert helps["stop"] == ("task generate: a stop string; a row's text ends before the first one it produces. "
                             "(repeat for several; default: [])")
    args = vars(build_parser().parse_args(["--model", "m", "--task", "generate", "--no-canary", "--stop", "a"]))
    assert (args["canary"], args["stop"], args["normalize"], args["max_batch_size"]) == (False, ["a"], None, None)


def test_serve_package_imports_one_way():
    # launch -> ingress -> model -> options, never back: options imports no other module of the package.
    import ast

    def imported(name: str) -> set[str]:
        tree = ast.parse((ROOT / "actors" / "serve" / name).read_text())
        return {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}

    assert not {m for m in imported("options.py") if m.startswith("actors.serve")}
    for name in ("ingress.py", "api.py"):  # FastAPI and pydantic resolve their annotations at run time
        assert "__future__" not in imported(name), name


def test_predictor_with_options_refuses_model_options(llama):
    from actors import Predictor

    p = Predictor(model=llama[0], adapters=None, task="generate", canary=False)
    view = p.with_options(top_p=0.5, stop=["x"])
    assert (view.config.top_p, view.config.stop, p.config.top_p, p.config.stop) == (0.5, ["x"], 1.0, [])
    with pytest.raises(ValueError, match=r"options \['dtype'\] change the loaded model"):
        p.with_options(dtype="float16")
    with pytest.raises(ValueError, match="top_p"):
        p.with_options(top_p=2.0)


def test_jobs_serve_refuses_a_bad_model_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "jobs/serve.py", "--model", str(tmp_path), "--task", "generate"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("serve.py: error: model folder")


@pytest.mark.slow
def test_jobs_serve_prints_url_streams_chat_and_stops_on_sigint(llama, tmp_path):
    """`jobs/serve.py` as a user starts it, on a model with a chat template: the openai
    client's `chat.completions.create(..., stream=True)` for every adapter and the base model
    equals the non-streamed answer and PEFT on the template's tokens; Ctrl-C stops it."""
    import signal

    import openai
    from transformers import AutoTokenizer

    from test_chat import TEMPLATE

    model = Path(shutil.copytree(llama[0], tmp_path / "model"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(model)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "jobs/serve.py", "--model", str(model), "--adapters", llama[1], "--task",
                             "generate", "--port", str(port), "--max-new-tokens", "3"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "stderr.log", "w"), text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        chat = [{"role": "user", "content": "the cat sat"}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        for name in [model.name, *sorted(p.name for p in Path(llama[1]).iterdir())]:
            chunks = list(client.chat.completions.create(model=name, messages=chat, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            plain = client.chat.completions.create(model=name, messages=chat)
            adapter = None if name == model.name else name
            expected, _, reason = oracle.generate_ids(str(model), llama[1], adapter, ids, 3)
            assert (text, plain.choices[0].message.content, plain.choices[0].finish_reason) == (
                expected, expected, reason), name
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
        assert proc.wait(timeout=120) == 0
        noise = (tmp_path / "stderr.log").read_text()
        assert "will not be applied" not in noise and "Loading weights" not in noise, noise[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
