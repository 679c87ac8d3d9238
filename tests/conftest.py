"""Shared fixtures: real model folders and real PEFT adapter stores, built once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(init_lora_weights=False, **kw)


def _build_store(model_dir, store, model_class, configs: dict) -> str:
    """Save one adapter per config into `store` with distinct seeds, as PEFT saves them by
    default (copies of targeted embedding layers included)."""
    from testkit.adapters import save_adapter

    for seed, (name, config) in enumerate(configs.items(), start=1):
        save_adapter(model_dir, store, name, config, model_class=model_class, seed=seed, save_embedding_layers="auto")
    return str(store)


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """(model dir, store dir): a small Llama with LoRA of many shapes and one VeRA."""
    from peft import VeraConfig
    from transformers import AutoModelForCausalLM

    from testkit.models import build_llama

    root = tmp_path_factory.mktemp("llama")
    model = build_llama(root / "model")
    configs = {
        "lora-qv": _lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "lora-rs": _lora(r=8, lora_alpha=16, use_rslora=True,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        "lora-pattern": _lora(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                              rank_pattern={"down_proj": 12}, alpha_pattern={"v_proj": 32}),
        "lora-emb-head": _lora(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"]),
        "lora-regex-bias": _lora(r=6, lora_alpha=6, target_modules=r".*\.layers\.1\.self_attn\.(q|k)_proj",
                                 lora_bias=True),
        "lora-layers": _lora(r=4, lora_alpha=8, target_modules=["up_proj", "down_proj"], layers_to_transform=[0]),
        "vera": VeraConfig(r=8, target_modules=["q_proj", "up_proj", "down_proj"]),
    }
    return model, _build_store(model, root / "store", AutoModelForCausalLM, configs)


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory):
    """(model dir, store dir): GPT-2 (Conv1D) with fan_in_fan_out LoRA adapters."""
    from transformers import AutoModelForCausalLM

    from testkit.models import build_gpt2

    root = tmp_path_factory.mktemp("gpt2")
    model = build_gpt2(root / "model")
    configs = {
        "attn": _lora(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"]),
        "mlp-bias": _lora(r=8, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_fc"], lora_bias=True),
    }
    return model, _build_store(model, root / "store", AutoModelForCausalLM, configs)


@pytest.fixture(scope="session")
def bert(tmp_path_factory):
    """(model dir, store dir): BERT classification; adapters with and without their own head."""
    from peft import VeraConfig
    from transformers import AutoModelForSequenceClassification

    from testkit.models import build_bert

    root = tmp_path_factory.mktemp("bert")
    model = build_bert(root / "model")
    configs = {
        "head-a": _lora(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
        "head-b": _lora(r=8, lora_alpha=8, target_modules=["key", "dense"], modules_to_save=["classifier"]),
        "no-head": _lora(r=4, lora_alpha=8, target_modules=["query", "value"]),
        "vera": VeraConfig(r=8, target_modules=["query", "value", "dense"]),
    }
    return model, _build_store(model, root / "store", AutoModelForSequenceClassification, configs)


@pytest.fixture(scope="session")
def bert_embed(tmp_path_factory, bert):
    """(model dir, store dir): the same BERT folder as an encoder (AutoModel) with its adapters."""
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("bert_embed")
    configs = {
        "emb-a": _lora(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"]),
        "emb-b": _lora(r=8, lora_alpha=16, use_rslora=True, target_modules=["dense"]),
    }
    return bert[0], _build_store(bert[0], root / "store", AutoModel, configs)


@pytest.fixture(scope="session")
def vit(tmp_path_factory):
    """(model dir, store dir): ViT image classification with per-adapter heads."""
    from transformers import AutoModelForImageClassification

    from testkit.models import build_vit

    root = tmp_path_factory.mktemp("vit")
    model = build_vit(root / "model")
    configs = {
        "vit-a": _lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]),
        "vit-b": _lora(r=8, lora_alpha=8, target_modules=["fc1", "fc2"]),
    }
    return model, _build_store(model, root / "store", AutoModelForImageClassification, configs)


@pytest.fixture(scope="session")
def mobilevit(tmp_path_factory):
    """(model dir, store dir): MobileViT, whose attention unfolds each image into patches."""
    from transformers import AutoModelForImageClassification

    from testkit.models import build_mobilevit

    root = tmp_path_factory.mktemp("mobilevit")
    model = build_mobilevit(root / "model")
    configs = {
        "mv-a": _lora(r=4, lora_alpha=8, target_modules=["query", "value"]),
        "mv-b": _lora(r=4, lora_alpha=16, target_modules=["key", "query"], modules_to_save=["classifier"]),
    }
    return model, _build_store(model, root / "store", AutoModelForImageClassification, configs)


@pytest.fixture(scope="session")
def ray_cluster():
    """One small real local Ray cluster for the whole test session, with its dashboard (the
    job API of `ray job submit`) on a free loopback port; `ray.dashboard_url` names it."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=port, log_to_driver=False,
                       runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}})
    ray.dashboard_url = "http://" + context.dashboard_url
    yield ray
    ray.shutdown()
