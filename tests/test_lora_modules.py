"""Adapters outside the store, registered as name=path (`--lora-modules`, as vLLM has it):
rows name them like store adapters, through the Predictor and the job, against the oracle;
bad entries are refused up front with one line."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

import oracle
from actors import Predictor
from pipeline.config import config_from_args
from pipeline.job import run
from testkit.data import SENTENCES


@pytest.fixture
def elsewhere(llama, tmp_path):
    """A copy of the session store's `vera` adapter in a folder outside the store."""
    shutil.copytree(f"{llama[1]}/vera", tmp_path / "elsewhere" / "vera-copy")
    return tmp_path / "elsewhere"


def _check(model, store, rows):
    for row in rows:
        assert row["error"] is None, row
        expected = oracle.generate(model, store, row["adapter_id"], row["prompt"], 3)
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == expected


def test_a_registered_adapter_runs_beside_the_store(llama, elsewhere):
    model, store = llama
    p = Predictor(model=model, adapters=store, task="generate", max_new_tokens=3,
                  lora_modules=[f"outside={elsewhere / 'vera-copy'}"])
    assert "outside" in p.adapter_ids
    prompts = [SENTENCES[i][: 8 + 6 * i] for i in range(4)]
    rows = p(pa.table({"prompt": prompts, "adapter_id": ["outside", "lora-qv", None, "outside"]})).to_pylist()
    _check(model, store, [r for r in rows if r["adapter_id"] != "outside"])
    for row in (r for r in rows if r["adapter_id"] == "outside"):  # the oracle reads it from its own folder
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == \
            oracle.generate(model, str(elsewhere), "vera-copy", row["prompt"], 3)


@pytest.mark.slow  # the job with --lora-modules is slow; the Predictor tests cover routing
def test_registered_adapters_through_the_job(ray_cluster, llama, elsewhere, tmp_path):
    model, _ = llama
    pa_table = pa.table({"prompt": SENTENCES[:2], "adapter_id": ["outside", None]})
    import pyarrow.parquet as pq

    pq.write_table(pa_table, tmp_path / "in.parquet")
    config = config_from_args(["--model", model, "--task", "generate", "--input", str(tmp_path / "in.parquet"),
                               "--output", str(tmp_path / "out"), "--lora-modules",
                               f"outside={elsewhere / 'vera-copy'}", "--max-new-tokens", "3", "--concurrency", "1",
                               "--num-cpus", "0.5"])
    assert run(config).per_adapter == {"outside": 1, "(base)": 1}
    for row in pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist():
        folder, adapter = (str(elsewhere), "vera-copy") if row["adapter_id"] else (None, None)
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == \
            oracle.generate(model, folder, adapter, row["prompt"], 3)


@pytest.mark.parametrize(("entry", "message"), [
    ("no-equals-sign", r"--lora-modules entry 'no-equals-sign' must be name=path"),
    ("../up=/tmp", r"--lora-modules name '../up' is not a valid adapter id"),
    ("lora-qv={elsewhere}/vera-copy", r"--lora-modules name 'lora-qv' is also a folder of the adapter store"),
    ("empty={elsewhere}", r"--lora-modules empty=.*: no adapter_config.json there"),
])
def test_bad_entries_are_refused(llama, elsewhere, entry, message):
    model, store = llama
    with pytest.raises(ValueError, match=message):
        Predictor(model=model, adapters=store, task="generate", lora_modules=[entry.format(elsewhere=elsewhere)])
