"""The oracle: PEFT itself, one adapter at a time, each row alone (docs/contract.md "Correctness")."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers
from peft import PeftModel

AUTO = {"generate": "AutoModelForCausalLM", "classify": "AutoModelForSequenceClassification",
        "embed": "AutoModel", "classify-image": "AutoModelForImageClassification"}
ATOL = 1e-4


@functools.lru_cache(maxsize=64)
def oracle_model(model_dir: str, store: str | None, adapter: str | None, task: str):
    """The bare base model, or PeftModel.from_pretrained(base, store/adapter), in eval mode."""
    base = getattr(transformers, AUTO[task]).from_pretrained(model_dir).eval()
    if not adapter:
        return base
    return PeftModel.from_pretrained(base, str(Path(store) / adapter)).eval()


@functools.lru_cache(maxsize=8)
def processor(model_dir: str, task: str):
    """The tokenizer or image processor of a model folder."""
    if task == "classify-image":
        return transformers.AutoImageProcessor.from_pretrained(model_dir)
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def generate(model_dir, store, adapter, prompt, max_new_tokens, *, temperature=0.0, top_p=1.0, seed=None, top_k=0,
             repetition_penalty=1.0):
    """(generated_text, num_generated_tokens, finish_reason) of one row, PEFT alone, every
    sampling parameter passed explicitly."""
    tok, model = processor(model_dir, "generate"), oracle_model(model_dir, store, adapter, "generate")
    if adapter and model.active_peft_config.is_prompt_learning:
        assert temperature == 0 and repetition_penalty == 1.0, "the prompt-learning oracle is greedy only"
        return _finish(tok, model, greedy_over_forward(model, tok(prompt).input_ids, max_new_tokens))
    enc = tok(prompt, return_tensors="pt")
    return generate_ids(model_dir, store, adapter, enc.input_ids[0].tolist(), max_new_tokens, temperature=temperature,
                        top_p=top_p, seed=seed, top_k=top_k, repetition_penalty=repetition_penalty)


def generate_ids(model_dir, store, adapter, ids: list[int], max_new_tokens, *, temperature=0.0, top_p=1.0, seed=None,
                 top_k=0, repetition_penalty=1.0):
    """`generate` on given token ids (e.g. a chat template's, as transformers tokenizes it)."""
    tok, model = processor(model_dir, "generate"), oracle_model(model_dir, store, adapter, "generate")
    enc = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    kwargs = {"do_sample": False, "repetition_penalty": repetition_penalty}
    if temperature > 0:
        torch.manual_seed(seed)
        kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                  "repetition_penalty": repetition_penalty}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                             **kwargs)
    return _finish(tok, model, out[0, len(ids):].tolist())


def greedy_over_forward(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding over PEFT's forward on the whole sequence, without a cache: the oracle
    for prompt tuning, P-tuning and prefix tuning, whose `generate()` PEFT 0.21.2 gets wrong on
    transformers 5 (it re-injects the virtual tokens at every step, or drops the prefix)."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            seq = torch.tensor([ids + new])
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1]
            new.append(int(logits.argmax()))
            if new[-1] in eos:
                break
    return new


def _finish(tok, model, new: list[int]) -> tuple[str, int, str]:
    """(text, token count, finish_reason) of a row's new tokens, cut at the first EOS."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    reason = "length"
    for k, t in enumerate(new):
        if t in eos:
            new, reason = new[: k + 1], "stop"
            break
    return tok.decode(new, skip_special_tokens=True), len(new), reason


def logits(model_dir, store, adapter, task, value) -> torch.Tensor:
    """Classification logits (text or image) of one row, PEFT alone."""
    model = oracle_model(model_dir, store, adapter, task)
    if task == "classify-image":
        from PIL import Image
        import io

        image = Image.open(io.BytesIO(value)).convert("RGB")
        inputs = processor(model_dir, task)(images=[image], return_tensors="pt")
    else:
        inputs = processor(model_dir, task)(value, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0].float()


def scores(model_dir, store, adapter, task, value) -> list[float]:
    """Softmax scores of one row, PEFT alone."""
    return torch.softmax(logits(model_dir, store, adapter, task, value), -1).tolist()


def embedding(model_dir, store, adapter, text, normalize=False) -> list[float]:
    """Mean-pooled last hidden state of one row's real tokens, PEFT alone."""
    model = oracle_model(model_dir, store, adapter, "embed")
    inputs = processor(model_dir, "embed")(text, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state[0]
    config = model.active_peft_config if adapter else None
    if config is not None and config.is_prompt_learning and config.peft_type != "PREFIX_TUNING":
        hidden = hidden[config.num_virtual_tokens:]  # Switchyard pools the real tokens only (a prefix has none here)
    pooled = hidden.mean(0)
    return (torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled).tolist()


def assert_close(actual, expected, atol=ATOL, what=""):
    """Max abs difference <= atol (docs/contract.md: 1e-4 in float32)."""
    diff = (torch.tensor(actual, dtype=torch.float64) - torch.tensor(expected, dtype=torch.float64)).abs().max().item()
    assert diff <= atol, f"{what}: max abs difference {diff:.3g} > {atol}"
