"""Quantized checkpoints (a `quantization_config` in config.json) are refused up front: a
ValueError from `Predictor` and `PredictorConfig`, exit status 2 with one line from the job,
before any model work and before Ray starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.job as job
from actors import Predictor
from actors.config import PredictorConfig
from testkit.models import build_llama

QUANTIZATIONS = {  # quant_method -> config.json's quantization_config, as transformers saves them
    "bitsandbytes": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False},
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic"},
}


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory) -> Path:
    """A tiny unquantized Llama folder."""
    return Path(build_llama(tmp_path_factory.mktemp("quantized") / "plain"))


def _quantized(plain: Path, dest: Path, quantization: dict) -> str:
    """A copy of `plain` whose config.json carries `quantization`."""
    folder = Path(shutil.copytree(plain, dest))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("method", sorted(QUANTIZATIONS))
def test_quantized_model_folder_is_refused_naming_folder_and_method(plain_model, tmp_path, method):
    model = _quantized(plain_model, tmp_path / f"q-{method}", QUANTIZATIONS[method])
    message = rf"model folder '.*q-{method}' is quantized .*quant_method '{method}'.*unquantized checkpoint"
    with pytest.raises(ValueError, match=message):
        PredictorConfig(model=model, task="generate")
    with pytest.raises(ValueError, match=message):
        Predictor(model=model, task="generate")


def test_quantization_config_without_method_or_null_is_handled(plain_model, tmp_path):
    unknown = _quantized(plain_model, tmp_path / "odd", {"bits": 4})
    with pytest.raises(ValueError, match=r"is quantized .*quant_method 'unknown'"):
        PredictorConfig(model=unknown, task="generate")
    unset = _quantized(plain_model, tmp_path / "null", None)  # `"quantization_config": null` is no quantization
    assert PredictorConfig(model=unset, task="generate").model == unset


def test_job_refuses_a_quantized_model_with_one_line_and_no_ray(plain_model, tmp_path, monkeypatch, capsys):
    model = _quantized(plain_model, tmp_path / "q", QUANTIZATIONS["bitsandbytes"])
    pq.write_table(pa.table({"prompt": ["hello"], "adapter_id": [None]}, schema=pa.schema(
        [("prompt", pa.string()), ("adapter_id", pa.string())])), tmp_path / "in.parquet")
    monkeypatch.setattr(job, "init_ray", lambda: pytest.fail("Ray was started for a quantized model"))
    status = job.main(["--model", model, "--task", "generate", "--input", str(tmp_path / "in.parquet"),
                       "--output", str(tmp_path / "out")])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2, captured.err
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("batch_infer: error: model folder ")
    assert "quant_method 'bitsandbytes'" in lines[0] and "unquantized checkpoint" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
