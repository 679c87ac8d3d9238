"""Chat turns (`messages`) for task generate: rendered by the tokenizer's chat template, BOS
once, each row through its own adapter, equal to PEFT on what transformers' own
`apply_chat_template(..., tokenize=True)` gives."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import oracle
from actors.predictor import Predictor
from pipeline.config import config_from_args
from pipeline.job import run

# BOS in the template and in the tokenizer's post-processor: tokenizing the rendered text with
# special tokens would put it there twice.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHATS = [
    [{"role": "user", "content": "the cat sat"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a dog ran home"}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
     {"role": "user", "content": "the end"}],
]
ADAPTERS = ["lora-qv", None, "vera"]


@pytest.fixture(scope="module")
def llama_chat(llama, tmp_path_factory):
    """The session's Llama folder with a chat template in its tokenizer, and its store."""
    from transformers import AutoTokenizer

    model = tmp_path_factory.mktemp("llama_chat") / "model"
    shutil.copytree(llama[0], model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(model)
    return str(model), llama[1]


def _reference_ids(model: str, messages: list[dict]) -> list[int]:
    """transformers' own tokenization of the chat (the BOS rule's reference)."""
    ids = oracle.processor(model, "generate").apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_chat_rows_equal_peft_on_the_templates_tokens(llama_chat):
    model, store = llama_chat
    predictor = Predictor(model, store, "generate", max_new_tokens=5)
    bos = oracle.processor(model, "generate").bos_token_id
    for chat in CHATS:
        ids = predictor.task.chat_ids(chat)
        assert ids == _reference_ids(model, chat) and ids[0] == bos and ids[1] != bos
    out = predictor({"messages": CHATS, "adapter_id": ADAPTERS})
    for i, (chat, adapter) in enumerate(zip(CHATS, ADAPTERS)):
        expected = oracle.generate_ids(model, store, adapter, _reference_ids(model, chat), 5)
        assert (out["generated_text"][i], out["num_generated_tokens"][i], out["finish_reason"][i]) == expected
        assert out["num_input_tokens"][i] == len(_reference_ids(model, chat)) and out["error"][i] is None


@pytest.mark.parametrize("messages, error", [
    ([], "empty_input: messages is empty"),
    ([{"role": "user"}], "bad_parameter: messages[0] must have a string role and a string content"),
    (["hello"], "bad_parameter: messages[0] must have a string role and a string content"),
])
def test_malformed_turns_fail_their_row(llama_chat, messages, error):
    model, store = llama_chat
    out = Predictor(model, store, "generate", max_new_tokens=2)({"messages": [messages, CHATS[0]],
                                                                  "adapter_id": [None, None]})
    assert out["error"][0] == error and out["error"][1] is None


def test_a_model_without_a_chat_template_refuses_chat_rows(llama):
    out = Predictor(llama[0], llama[1], "generate", max_new_tokens=2)({"messages": [CHATS[0]], "adapter_id": [None]})
    assert out["error"][0].startswith("bad_parameter: the model's tokenizer has no chat template")


def test_a_batch_with_both_prompt_and_messages_is_refused(llama_chat):
    model, store = llama_chat
    with pytest.raises(ValueError, match="batch has both 'prompt' and 'messages' columns"):
        Predictor(model, store, "generate")({"prompt": ["a"], "messages": [CHATS[0]]})


def _every_model(store: str) -> list[str | None]:
    """Every adapter of the store, then the base model (None)."""
    from pathlib import Path

    return [*sorted(p.name for p in Path(store).iterdir()), None]


@pytest.fixture(scope="module")
def job_rows(ray_cluster, llama_chat, tmp_path_factory) -> list[dict]:
    """The batch job's output rows (by id) for chat i through the i-th of every adapter and
    the base model, 4 new tokens each."""
    model, store = llama_chat
    adapters = _every_model(store)
    tmp = tmp_path_factory.mktemp("chat_job")
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    chats = [CHATS[i % len(CHATS)] for i in range(len(adapters))]
    table = pa.table({"id": list(range(len(adapters))), "messages": pa.array(chats, type=pa.list_(turn)),
                      "adapter_id": adapters})
    pq.write_table(table, tmp / "in.parquet")
    run(config_from_args(["--model", model, "--adapters", store, "--task", "generate", "--input",
                          str(tmp / "in.parquet"), "--output", str(tmp / "out"), "--num-cpus", "0.5",
                          "--max-new-tokens", "4"]))
    return sorted(pads.dataset(str(tmp / "out"), format="parquet").to_table().to_pylist(), key=lambda r: r["id"])


def test_the_job_reads_a_messages_column(llama_chat, job_rows):
    model, store = llama_chat
    for i, (row, adapter) in enumerate(zip(job_rows, _every_model(store))):
        chat = CHATS[i % len(CHATS)]
        assert row["messages"] == chat and row["adapter_id"] == adapter  # passes through
        expected = oracle.generate_ids(model, store, adapter, _reference_ids(model, chat), 4)
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == expected


@pytest.mark.parametrize("case, message", [
    ("no_template", "input has a 'messages' column but model folder .*has no chat template"),
    ("both", "input has both 'prompt' and 'messages' columns"),
])
def test_the_job_refuses_up_front(llama, llama_chat, tmp_path, case, message):
    model = llama[0] if case == "no_template" else llama_chat[0]
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    columns = {"messages": pa.array([CHATS[0]], type=pa.list_(turn))}
    if case == "both":
        columns["prompt"] = ["hello"]
    pq.write_table(pa.table(columns), tmp_path / "in.parquet")
    with pytest.raises(ValueError, match=message):
        run(config_from_args(["--model", model, "--task", "generate", "--input", str(tmp_path / "in.parquet"),
                              "--output", str(tmp_path / "out")]))


@pytest.fixture(scope="module")
def chat_url(ray_cluster, llama_chat):
    """`/v1/chat/completions` of a generate deployment of the chat-template Llama."""
    import socket

    from ray import serve

    from actors.serve import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    model, store = llama_chat
    serve.run(build_app({"model": model, "adapters": store, "task": "generate", "num_cpus": 0.25,
                         "max_new_tokens": 5, "access_log": False, "served_model_name": ["my-llama", "alias"]}),
              name="chat", route_prefix="/chat")
    yield f"http://127.0.0.1:{port}/chat"
    serve.shutdown()


def test_openai_client_chat_completions(chat_url, llama_chat):
    """Each adapter and the base model, concurrently with a completion (a call of its own)."""
    import concurrent.futures
    from pathlib import Path

    import openai

    model, store = llama_chat
    client = openai.OpenAI(base_url=f"{chat_url}/v1", api_key="unused", max_retries=0)
    names = [a or "my-llama" for a in ADAPTERS]  # the base by its --served-model-name
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        chats = [pool.submit(client.chat.completions.create, model=name, messages=chat, max_tokens=5)
                 for name, chat in zip(names, CHATS)]
        completion = pool.submit(client.completions.create, model="lora-qv", prompt="the cat", max_tokens=5)
        for future, chat, adapter in zip(chats, CHATS, ADAPTERS):
            answer = future.result()
            text, generated, reason = oracle.generate_ids(model, store, adapter, _reference_ids(model, chat), 5)
            assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
            assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (text, reason)
            assert answer.usage.prompt_tokens == len(_reference_ids(model, chat))
            assert answer.usage.completion_tokens == generated
        assert completion.result().choices[0].text == oracle.generate(model, store, "lora-qv", "the cat", 5)[0]


@pytest.mark.parametrize("body, code", [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "invalid_body"),
    ({"messages": []}, "invalid_body"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "bad_parameter"),  # without logprobs
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "invalid_body"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "invalid_body"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, "bad_parameter"),
])
def test_chat_bodies_switchyard_cannot_answer_get_400(chat_url, llama_chat, body, code):
    import httpx

    response = httpx.post(f"{chat_url}/v1/chat/completions", json={"model": "alias", **body}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == code, response.text


def test_served_model_names_and_health(chat_url, llama_chat):
    """--served-model-name replaces the folder's name, as in vLLM; /health answers 200."""
    from pathlib import Path

    import httpx

    assert httpx.get(f"{chat_url}/v1/models", timeout=60).json()["data"][0]["id"] == "my-llama"
    body = {"messages": CHATS[0], "max_tokens": 2}
    assert httpx.post(f"{chat_url}/v1/chat/completions", json={"model": "alias", **body}, timeout=60).status_code == 200
    folder = httpx.post(f"{chat_url}/v1/chat/completions", json={"model": Path(llama_chat[0]).name, **body}, timeout=60)
    assert folder.status_code == 404 and folder.json()["error"]["code"] == "model_not_found"
    health = httpx.get(f"{chat_url}/health", timeout=60)
    assert (health.status_code, health.json()) == (200, {})


def test_no_chat_template_is_a_400_naming_it():
    from actors.config import NO_CHAT_TEMPLATE
    from actors.serve.api import row_error

    error = row_error([{"error": f"bad_parameter: {NO_CHAT_TEMPLATE}"}], "messages")
    assert (error.status, error.code) == (400, "bad_parameter") and "has no chat template" in error.message


def test_openai_client_streams_chat_for_every_adapter_and_the_base(chat_url, llama_chat, job_rows):
    """`chat.completions.create(..., stream=True)` for every adapter and the base model at
    once: the role chunk, then the content, adds up to the non-streamed answer and to the
    batch job's output for the same chat."""
    import concurrent.futures

    import openai

    model, store = llama_chat
    client = openai.OpenAI(base_url=f"{chat_url}/v1", api_key="unused", max_retries=0)
    names = [a or "my-llama" for a in _every_model(store)]

    def streamed(i: int) -> list:
        return list(client.chat.completions.create(model=names[i], messages=CHATS[i % len(CHATS)], max_tokens=4,
                                                   stream=True, stream_options={"include_usage": True}))

    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        streams = list(pool.map(streamed, range(len(names))))
    for i, (chunks, row) in enumerate(zip(streams, job_rows)):
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert deltas[0].role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
        text = "".join(d.content or "" for d in deltas)
        assert text == row["generated_text"], names[i]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == row["finish_reason"]
        assert chunks[-1].usage.completion_tokens == row["num_generated_tokens"]
        assert chunks[-1].usage.prompt_tokens == row["num_input_tokens"]
        plain = client.chat.completions.create(model=names[i], messages=CHATS[i % len(CHATS)], max_tokens=4)
        assert plain.choices[0].message.content == text


def test_chat_logprobs_and_n(chat_url, llama_chat):
    """logprobs with top_logprobs, as OpenAI's chat shape has them, for n = 2 greedy copies
    (equal: greedy ignores the seed), each token PEFT's log_softmax over the chat's tokens."""
    import openai
    import torch

    model, store = llama_chat
    client = openai.OpenAI(base_url=f"{chat_url}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="lora-qv", messages=CHATS[1], max_tokens=3, n=2, logprobs=True,
                                            top_logprobs=1)
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.choices[0].message.content == answer.choices[1].message.content
    peft = oracle.oracle_model(model, store, "lora-qv", "generate")
    tokenizer = oracle.processor(model, "generate")
    ids = _reference_ids(model, CHATS[1])
    for entry in answer.choices[0].logprobs.content:
        with torch.no_grad():
            expected = torch.log_softmax(peft(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        chosen = int(expected.argmax())
        assert entry.token == tokenizer.decode([chosen])
        assert entry.logprob == pytest.approx(float(expected[chosen]), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [entry.token]
        ids.append(chosen)
    assert len(answer.choices[0].logprobs.content) == answer.usage.completion_tokens // 2
