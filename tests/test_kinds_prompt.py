"""Prompt tuning, P-tuning and prefix tuning rows in mixed batches against the oracle: PEFT
alone, each row alone (for generation: decoded greedily over PEFT's forward on the whole
sequence without a cache, as PEFT 0.21.2's own generate() is wrong for prompt learning on
transformers 5), with rows of other types and base rows, ragged lengths, fan-out, and batches
of prompt rows only or prefix rows only; generation on Llama (grouped-query attention) and
GPT-2 (absolute positions), classification (per-adapter heads) and embeddings on BERT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

import oracle
from actors import Predictor
from testkit.adapters import save_adapter
from testkit.data import SENTENCES
from test_kinds import PROFILE, _predictor, _store

PROMPTS = {
    "prompt-4": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prompt-9": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=9),
    "p-tuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, encoder_hidden_size=32),
    "prefix-3": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix-8": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prefix_projection=True,
                                   encoder_hidden_size=32),
}


@pytest.fixture(scope="module")
def llama_prompts(llama, tmp_path_factory):
    """(model dir, store dir): Llama with prompt tuning (4 and 9 virtual tokens), P-tuning,
    prefix tuning (3 and 8, with a projection), and LoRA adapters of the session store (one on
    the embedding the virtual tokens bypass)."""
    from transformers import AutoModelForCausalLM

    model, store = llama
    copies = {a: Path(store) / a for a in ("lora-qv", "lora-emb-head", "vera")}
    return model, _store(model, tmp_path_factory.mktemp("llama_prompts"), AutoModelForCausalLM, PROMPTS, copies)


@pytest.fixture(scope="module")
def gpt2_prompts(gpt2, tmp_path_factory):
    """(model dir, store dir): GPT-2 (absolute position embeddings) with the same prompts."""
    from transformers import AutoModelForCausalLM

    model, store = gpt2
    return model, _store(model, tmp_path_factory.mktemp("gpt2_prompts"), AutoModelForCausalLM, PROMPTS,
                         {"attn": Path(store) / "attn"})


def _check(model: str, store: str, rows: list[dict], n_new: int) -> None:
    for row in rows:
        expected = oracle.generate(model, store, row["adapter_id"], row["prompt"], n_new)
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == expected, row
        assert row["error"] is None


def _run(p: Predictor, adapters: list, prompts: list[str]) -> list[dict]:
    return p(pa.table({"prompt": prompts, "adapter_id": adapters})).to_pylist()


def test_prompts_change_the_greedy_tokens(llama_prompts):
    """Guard against a vacuous match: each prompt changes the oracle's own continuation."""
    model, store = llama_prompts
    text = SENTENCES[0][:20]
    base = oracle.generate(model, store, None, text, 6)
    for adapter in PROMPTS:
        assert oracle.generate(model, store, adapter, text, 6) != base, adapter


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_rows_in_a_mixed_batch_equal_the_oracle(llama_prompts, gpt2_prompts, arch):
    model, store = {"llama": llama_prompts, "gpt2": gpt2_prompts}[arch]
    p = _predictor(model, store, "generate", max_new_tokens=5)
    cycle = [*p.adapter_ids, None, ""]
    adapters = [cycle[(3 * i) % len(cycle)] for i in range(14)]
    prompts = [SENTENCES[i % 6][: 4 + 7 * (i % 5)] for i in range(14)]  # ragged: left padding anew
    _check(model, store, _run(p, adapters, prompts), 5)


def test_prompt_only_batches_fan_out_and_prompt_plus_base(llama_prompts):
    """Only prompt rows (of different lengths of virtual tokens); prompt rows with base rows
    only; only prefix rows; prefix rows with base rows only; prefix rows with prompt rows only;
    one input fanned out to a prompt, a prefix, a LoRA on the embedding and the base."""
    model, store = llama_prompts
    p = _predictor(model, store, "generate", max_new_tokens=4)
    rows = _run(p, ["prompt-9", "p-tuning", "prompt-4", "prompt-9"], [SENTENCES[i][: 9 + 8 * i] for i in range(4)])
    rows += _run(p, ["prompt-4", None, "", "prompt-4"], [SENTENCES[5 + i][: 6 + 5 * i] for i in range(4)])
    rows += _run(p, ["prefix-8", "prefix-3", "prefix-8"], [SENTENCES[i][: 5 + 9 * i] for i in range(3)])
    rows += _run(p, [None, "prefix-3", ""], [SENTENCES[3 + i][: 20 - 6 * i] for i in range(3)])
    rows += _run(p, ["prompt-9", "prefix-3"], [SENTENCES[6][:8], SENTENCES[7][:25]])
    named = [["prompt-9", "lora-emb-head", None, "prefix-8", "p-tuning"], ["vera", "prompt-4", "prefix-3"]]
    table = pa.table({"prompt": [SENTENCES[7][:30], SENTENCES[8][:12]],
                      "adapter_ids": pa.array(named, pa.list_(pa.string()))})
    fanned = p(table).to_pylist()
    assert len(fanned) == 8
    _check(model, store, rows + fanned, 4)


