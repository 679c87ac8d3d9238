"""One store holding one adapter of every routed PEFT type (LoRA, DoRA, trainable tokens,
VeRA, AdaLoRA, LoHa, IA3, LoKr, OFT, BOFT, prompt tuning, P-tuning, prefix tuning) on Llama:
mixed generate batches through the Predictor and through the batch job, each row against
PEFT alone on that row alone (greedy over PEFT's forward for the prompt-learning types)."""

from __future__ import annotations

import pyarrow as pa
import pytest
from peft import (AdaLoraConfig, BOFTConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig,
                  PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, VeraConfig)

import oracle
from testkit.data import SENTENCES
from test_kinds import _predictor, _store

LINEAR = ["q_proj", "v_proj", "up_proj"]


def _configs(tokens: list[int]) -> dict:
    lora = {"init_lora_weights": False}
    return {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR, **lora),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj", "down_proj"], **lora),
        "tokens": LoraConfig(r=2, target_modules=["o_proj"], trainable_token_indices=tokens, **lora),
        "vera": VeraConfig(r=8, target_modules=LINEAR),
        "adalora": AdaLoraConfig(init_r=4, lora_alpha=8, total_step=10, target_modules=LINEAR),
        "loha": LoHaConfig(r=2, alpha=4, target_modules=LINEAR),
        "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "lokr": LoKrConfig(r=2, alpha=64, target_modules=LINEAR),
        "oft": OFTConfig(r=0, oft_block_size=8, target_modules=LINEAR),
        "boft": BOFTConfig(boft_block_size=8, target_modules=["q_proj", "gate_proj"]),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "p-tuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=32),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }


@pytest.fixture(scope="module")
def every_type(llama, tmp_path_factory):
    """(model dir, store dir): the session's Llama with one adapter of every type."""
    from transformers import AutoModelForCausalLM

    model, _ = llama
    tok = oracle.processor(model, "generate")
    tokens = list(dict.fromkeys(tok(" ".join(SENTENCES[:3]), add_special_tokens=False).input_ids))[:3]
    return model, _store(model, tmp_path_factory.mktemp("every_type"), AutoModelForCausalLM, _configs(tokens))


def _check(model: str, store: str, rows: list[dict], n_new: int) -> None:
    for row in rows:
        assert row["error"] is None, row
        expected = oracle.generate(model, store, row["adapter_id"], row["prompt"], n_new)
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == expected, row


def _table(ids: list[str], fan_out: bool) -> pa.Table:
    """Every type once, base rows (None and ""), ragged prompts; with `fan_out`, one prompt
    also named by five adapters of different types."""
    named = [[a] for a in ids] + [[None], [""]]
    if fan_out:
        named.append(["prefix", "prompt", "lokr", None, "dora"])
    prompts = [SENTENCES[k % len(SENTENCES)][: 5 + 7 * (k % 5)] for k in range(len(named))]
    return pa.table({"id": list(range(len(named))), "prompt": prompts,
                     "adapter_ids": pa.array(named, pa.list_(pa.string()))})


def test_every_type_in_one_mixed_batch_equals_the_oracle(every_type):
    model, store = every_type
    p = _predictor(model, store, "generate", max_new_tokens=4)
    ids = sorted(p.adapter_ids)
    assert ids == sorted(_configs([1]))
    rows = p(_table(ids, fan_out=True)).to_pylist()
    assert len(rows) == len(ids) + 2 + 5
    assert {r["adapter_id"] for r in rows} == {*ids, None}  # a fan-out's base rows are null, "" or null named
    _check(model, store, rows, 4)


def test_every_type_through_the_batch_job(ray_cluster, every_type, tmp_path):
    from test_job import _job

    model, store = every_type
    ids = sorted(_configs([1]))
    rows = _job(tmp_path, model, store, "generate", _table(ids, fan_out=True), "--max-new-tokens", "3")
    assert len(rows) == len(ids) + 2 + 5
    _check(model, store, rows, 3)
