"""`truncate=True` (`--truncate`): a text over the context is cut as the tokenizer's
`truncation=True, max_length=...` cuts it (room left for max_new_tokens), then runs as PEFT
runs the cut text; without it the row is refused as too_long (the default)."""

from __future__ import annotations

import pyarrow as pa
import torch

import oracle
from actors import Predictor
from testkit.data import SENTENCES

LONG = " ".join(SENTENCES * 8)  # well over the test models' 128 positions


def _cut(model: str, task: str, limit: int) -> dict:
    return oracle.processor(model, task)(LONG, truncation=True, max_length=limit, return_tensors="pt")


def test_classify_and_embed_cut_to_the_context(bert, bert_embed):
    model, store = bert
    p = Predictor(model=model, adapters=store, task="classify", truncate=True)
    rows = p(pa.table({"text": [LONG, LONG], "adapter_id": ["head-a", None]})).to_pylist()
    for row in rows:
        peft = oracle.oracle_model(model, store, row["adapter_id"], "classify")
        with torch.no_grad():
            expected = torch.softmax(peft(**_cut(model, "classify", 128)).logits[0], -1)
        oracle.assert_close(row["scores"], expected.tolist(), what=str(row["adapter_id"]))
    refused = Predictor(model=model, adapters=store, task="classify", canary=False)
    assert refused(pa.table({"text": [LONG]})).to_pylist()[0]["error"].startswith("too_long:")
    model, store = bert_embed
    p = Predictor(model=model, adapters=store, task="embed", truncate=True)
    row = p(pa.table({"text": [LONG], "adapter_id": ["emb-a"]})).to_pylist()[0]
    with torch.no_grad():
        hidden = oracle.oracle_model(model, store, "emb-a", "embed")(**_cut(model, "embed", 128)).last_hidden_state
    oracle.assert_close(row["embedding"], hidden[0].mean(0).tolist(), what="emb-a")


def test_generate_leaves_room_for_the_new_tokens(llama):
    model, store = llama
    p = Predictor(model=model, adapters=store, task="generate", max_new_tokens=3, truncate=True)
    rows = p(pa.table({"prompt": [LONG, LONG], "adapter_id": ["lora-qv", None]})).to_pylist()
    ids = _cut(model, "generate", 128 - 3)["input_ids"]
    tok = oracle.processor(model, "generate")
    for row in rows:
        assert row["error"] is None and row["num_input_tokens"] == 125
        peft = oracle.oracle_model(model, store, row["adapter_id"], "generate")
        with torch.no_grad():
            out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                do_sample=False, pad_token_id=tok.pad_token_id)
        expected = oracle._finish(tok, peft, out[0, ids.shape[1]:].tolist())
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == expected
