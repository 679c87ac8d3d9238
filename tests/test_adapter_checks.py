"""A broken adapter in an otherwise good store is one clear line before Ray starts: the job's
driver checks every adapter as the actors will (`actors.validation.validate_store`, which runs
the Predictor's own `read_adapter` on a meta-device copy of the base model), and the Predictor
gives the same message."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

import pipeline.job
from actors import Predictor
from actors.validation import validate_store

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = "adapter_model.safetensors"


def _break(store: Path, case: str, outside: Path) -> str:
    """Damage adapter `bad` of `store` one way; returns the message the refusal must hold."""
    bad = store / "bad"
    file = bad / WEIGHTS
    if case == "pickle_only":
        torch.save(load_file(str(file)), bad / "adapter_model.bin")
        file.unlink()
        return r"adapter 'bad' has only pickle weights \(adapter_model\.bin\).*safetensors only"
    if case in ("truncated", "garbage"):
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2] if case == "truncated" else b"\x13garbage" * 64)
        return r"adapter 'bad': corrupt adapter_model\.safetensors"
    if case == "unknown_type":
        config = json.loads((bad / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "SHINY"}))
        return r"adapter 'bad' has type SHINY"
    if case == "config_not_json":
        (bad / "adapter_config.json").write_text("{not json")
        return r"adapter 'bad': cannot read adapter_config\.json"
    tensors = load_file(str(file))
    key = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
    if case == "wrong_shape":
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
        message = r"adapter 'bad': weights of module .* do not fit the base module"
    elif case == "missing_tensor":
        del tensors[key.replace("lora_A", "lora_B")]
        message = r"adapter 'bad': adapter_model\.safetensors lacks lora_B\.weight for module"
    elif case == "nan":
        tensors[key][0, 0] = float("nan")
        message = rf"adapter 'bad': its weights are not finite \(NaN or inf in {key}\)"
    elif case == "symlink_outside":
        save_file(tensors, str(outside / WEIGHTS))
        file.unlink()
        file.symlink_to(outside / WEIGHTS)
        return r"adapter 'bad': adapter_model\.safetensors links outside the adapter folder"
    elif case == "config_symlink_outside":
        shutil.move(bad / "adapter_config.json", outside / "adapter_config.json")
        (bad / "adapter_config.json").symlink_to(outside / "adapter_config.json")
        return r"adapter 'bad': adapter_config\.json links outside the adapter folder"
    save_file(tensors, str(file))
    return message


CASES = ["pickle_only", "truncated", "garbage", "unknown_type", "config_not_json", "wrong_shape", "missing_tensor",
         "nan", "symlink_outside", "config_symlink_outside"]


@pytest.fixture
def broken_store(llama, tmp_path):
    """(model, store, damage): a store of good adapters plus `bad`, a copy of one of them."""
    model, good = llama
    store = tmp_path / "store"
    shutil.copytree(good, store)
    shutil.copytree(store / "lora-qv", store / "bad")
    (tmp_path / "outside").mkdir()
    return model, store, lambda case: _break(store, case, tmp_path / "outside")


@pytest.mark.parametrize("case", CASES)
def test_job_refuses_a_broken_adapter_before_ray_starts(broken_store, tmp_path, monkeypatch, capsys, case):
    model, store, damage = broken_store
    message = damage(case)
    pq.write_table(pa.table({"prompt": ["hi"], "adapter_id": ["lora-qv"]}), tmp_path / "in.parquet")

    def no_ray():
        raise AssertionError("Ray was started")

    monkeypatch.setattr(pipeline.job, "init_ray", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = pipeline.job.main(["--model", model, "--adapters", str(store), "--task", "generate", "--input",
                              str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--num-cpus", "0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert __import__("re").search(message, err[0]), err[0]
    assert not (tmp_path / "out").exists()  # nothing written before the checks passed


@pytest.mark.parametrize("case", CASES)
def test_predictor_refuses_with_the_same_message(broken_store, case):
    model, store, damage = broken_store
    with pytest.raises(ValueError, match=damage(case)):
        Predictor(model=model, adapters=str(store), task="generate", canary=False)


@pytest.mark.parametrize("case", [c for c in CASES if c != "nan"])
def test_headers_only_check_catches_all_but_values(broken_store, case):
    model, store, damage = broken_store
    with pytest.raises(ValueError, match=damage(case)):
        validate_store(model, str(store), "generate", values=False)


def test_headers_only_check_reads_no_values(broken_store):
    """NaN is found only by reading values: the quick check lets it through (the actors refuse it)."""
    model, store, damage = broken_store
    damage("nan")
    assert "bad" in validate_store(model, str(store), "generate", values=False)
    with pytest.raises(ValueError, match="not finite"):
        validate_store(model, str(store), "generate", values=True)


def test_the_one_line_counts_the_other_bad_adapters(broken_store):
    model, store, damage = broken_store
    damage("nan")
    shutil.copytree(store / "bad", store / "bad-too")
    with pytest.raises(ValueError, match=r"adapter 'bad': .*not finite.*\(1 more adapters fail too\)$"):
        validate_store(model, str(store), "generate")


def test_cli_exits_2_with_one_line_and_no_ray(broken_store, tmp_path):
    """As a user types it: status 2, one line naming the adapter, and no Ray instance started."""
    model, store, damage = broken_store
    message = damage("missing_tensor")
    pq.write_table(pa.table({"prompt": ["hi"], "adapter_id": ["lora-qv"]}), tmp_path / "in.parquet")
    result = subprocess.run([sys.executable, "jobs/batch_infer.py", "--model", model, "--adapters", str(store),
                             "--task", "generate", "--input", str(tmp_path / "in.parquet"), "--output",
                             str(tmp_path / "out"), "--num-cpus", "0.5"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and __import__("re").search(message, lines[0]), result.stderr[-3000:]
    assert "Ray" not in result.stdout + result.stderr


def test_jobs_serve_refuses_a_broken_adapter_before_ray_starts(broken_store):
    model, store, damage = broken_store
    message = damage("wrong_shape")
    result = subprocess.run([sys.executable, "jobs/serve.py", "--model", model, "--adapters", str(store), "--task",
                             "generate"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serve.py: error: adapter 'bad'"), result.stderr[-3000:]
    assert __import__("re").search(message, lines[0]) and "Ray" not in result.stdout + result.stderr