def test_virtual_tokens_count_against_the_context(llama_prompts):
    """A prompt that fits alone is too_long once its adapter's 9 virtual tokens (or a prefix
    of 8, whose positions come first too) join it."""
    model, store = llama_prompts
    p = _predictor(model, store, "generate", max_new_tokens=4)
    tok = oracle.processor(model, "generate")
    words = " ".join(SENTENCES * 4)
    text = next(words[:k] for k in range(len(words), 0, -7) if len(tok(words[:k]).input_ids) <= 128 - 4 - 5)
    n = len(tok(text).input_ids)
    rows = {r["adapter_id"]: r for r in _run(p, ["prompt-9", "prefix-8", "prompt-4", None], [text] * 4)}
    assert rows["prompt-9"]["error"] == (f"too_long: {n} input tokens + 9 virtual tokens of its adapter + "
                                         "max_new_tokens 4 exceed the model's context of 128")
    assert rows["prefix-8"]["error"] == (f"too_long: {n} input tokens + 8 virtual tokens of its adapter + "
                                         "max_new_tokens 4 exceed the model's context of 128")
    assert rows["prompt-4"]["error"] is None and rows[None]["error"] is None


def _saved_with_task_type(model: str, folder: Path, name: str, config, model_class, task_type) -> Path:
    """An adapter saved by PEFT, its adapter_config.json then given another task_type."""
    adapter = Path(save_adapter(model, folder, name, config, model_class=model_class))
    data = json.loads((adapter / "adapter_config.json").read_text())
    data["task_type"] = task_type
    (adapter / "adapter_config.json").write_text(json.dumps(data))
    return adapter


