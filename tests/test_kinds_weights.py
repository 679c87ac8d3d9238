"""DoRA, trainable tokens, IA3, LoKr, OFT and BOFT in mixed batches against the oracle (PEFT,
one adapter at a time, each row alone), with LoRA and base rows, ragged lengths and fan-out
rows, on every architecture PEFT supports them on: Llama, GPT-2 (Conv1D, a tied lm_head),
BERT (classification with and without heads, embeddings) and ViT."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import BOFTConfig, IA3Config, LoKrConfig, LoraConfig, OFTConfig

import oracle
from actors import Predictor
from testkit.data import SENTENCES, png_bytes
from test_kinds import PROFILE, _predictor, _store, check_random_mixed_batch


def _dora(**kw) -> LoraConfig:
    return LoraConfig(use_dora=True, init_lora_weights=False, **kw)


def _prompt_tokens(model: str, n: int) -> list[int]:
    """n distinct token ids that the test prompts use (so trainable tokens matter)."""
    ids = oracle.processor(model, "generate")(" ".join(SENTENCES[:4]), add_special_tokens=False).input_ids
    return list(dict.fromkeys(ids))[:n]


def _same_as_oracle(model: str, store: str, row: dict, n_new: int) -> None:
    expected = oracle.generate(model, store, row["adapter_id"], row["prompt"], n_new)
    assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == expected, row
    assert row["error"] is None


def _changes_logits(model: str, store: str, adapters: list[str], task: str = "generate") -> None:
    """Guard against a vacuous oracle match: each adapter moves PEFT's logits off the base."""
    inputs = oracle.processor(model, task)(" ".join(SENTENCES[:4]), return_tensors="pt")
    with torch.no_grad():
        base = oracle.oracle_model(model, store, None, task)(**inputs).logits
        for adapter in adapters:
            logits = oracle.oracle_model(model, store, adapter, task)(**inputs).logits
            assert (logits - base).norm() > 0.02 * base.norm(), adapter


# --- Llama: every new weight kind in one greedy batch ------------------------------------

LLAMA_IDS = ["dora", "dora-emb", "tokens", "ia3", "lokr", "lokr-pattern", "oft", "oft-coft-share", "boft",
             "lora-qv"]


@pytest.fixture(scope="module")
def llama_weights(llama, tmp_path_factory):
    """(model dir, store dir): Llama with every new weight kind, plus a LoRA of the session store."""
    from transformers import AutoModelForCausalLM

    model, store = llama
    configs = {
        "dora": _dora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "dora-emb": _dora(r=4, lora_alpha=4, target_modules=["embed_tokens", "o_proj"], rank_pattern={"o_proj": 2}),
        "tokens": LoraConfig(r=2, init_lora_weights=False, target_modules=["k_proj"],
                             trainable_token_indices=_prompt_tokens(model, 4)),
        "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj", "up_proj"],
                         feedforward_modules=["down_proj"]),
        "lokr": LoKrConfig(r=2, alpha=64, target_modules=["q_proj", "up_proj"]),
        "lokr-pattern": LoKrConfig(r=4, alpha=64, decompose_both=True, target_modules=["v_proj", "gate_proj"],
                                   rank_pattern={"gate_proj": 2}, alpha_pattern={"v_proj": 96}),
        "oft": OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "up_proj"]),
        "oft-coft-share": OFTConfig(r=0, oft_block_size=16, coft=True, eps=0.5, block_share=True,
                                    use_cayley_neumann=False, target_modules=["k_proj", "down_proj"]),
        "boft": BOFTConfig(boft_block_size=8, target_modules=["q_proj", "gate_proj"]),
    }
    return model, _store(model, tmp_path_factory.mktemp("llama_weights"), AutoModelForCausalLM, configs,
                         {"lora-qv": Path(store) / "lora-qv"})


def test_llama_weight_kinds_change_the_output(llama_weights):
    model, store = llama_weights
    _changes_logits(model, store, LLAMA_IDS[:-1])


