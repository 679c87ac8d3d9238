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


def test_the_job_reads_a_messages_column(ray_cluster, llama_chat, tmp_path):
    model, store = llama_chat
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    table = pa.table({"id": [0, 1, 2], "messages": pa.array(CHATS, type=pa.list_(turn)), "adapter_id": ADAPTERS})
    pq.write_table(table, tmp_path / "in.parquet")
    run(config_from_args(["--model", model, "--adapters", store, "--task", "generate", "--input",
                          str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--num-cpus", "0.5",
                          "--max-new-tokens", "4"]))
    rows = sorted(pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist(), key=lambda r: r["id"])
    for row, chat, adapter in zip(rows, CHATS, ADAPTERS):
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