def test_prompt_learning_refusals(llama, bert, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model, _ = llama
    _saved_with_task_type(model, tmp_path / "b", "no-task", PROMPTS["prompt-4"], AutoModelForCausalLM, None)
    with pytest.raises(ValueError, match=r"adapter 'no-task' has task_type None; PEFT runs its prompt on a "
                                         r"LlamaForCausalLM only as CAUSAL_LM"):
        Predictor(model=model, adapters=str(tmp_path / "b"), task="generate")
    from transformers import AutoModel

    save_adapter(model, tmp_path / "c", "embed-prompt", PromptTuningConfig(task_type="FEATURE_EXTRACTION",
                                                                           num_virtual_tokens=3), model_class=AutoModel)
    with pytest.raises(ValueError, match=r"adapter 'embed-prompt' is a PROMPT_TUNING adapter; Switchyard routes "
                                         r"prompt learning for generate and classify on decoder models .* not for a "
                                         r"LlamaModel"):
        Predictor(model=model, adapters=str(tmp_path / "c"), task="embed")
    bert_model, _ = bert
    _saved_with_task_type(bert_model, tmp_path / "d", "gen-prompt",
                          PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
                          AutoModelForSequenceClassification, "CAUSAL_LM")
    with pytest.raises(ValueError, match=r"adapter 'gen-prompt' has task_type CAUSAL_LM; PEFT runs its prompt on a "
                                         r"BertForSequenceClassification only as SEQ_CLS"):
        Predictor(model=bert_model, adapters=str(tmp_path / "d"), task="classify")


@pytest.mark.slow  # every type through the job: tests/test_every_type.py
def test_prompt_adapters_through_the_batch_job(ray_cluster, llama_prompts, tmp_path):
    from test_job import _job

    model, store = llama_prompts
    named = [["prompt-4", "prefix-8"], ["p-tuning", "lora-qv"], [], ["prompt-9", None, "prefix-3"]]
    prompts = [SENTENCES[i][: 10 + 6 * i] for i in range(len(named))]
    table = pa.table({"id": list(range(len(named))), "prompt": prompts,
                      "adapter_ids": pa.array(named, pa.list_(pa.string()))})
    rows = _job(tmp_path, model, store, "generate", table, "--max-new-tokens", "4")
    assert len(rows) == 8
    _check(model, store, rows, 4)


def test_canary_checks_prompt_rows_mixed_against_alone(llama_prompts, monkeypatch):
    """A task that forgot to shift a prompt row's real tokens past its virtual tokens would
    differ between mixed and alone batches: the canary's third check catches it."""
    import actors.tasks.generate as generate

    model, store = llama_prompts
    real = generate.GenerateTask._inputs

    def wrong(self, ids, mask):
        inputs = real(self, ids, mask)
        if "inputs_embeds" in inputs:
            inputs["inputs_embeds"] = inputs["inputs_embeds"].roll(1, dims=0)  # rows get another row's embeddings
        return inputs

    monkeypatch.setattr(generate.GenerateTask, "_inputs", wrong)
    with pytest.raises(RuntimeError, match=r"start-up canary: rows of .* in a mixed batch differ from running it "
                                           r"alone"):
        Predictor(model=model, adapters=store, task="generate", max_new_tokens=2)


def test_prefix_refusals(llama, bert, tmp_path):
    """Prefix tuning where PEFT has no oracle (sequence classification raises in PEFT on
    transformers 5), a task_type PEFT would not run it under, a sliding-window decoder, and a
    prefix saved for another model's attention shape."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, MistralConfig, MistralForCausalLM

    from testkit.models import build_llama

    model, _ = llama
    bert_model, _ = bert
    prefix = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)
    save_adapter(bert_model, tmp_path / "a", "cls-prefix", prefix, model_class=AutoModelForSequenceClassification)
    with pytest.raises(ValueError, match=r"adapter 'cls-prefix' is a prefix tuning adapter on a "
                                         r"BertForSequenceClassification: not routed because PEFT raises for prefix "
                                         r"tuning with sequence classification"):
        Predictor(model=bert_model, adapters=str(tmp_path / "a"), task="classify")
    _saved_with_task_type(model, tmp_path / "b", "seq2seq", PROMPTS["prefix-3"], AutoModelForCausalLM,
                          "SEQ_2_SEQ_LM")
    with pytest.raises(ValueError, match=r"adapter 'seq2seq' has task_type SEQ_2_SEQ_LM; PEFT runs a prefix on a "
                                         r"LlamaForCausalLM only as CAUSAL_LM"):
        Predictor(model=model, adapters=str(tmp_path / "b"), task="generate")
    mistral = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               sliding_window=16))
    mistral.save_pretrained(tmp_path / "mistral")
    oracle.processor(model, "generate").save_pretrained(tmp_path / "mistral")
    save_adapter(str(tmp_path / "mistral"), tmp_path / "c", "windowed", PROMPTS["prefix-3"],
                 model_class=AutoModelForCausalLM)
    with pytest.raises(ValueError, match=r"adapter 'windowed' is a prefix tuning adapter on a MistralForCausalLM: "
                                         r"not routed because it has sliding-window layers"):
        Predictor(model=str(tmp_path / "mistral"), adapters=str(tmp_path / "c"), task="generate")
    other = build_llama(tmp_path / "other")  # same sizes: move the adapter's tensor to a 3-layer shape
    save_adapter(other, tmp_path / "d", "misfit", PROMPTS["prefix-3"], model_class=AutoModelForCausalLM)
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "d" / "misfit" / "adapter_model.safetensors"
    tensor = load_file(weights)["prompt_embeddings"]
    save_file({"prompt_embeddings": tensor.repeat(1, 3)[:, : tensor.shape[1] * 3 // 2].contiguous()}, weights)
    with pytest.raises(ValueError, match=r"adapter 'misfit': prompt_embeddings has shape \(3, 192\), expected "
                                         r"\(3, 128\) for num_virtual_tokens 3 and the model's 2 layers x key and "
                                         r"value x 2 key-value heads x head size 16"):
        Predictor(model=model, adapters=str(tmp_path / "d"), task="generate")


def _prefix_positions_from_zero(real):
    def wrong(prefix, token_mask):  # forgets that a row's tokens come after its prefix
        inputs = real(prefix, token_mask)
        inputs["position_ids"] = (token_mask.cumsum(1) - 1).clamp(min=0)
        return inputs
    return wrong


def _virtual_doubled(real):
    def wrong(self, ids, mask, virtual):  # the virtual tokens, scaled as if they were token embeddings
        return real(self, ids, mask, [None if v is None else 2 * v for v in virtual])
    return wrong


@pytest.mark.parametrize(("case", "adapter"), [("prefix", "prefix-3"), ("virtual", "prompt-4")])
def test_canary_checks_prompt_rows_against_peft(llama_prompts, tmp_path, monkeypatch, case, adapter):
    """A prompt placed wrongly the same way in mixed and alone batches passes check 3; check 4
    (the row against PEFT's own prompt model) refuses it."""
    import actors.tasks.text as text

    model, store = llama_prompts
    owner, name, breakage = {"prefix": (text, "prefix_inputs", _prefix_positions_from_zero),
                             "virtual": (text.TextTask, "_with_virtual", _virtual_doubled)}[case]
    monkeypatch.setattr(owner, name, breakage(getattr(owner, name)))
    only = tmp_path / "store"
    shutil.copytree(Path(store) / adapter, only / adapter)
    with pytest.raises(RuntimeError, match=rf"start-up canary: adapter '{adapter}''s row differs from PEFT's own "
                                           r"prompt model by [0-9.e+-]+ \(tolerance"):
        Predictor(model=model, adapters=str(only), task="generate", max_new_tokens=2)


@pytest.mark.parametrize("values", [True, False])
def test_driver_check_on_a_meta_base_reads_prompts(llama_prompts, values):
    from actors.validation import validate_store

    model, store = llama_prompts
    assert validate_store(model, store, "generate", values=values) == sorted(p.name for p in Path(store).iterdir())


# --- encoders: classification (with per-adapter heads) and embeddings ----------------------------

@pytest.fixture(scope="module")
def bert_prompts(bert, tmp_path_factory):
    """(model dir, store dir): BERT classification with SEQ_CLS prompts (PEFT saves each one's
    own classifier head) beside LoRA adapters with and without heads."""
    from transformers import AutoModelForSequenceClassification

    model, store = bert
    configs = {"cls-prompt": PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5),
               "cls-ptune": PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=3, encoder_hidden_size=32)}
    copies = {a: Path(store) / a for a in ("head-a", "no-head")}
    return model, _store(model, tmp_path_factory.mktemp("bert_prompts"), AutoModelForSequenceClassification,
                         configs, copies)