def test_llama_every_weight_kind_in_one_greedy_batch_equals_oracle(llama_weights):
    model, store = llama_weights
    p = _predictor(model, store, "generate", max_new_tokens=5)
    assert sorted(p.adapter_ids) == sorted(LLAMA_IDS)
    cycle = [*LLAMA_IDS, None, ""]
    adapters = [cycle[(5 * i) % len(cycle)] for i in range(18)]
    prompts = [SENTENCES[i % 4][: 5 + 7 * (i % 5)] for i in range(18)]  # ragged: left padding
    out = p(pa.table({"prompt": prompts, "adapter_id": adapters})).to_pylist()
    assert {r["adapter_id"] for r in out} == set(adapters)
    for row in out:
        _same_as_oracle(model, store, row, 5)


def test_llama_fan_out_and_batches_without_some_kinds_equal_oracle(llama_weights):
    """One prompt fanned out to adapters of different kinds; then zero rows of most kinds, and
    a batch of one kind only (the structured ops see all rows, or none)."""
    model, store = llama_weights
    p = _predictor(model, store, "generate", max_new_tokens=4)
    named = [["oft", "dora", None, "lokr"], ["tokens", "boft", "ia3"], ["oft-coft-share", "dora-emb"]]
    prompts = [SENTENCES[0][:30], SENTENCES[1][:9], SENTENCES[2]]
    out = p(pa.table({"prompt": prompts, "adapter_ids": pa.array(named, pa.list_(pa.string()))})).to_pylist()
    assert len(out) == 9
    for adapters in (["lokr-pattern", None, "lokr-pattern"], ["oft", "oft", "oft"]):
        batch = [SENTENCES[3 + i][: 8 + 10 * i] for i in range(len(adapters))]
        out += p(pa.table({"prompt": batch, "adapter_id": adapters})).to_pylist()
    for row in out:
        _same_as_oracle(model, store, row, 4)


# --- GPT-2: Conv1D and a lm_head tied to the embedding ---------------------------------------