def test_bert_classify_prompt_rows_equal_the_oracle(bert_prompts):
    """BERT pools position 0, which for a prompt row is its first virtual token (as in PEFT)."""
    model, store = bert_prompts
    p = _predictor(model, store, "classify")
    _assert_prompts_move_the_scores(model, store, SENTENCES[3])
    cycle = [*p.adapter_ids, None]
    adapters = [cycle[(2 * i) % len(cycle)] for i in range(10)]
    texts = [SENTENCES[i][: 7 + 8 * (i % 4)] for i in range(10)]
    _assert_scores(model, store, p(pa.table({"text": texts, "adapter_id": adapters})).to_pylist())


def _assert_prompts_move_the_scores(model: str, store: str, text: str) -> None:
    """Guard against a vacuous match: each classify prompt changes the oracle's own scores."""
    base = oracle.scores(model, store, None, "classify", text)
    for adapter in ("cls-prompt", "cls-ptune"):
        assert max(abs(a - b) for a, b in zip(oracle.scores(model, store, adapter, "classify", text), base)) > 1e-3


def _assert_scores(model: str, store: str, rows: list[dict]) -> None:
    for row in rows:
        expected = oracle.scores(model, store, row["adapter_id"], "classify", row["text"])
        oracle.assert_close(row["scores"], expected, what=str(row["adapter_id"]))


@pytest.fixture(scope="module")
def llama_classifier_prompts(tmp_path_factory):
    """(model dir, store dir): a Llama sequence classifier (a decoder: it pools the last
    token) with SEQ_CLS prompt tuning and P-tuning (each with its saved `score` head) and a
    LoRA with its own head."""
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification

    from testkit.models import build_llama

    root = tmp_path_factory.mktemp("llama_cls_prompts")
    model = build_llama(root / "model", num_labels=3)
    configs = {"cls-prompt": PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=6),
               "cls-ptune": PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=2, encoder_hidden_size=32),
               "cls-lora": LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False)}
    return model, _store(model, root / "store", AutoModelForSequenceClassification, configs)