@pytest.fixture(scope="module")
def gpt2_weights(gpt2, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model, store = gpt2
    configs = {
        "dora-conv": _dora(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"]),
        "tokens-tied": LoraConfig(r=2, init_lora_weights=False, fan_in_fan_out=True, target_modules=["c_proj"],
                                  trainable_token_indices=_prompt_tokens(model, 5)),
        "ia3-conv": IA3Config(target_modules=["c_attn", "c_fc", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
    }
    return model, _store(model, tmp_path_factory.mktemp("gpt2_weights"), AutoModelForCausalLM, configs,
                         {"attn": Path(store) / "attn"})


def test_gpt2_weight_kinds_on_conv1d_equal_oracle(gpt2_weights):
    model, store = gpt2_weights
    _changes_logits(model, store, ["dora-conv", "tokens-tied", "ia3-conv"])
    p = _predictor(model, store, "generate", max_new_tokens=5)
    adapters = ["dora-conv", "tokens-tied", None, "ia3-conv", "attn", "tokens-tied", "dora-conv", ""]
    prompts = [SENTENCES[i % 4][: 6 + 9 * (i % 4)] for i in range(len(adapters))]
    for row in p(pa.table({"prompt": prompts, "adapter_id": adapters})).to_pylist():
        _same_as_oracle(model, store, row, 5)


def test_gpt2_trainable_tokens_change_the_tied_lm_head_as_peft_does(gpt2_weights):
    """PEFT ties GPT-2's lm_head to the embedding's trainable tokens: logits of those token
    ids change too. Compared on the full logits of a mixed batch, not only greedy tokens."""
    model, store = gpt2_weights
    p = _predictor(model, store, "generate", max_new_tokens=5)
    tokens = _prompt_tokens(model, 5)
    assert any(layer for name, layer in p.runtime.lowrank_layers.items() if name == "lm_head")
    text = SENTENCES[0][:25]
    rows = [p.task.encode(text, {"max_new_tokens": 1, "temperature": 0.0}) for _ in range(2)]  # no padding
    slots = [p.runtime._loaded["tokens-tied"], 0]
    with torch.inference_mode(), p.runtime.route(slots):
        logits, base_row = p.task.forward(rows)[:, -1]
    expected = oracle.oracle_model(model, store, "tokens-tied", "generate")(
        **oracle.processor(model, "generate")(text, return_tensors="pt")).logits[0, -1]
    base = oracle.oracle_model(model, store, None, "generate")(
        **oracle.processor(model, "generate")(text, return_tensors="pt")).logits[0, -1]
    assert (expected[tokens] - base[tokens]).abs().max() > 1e-2  # the tied head moved those columns
    oracle.assert_close(logits.tolist(), expected.tolist(), what="tied lm_head")
    oracle.assert_close(base_row.tolist(), base.tolist(), what="base row beside it")


# --- BERT: classification with and without heads, embeddings ---------------------------------

BERT_IDS = ["dora-head", "ia3", "lokr", "oft-head", "boft", "head-a"]


@pytest.fixture(scope="module")
def bert_weights(bert, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification

    model, store = bert
    configs = {
        "dora-head": _dora(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"],
                           modules_to_save=["classifier"]),
        "ia3": IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
        "lokr": LoKrConfig(r=2, alpha=64, target_modules=["query", "intermediate.dense"]),
        "oft-head": OFTConfig(r=0, oft_block_size=16, target_modules=["key", "value"], modules_to_save=["classifier"]),
        "boft": BOFTConfig(boft_block_size=8, target_modules=["query", "output.dense"]),
    }
    return model, _store(model, tmp_path_factory.mktemp("bert_weights"), AutoModelForSequenceClassification,
                         configs, {"head-a": Path(store) / "head-a"})


def test_bert_classify_weight_kinds_with_and_without_heads(bert_weights):
    model, store = bert_weights
    _changes_logits(model, store, BERT_IDS[:-1], "classify")
    p = _predictor(model, store, "classify")
    cycle = [*BERT_IDS, None]
    adapters = [cycle[(3 * i) % len(cycle)] for i in range(14)]
    texts = [SENTENCES[i % len(SENTENCES)][: 8 + 9 * (i % 4)] for i in range(14)]
    for row in p(pa.table({"text": texts, "adapter_id": adapters})).to_pylist():
        expected = oracle.scores(model, store, row["adapter_id"], "classify", row["text"])
        oracle.assert_close(row["scores"], expected, what=str(row["adapter_id"]))


@settings(max_examples=10, **PROFILE)
@given(data=st.data())
def test_mixed_weight_kind_batches_equal_the_oracle_row_by_row(bert_weights, data):
    """Any mix of the new kinds with base and fan-out rows; slots are reused by other kinds."""
    check_random_mixed_batch(*bert_weights, BERT_IDS, data)


def test_bert_embed_weight_kinds_equal_oracle(bert, tmp_path):
    from transformers import AutoModel

    model, _ = bert
    configs = {"dora-emb": _dora(r=4, lora_alpha=8, target_modules=["query", "dense"]),
               "ia3-emb": IA3Config(target_modules=["key", "intermediate.dense"],
                                    feedforward_modules=["intermediate.dense"]),
               "oft-emb": OFTConfig(r=0, oft_block_size=8, target_modules=["value"])}
    store = _store(model, tmp_path / "store", AutoModel, configs)
    p = _predictor(model, store, "embed")
    adapters = ["dora-emb", "ia3-emb", None, "oft-emb", "ia3-emb", "dora-emb"]
    texts = [SENTENCES[i][: 6 + 11 * (i % 3)] for i in range(6)]
    for row in p(pa.table({"text": texts, "adapter_id": adapters})).to_pylist():
        expected = oracle.embedding(model, store, row["adapter_id"], row["text"])
        oracle.assert_close(row["embedding"], expected, what=str(row["adapter_id"]))


# --- ViT: images ---------------------------------------------------------------------------

def test_vit_classify_image_weight_kinds_equal_oracle(vit, tmp_path):
    from transformers import AutoModelForImageClassification

    model, vit_store = vit
    configs = {"dora-vit": _dora(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"]),
               "ia3-vit": IA3Config(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"],
                                    modules_to_save=["classifier"]),
               "lokr-vit": LoKrConfig(r=2, alpha=64, target_modules=["v_proj"]),
               "oft-vit": OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "fc2"]),
               "boft-vit": BOFTConfig(boft_block_size=16, target_modules=["fc1"])}
    store = _store(model, tmp_path / "store", AutoModelForImageClassification, configs,
                   {"vit-a": Path(vit_store) / "vit-a"})
    p = _predictor(model, store, "classify-image")
    adapters = [*configs, None, "vit-a", "oft-vit", "dora-vit"]
    images = [png_bytes(i, (40, 28)) for i in range(len(adapters))]
    out = p(pa.table({"image": images, "adapter_id": adapters, "k": list(range(len(adapters)))})).to_pylist()
    for row in out:
        expected = oracle.scores(model, store, row["adapter_id"], "classify-image", images[row["k"]])
        oracle.assert_close(row["scores"], expected, what=str(row["adapter_id"]))


# --- refusals and the canary ------------------------------------------------------------------

READ_WRONGLY = r"start-up canary: adapter '{}' on module {} differs from PEFT's own layer for it"


@pytest.mark.parametrize(("adapter", "module", "term"), [("dora", "model.layers.0.self_attn.v_proj", "out_scale"),
                                                         ("ia3", "model.layers.1.mlp.down_proj", "in_scale")])
def test_canary_refuses_a_wrong_read_of_a_scale(llama_weights, monkeypatch, adapter, module, term):
    """A reader that got DoRA's norm or IA3's vector wrong is caught against PEFT's own layer."""
    import actors.runtime

    model, store = llama_weights
    real = actors.runtime.read_adapter

    def read(path, name, base, *args, **kwargs):
        weights = real(path, name, base, *args, **kwargs)
        if name == adapter:
            setattr(weights.deltas[module], term, getattr(weights.deltas[module], term) * 1.05)
        return weights

    monkeypatch.setattr(actors.runtime, "read_adapter", read)
    with pytest.raises(RuntimeError, match=READ_WRONGLY.format(adapter, module)):
        Predictor(model=model, adapters=store, task="generate", max_new_tokens=2)


def _saved(model: str, root: Path, name: str, config, model_class=None) -> Path:
    from transformers import AutoModelForCausalLM

    from testkit.adapters import save_adapter

    return Path(save_adapter(model, root, name, config, model_class=model_class or AutoModelForCausalLM, seed=5))


def test_structured_kinds_on_conv1d_and_embeddings_are_refused(gpt2, llama, tmp_path):
    from safetensors.torch import save_file

    model, _ = gpt2
    folder = tmp_path / "a" / "lokr-conv"
    folder.mkdir(parents=True)
    LoKrConfig(r=2, target_modules=["c_attn"]).save_pretrained(str(folder))
    key = "base_model.model.transformer.h.{}.attn.c_attn"
    save_file({f"{key.format(n)}.{f}": torch.ones(s) for n in range(2)
               for f, s in (("lokr_w1", (8, 8)), ("lokr_w2", (24, 8)))}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"adapter 'lokr-conv': LoKr on module transformer\.h\.0\.attn\.c_attn of "
                                         r"type Conv1D is not supported: Switchyard routes LoKr on torch Linear"):
        Predictor(model=model, adapters=str(tmp_path / "a"), task="generate")
    model, _ = llama
    _saved(model, tmp_path / "b", "oft-emb", OFTConfig(r=0, oft_block_size=8, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match=r"adapter 'oft-emb': OFT on module model\.embed_tokens of type Embedding"):
        Predictor(model=model, adapters=str(tmp_path / "b"), task="generate")


def test_trainable_tokens_of_other_layers_and_broken_dora_are_refused(llama, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    model, _ = llama
    _saved(model, tmp_path / "a", "tokens-head",
           LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"lm_head": [3, 4]}))
    with pytest.raises(ValueError, match=r"adapter 'tokens-head': trainable_token_indices names layers \['lm_head'\]; "
                                         r"Switchyard routes trainable tokens of the input embedding"):
        Predictor(model=model, adapters=str(tmp_path / "a"), task="generate")
    adapter = _saved(model, tmp_path / "b", "dora-bare", _dora(r=4, target_modules=["q_proj"]))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "magnitude" not in k}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"adapter 'dora-bare': adapter_model\.safetensors lacks "
                                         r"lora_magnitude_vector for module model\.layers\.0\.self_attn\.q_proj"):
        Predictor(model=model, adapters=str(tmp_path / "b"), task="generate")
    adapter = _saved(model, tmp_path / "c", "ia3-ff", IA3Config(target_modules=["k_proj", "down_proj"],
                                                                feedforward_modules=["down_proj"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["feedforward_modules"] = ["k_proj"]  # the saved vectors no longer fit what the config says
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapter 'ia3-ff': ia3_l of module model\.layers\.0\.mlp\.down_proj has "
                                         r"shape \(1, 128\), but the base module .* needs \(64, 1\)"):
        Predictor(model=model, adapters=str(tmp_path / "c"), task="generate")


@pytest.mark.parametrize("values", [True, False])
def test_driver_check_on_a_meta_base_accepts_every_weight_kind(llama_weights, gpt2_weights, values):
    """The job's and Serve's up-front check (a meta-device base, no weights loaded) reads the
    new kinds too: DoRA's norm and the token deltas need base values, so there only shapes count."""
    from actors.validation import validate_store

    for model, store in (llama_weights, gpt2_weights):
        assert validate_store(model, store, "generate", values=values) == sorted(p.name for p in Path(store).iterdir())


def test_driver_check_refuses_a_broken_weight_kind_before_any_model_work(llama_weights, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from actors.validation import validate_store

    model, store = llama_weights
    adapter = Path(shutil.copytree(Path(store) / "lokr", tmp_path / "store" / "lokr-cut"))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lokr_w1"
    tensors[key] = tensors[key][:4]
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"adapter 'lokr-cut': LoKr factors of module model\.layers\.0\.self_attn\."
                                         r"q_proj \(\(4, 8\) x .*\) do not fit the base module \(in 64, out 64\)"):
        validate_store(model, str(tmp_path / "store"), "generate", values=False)


@pytest.mark.slow  # every type through the job: tests/test_every_type.py
def test_batch_job_runs_every_weight_kind_as_the_oracle(ray_cluster, llama_weights, tmp_path):
    """The same store through the Ray Data job (two actors), fan-out rows included."""
    from test_job import _job

    model, store = llama_weights
    named = [[a] for a in LLAMA_IDS] + [["dora", "oft", None], [], ["boft", "tokens"]]
    prompts = [SENTENCES[i % 4][: 6 + 5 * (i % 5)] for i in range(len(named))]
    table = pa.table({"id": list(range(len(named))), "prompt": prompts,
                      "adapter_ids": pa.array(named, pa.list_(pa.string()))})
    rows = _job(tmp_path, model, store, "generate", table, "--max-new-tokens", "4")
    assert len(rows) == sum(max(1, len(a)) for a in named)
    for row in rows:
        assert row["prompt"] == prompts[row["id"]]
        _same_as_oracle(model, store, row, 4)


def test_route_members_are_slices_for_contiguous_rows_and_indices_otherwise():
    from actors.layers import Route

    route = Route(torch.tensor([0, 3, 3, 5, 5, 5, 3]))
    assert route.members(7, 5) == slice(3, 6)
    assert route.members(14, 5) == slice(6, 12)  # two rows per batch row (repeat_interleave)
    assert route.members(7, 3).tolist() == [1, 2, 6]  # not contiguous: indices


def test_structured_ops_on_interleaved_and_contiguous_rows_equal_each_row_alone(llama_weights):
    """The grouped ops gather and scatter rows of interleaved adapters (as the canary routes
    them) or work on slices (as the Predictor orders them): both equal each row alone."""
    model, store = llama_weights
    p = _predictor(model, store, "generate", max_new_tokens=4)
    slot = {a: p.runtime._loaded[a] for a in ("oft", "lokr", "boft", "ia3", "dora")}
    text = SENTENCES[2][:20]
    for order in (["oft", "lokr", "oft", "boft", "lokr", None, "ia3", "dora", "boft"],
                  ["oft", "oft", "lokr", "lokr", "boft", "boft", None, "ia3", "dora"]):
        rows = [p.task.encode(text, {"max_new_tokens": 1, "temperature": 0.0}) for _ in order]  # no padding
        slots = [slot.get(a, 0) for a in order]
        with torch.inference_mode():
            with p.runtime.route(slots):
                mixed = p.task.forward(rows)
            for k, s in enumerate(slots):
                with p.runtime.route([s]):
                    alone = p.task.forward([rows[k]])[0]
                oracle.assert_close(mixed[k].tolist(), alone.tolist(), what=f"{order[k]} in {order}")