def test_decoder_classifier_prompt_rows_equal_the_oracle(llama_classifier_prompts):
    """A decoder classifier pools the last position when given embeddings, so a call with
    prompt rows is left-padded with each row's own positions; rows without prompts in that
    call (base, LoRA) and calls without prompt rows (right-padded ids) stay exact too."""
    model, store = llama_classifier_prompts
    p = _predictor(model, store, "classify")
    _assert_prompts_move_the_scores(model, store, SENTENCES[2])
    cycle = [*p.adapter_ids, None]
    adapters = [cycle[(3 * i) % len(cycle)] for i in range(9)]
    texts = [SENTENCES[i][: 5 + 9 * (i % 4)] for i in range(9)]
    rows = p(pa.table({"text": texts, "adapter_id": adapters})).to_pylist()
    rows += p(pa.table({"text": texts[:3], "adapter_id": ["cls-lora", None, "cls-lora"]})).to_pylist()
    rows += p(pa.table({"text": texts[3:6], "adapter_id": ["cls-ptune", "cls-prompt", "cls-ptune"]})).to_pylist()
    _assert_scores(model, store, rows)


def test_bert_embed_prompt_rows_pool_their_real_tokens_as_the_oracle(bert_embed, tmp_path):
    from transformers import AutoModel

    model, embed_store = bert_embed
    configs = {"emb-prompt": PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=4),
               "emb-ptune": PromptEncoderConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=7,
                                                encoder_hidden_size=32),
               "emb-prefix": PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=5),
               "emb-prefix-2": PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=2)}
    store = _store(model, tmp_path / "store", AutoModel, configs, {"emb-a": Path(embed_store) / "emb-a"})
    p = _predictor(model, store, "embed")
    adapters = ["emb-prompt", "emb-ptune", None, "emb-a", "emb-prefix", "emb-prompt", "emb-prefix-2", "emb-ptune",
                "emb-prefix"]
    texts = [SENTENCES[i][: 6 + 11 * (i % 3)] for i in range(len(adapters))]
    base = oracle.embedding(model, store, None, texts[0])
    for adapter in ("emb-prompt", "emb-prefix"):
        assert max(abs(a - b) for a, b in zip(oracle.embedding(model, store, adapter, texts[0]), base)) > 1e-3
    rows = p(pa.table({"text": texts, "adapter_id": adapters})).to_pylist()
    rows += p(pa.table({"text": texts[:3], "adapter_id": ["emb-prefix-2", "emb-prefix", None]})).to_pylist()
    for row in rows:
        expected = oracle.embedding(model, store, row["adapter_id"], row["text"])
        oracle.assert_close(row["embedding"], expected, what=str(row["adapter_id"]))


@settings(max_examples=6, **PROFILE)
@given(data=st.data())
def test_random_generate_batches_mixing_prompts_prefixes_and_weights(llama_prompts, data):
    """Hypothesis-drawn generate batches: any mix of prompt tuning, P-tuning, prefix tuning,
    LoRA and VeRA rows, base rows and fan-out rows, split into calls of 3 rows under a
    capacity of 3 adapters (so prompt slots are evicted and refilled), against the oracle."""
    model, store = llama_prompts
    ids = [*PROMPTS, "lora-qv", "lora-emb-head", "vera"]
    n = data.draw(st.integers(1, 5))
    named = data.draw(st.lists(st.lists(st.sampled_from([None, *ids]), min_size=1, max_size=3), min_size=n,
                               max_size=n))
    texts = data.draw(st.lists(st.builds(lambda i, k: SENTENCES[i][:k], st.integers(0, len(SENTENCES) - 1),
                                         st.integers(3, 40)), min_size=n, max_size=n))
    p = _predictor(model, store, "generate", max_new_tokens=3, max_batch_rows=3, max_loaded_adapters=3)
    table = pa.table({"prompt": texts, "adapter_ids": pa.array(named, pa.list_(pa.string()))})
    rows = p(table).to_pylist()
    assert len(rows) == sum(len(a) for a in named)
    _check(model, store, rows, 3)
