"""Task embed pools as a folder's sentence-transformers files say (modules.json, the Pooling
module's config.json, Normalize), `--pooling` / `--normalize` / `--no-normalize` override
them, modules it cannot reproduce are refused, and every mode equals an independent
reference: PEFT alone on each row (no padding, so each mode is a one-line formula) and, for
base rows, sentence-transformers itself."""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

import oracle
from actors import Predictor
from actors.config import PredictorConfig
from actors.embedding import embedding_spec
from testkit.data import SENTENCES

ST = "sentence_transformers.models."  # the legacy type names (sentence-transformers 2-5)
ST6 = {"Transformer": "sentence_transformers.base.modules.transformer.Transformer",
       "Pooling": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
       "Normalize": "sentence_transformers.base.modules.normalize.Normalize"}
LEGACY_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
               "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
               "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}


def _st_folder(model: str, dest: Path, modes=("mean",), normalize=False, *, legacy=True, modules=None,
               pooling_config=None, **files) -> str:
    """A copy of model folder `model` at `dest` with sentence-transformers files: modules.json
    (Transformer, Pooling, Normalize or `modules`), 1_Pooling/config.json (legacy boolean keys or
    sentence-transformers 6's `pooling_mode` list) and any `files` ({name: JSON value})."""
    shutil.copytree(model, dest)
    if modules is None:
        kinds = ["Transformer", "Pooling"] + (["Normalize"] if normalize else [])
        paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize"}
        modules = [{"idx": i, "name": str(i), "path": paths[k], "type": ST + k if legacy else ST6[k]}
                   for i, k in enumerate(kinds)]
    (dest / "modules.json").write_text(json.dumps(modules))
    if pooling_config is None:
        pooling_config = ({"word_embedding_dimension": 64, **{key: m in modes for m, key in LEGACY_KEYS.items()}}
                          if legacy else {"embedding_dimension": 64, "pooling_mode": list(modes)})
    (dest / "1_Pooling").mkdir(exist_ok=True)
    (dest / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    for name, value in files.items():
        (dest / name.replace("__", "/")).parent.mkdir(parents=True, exist_ok=True)
        (dest / name.replace("__", "/")).write_text(json.dumps(value))
    return str(dest)


def _reference(hidden: torch.Tensor, modes, normalize: bool) -> torch.Tensor:
    """One unpadded row's embedding from its last hidden state [T, H], each mode by its formula."""
    n = hidden.shape[0]
    weights = torch.arange(1, n + 1, dtype=hidden.dtype).unsqueeze(-1)
    formulas = {"cls": hidden[0], "lasttoken": hidden[-1], "max": hidden.max(0).values, "mean": hidden.mean(0),
                "mean_sqrt_len_tokens": hidden.sum(0) / math.sqrt(n),
                "weightedmean": (hidden * weights).sum(0) / weights.sum()}
    out = torch.cat([formulas[m] for m in modes])
    return F.normalize(out, dim=-1) if normalize else out


def _oracle(model_dir: str, store: str, adapter, text: str, modes, normalize: bool) -> list[float]:
    """PEFT alone (the bare base, or PeftModel.from_pretrained) on one row, pooled by formula."""
    model = oracle.oracle_model(model_dir, store, adapter, "embed")
    inputs = oracle.processor(model_dir, "embed")(text, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state[0].float()
    return _reference(hidden, modes, normalize).tolist()


@functools.lru_cache(maxsize=4)
def _sentence_transformer(folder: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(folder, device="cpu", local_files_only=True)


def _texts(n: int) -> list[str]:
    """Ragged texts (3 to ~45 tokens), so every batch pads."""
    return [SENTENCES[i % len(SENTENCES)][: 4 + 13 * (i % 4)] for i in range(n)]


# --------------------------------------------------------------------------- reading the files


@pytest.mark.parametrize("modes, normalize, legacy", [
    (("mean",), True, True),  # all-MiniLM-L6-v2's files
    (("cls",), False, True),
    (("cls", "max", "mean", "lasttoken"), False, True),  # concatenated in sentence-transformers' fixed order
    (("lasttoken",), True, False),  # sentence-transformers 6's names and `pooling_mode` list
    (("max", "cls"), False, False),  # a list keeps its own order
])
def test_spec_follows_the_files(bert, tmp_path, modes, normalize, legacy):
    folder = _st_folder(bert[0], tmp_path / "st", modes, normalize, legacy=legacy)
    spec = embedding_spec(folder)
    assert (spec.modes, spec.normalize) == (modes, normalize)
    assert embedding_spec(folder, "cls", None).modes == ("cls",)  # --pooling wins
    assert embedding_spec(folder, None, not normalize).normalize is (not normalize)  # --normalize / --no-normalize


def test_spec_without_files_and_with_all_modes_off(bert, tmp_path):
    spec = embedding_spec(bert[0])
    assert (spec.modes, spec.normalize, spec.max_length) == (("mean",), False, None)
    assert embedding_spec(bert[0], "max", True).modes == ("max",)
    none_on = _st_folder(bert[0], tmp_path / "st", (), pooling_config={"pooling_mode_cls_token": False})
    assert embedding_spec(none_on).modes == ("mean",)  # as sentence-transformers reads it
    string = _st_folder(bert[0], tmp_path / "st6", pooling_config={"pooling_mode": "weightedmean"})
    assert embedding_spec(string).modes == ("weightedmean",)


def _dense_modules() -> list[dict]:
    return [{"idx": 0, "name": "0", "path": "", "type": ST + "Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST + "Pooling"},
            {"idx": 2, "name": "2", "path": "2_Dense", "type": ST + "Dense"}]


@pytest.mark.parametrize("kwargs, match", [
    ({"modules": _dense_modules()}, r"sentence_transformers\.models\.Dense \(path '2_Dense'\).*cannot reproduce"),
    ({"modules": [{"idx": 0, "name": "0", "path": "0_Transformer", "type": ST + "Transformer"},
                  {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST + "Pooling"}]}, "sub-folder '0_Transformer'"),
    ({"modules": [{"idx": 0, "name": "0", "path": "", "type": ST + "Transformer"},
                  {"idx": 1, "name": "1", "path": "2_Normalize", "type": ST + "Normalize"},
                  {"idx": 2, "name": "2", "path": "1_Pooling", "type": ST + "Pooling"}]},
     "Transformer -> Normalize -> Pooling"),
    ({"modules": [{"idx": 0, "name": "0", "path": "", "type": "my_package.Encoder"}]}, "my_package.Encoder"),
    ({"pooling_config": {"pooling_mode": "median"}}, r"\['median'\]"),
    ({"sentence_bert_config.json": {"max_seq_length": 64, "do_lower_case": True}}, "do_lower_case"),
    ({"config_sentence_transformers.json": {"default_prompt_name": "query", "prompts": {"query": "query: "}}},
     "default_prompt_name 'query'"),
    ({"config_sentence_transformers.json": {"model_type": "SparseEncoder"}}, "SparseEncoder"),
    ({"2_Normalize__config.json": {"module_input_name": "token_embeddings"}, "normalize": True}, "token_embeddings"),
    ({"modules.json": {"not": "a list"}}, "not a list"),
])
def test_folders_it_cannot_reproduce_are_refused(bert, tmp_path, kwargs, match):
    kwargs = dict(kwargs)
    normalize = kwargs.pop("normalize", False)
    modules_file = kwargs.pop("modules.json", None)
    folder = _st_folder(bert[0], tmp_path / "st", normalize=normalize, **kwargs)
    if modules_file is not None:
        (Path(folder) / "modules.json").write_text(json.dumps(modules_file))
    with pytest.raises(ValueError, match=match):
        embedding_spec(folder)
    with pytest.raises(ValueError, match=match):  # up front, before any model work (the job's driver, Serve)
        PredictorConfig(model=folder, task="embed")
    PredictorConfig(model=folder, task="classify")  # only embed reads them


def test_no_pooling_module_needs_the_flag(bert, tmp_path):
    folder = _st_folder(bert[0], tmp_path / "st", modules=[{"idx": 0, "name": "0", "path": "", "type": ST + "Transformer"}])
    with pytest.raises(ValueError, match="no Pooling module.*pass --pooling"):
        embedding_spec(folder)
    assert embedding_spec(folder, "cls").modes == ("cls",)


def test_bad_option_values_are_refused(bert):
    with pytest.raises(ValueError, match=r"pooling \('avg'\) must be one of mean, cls, max, lasttoken"):
        PredictorConfig(model=bert[0], task="embed", pooling="avg")
    with pytest.raises(ValueError, match=r"normalize \('yes'\) must be true, false or unset"):
        PredictorConfig(model=bert[0], task="embed", normalize="yes")


def test_flags_of_the_job_and_the_server(bert):
    from actors.serve.launch import build_parser as serve_parser
    from pipeline.config import config_from_args

    job = ["--model", bert[0], "--task", "embed", "--input", "in.parquet", "--output", "out"]
    assert config_from_args([*job, "--pooling", "cls", "--no-normalize"]).options == {"pooling": "cls",
                                                                                      "normalize": False}
    assert config_from_args([*job, "--normalize"]).options == {"normalize": True}
    assert config_from_args(job).options == {}  # both as the folder says
    args = vars(serve_parser().parse_args(["--model", bert[0], "--task", "embed", "--pooling", "lasttoken",
                                           "--no-normalize"]))
    assert (args["pooling"], args["normalize"]) == ("lasttoken", False)
    with pytest.raises(SystemExit):
        config_from_args([*job, "--pooling", "avg"])  # argparse lists the choices


# --------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("modes, normalize", [
    (("cls",), False),
    (("max",), True),
    (("lasttoken",), False),
    (("weightedmean",), False),
    (("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"), True),
])
def test_mixed_batch_pools_as_the_folder_says(bert_embed, tmp_path, modes, normalize):
    model, store = bert_embed
    folder = _st_folder(model, tmp_path / "st", modes, normalize)
    p = Predictor(model=folder, adapters=store, task="embed", canary=False)
    adapters = ["emb-a", None, "emb-b", "", "emb-a", "emb-b", None, "emb-a"]
    texts = _texts(len(adapters))
    out = p(pa.table({"text": texts, "adapter_id": adapters})).to_pylist()
    assert len(out[0]["embedding"]) == 64 * len(modes)
    for row in out:
        expected = _oracle(model, store, row["adapter_id"], row["text"], modes, normalize)  # same weights
        oracle.assert_close(row["embedding"], expected, what=f"{modes} {row['adapter_id']}")
    base = [r for r in out if not r["adapter_id"]]
    st = _sentence_transformer(folder).encode([r["text"] for r in base], convert_to_tensor=True)
    oracle.assert_close([r["embedding"] for r in base], st.tolist(), what="sentence-transformers")


def test_flags_override_the_folder(bert_embed, tmp_path):
    model, store = bert_embed
    folder = _st_folder(model, tmp_path / "st", ("cls",), normalize=True, legacy=False)
    p = Predictor(model=folder, adapters=store, task="embed", pooling="mean", normalize=False, canary=False)
    texts = _texts(4)
    for row in p(pa.table({"text": texts, "adapter_id": ["emb-a", None, "emb-b", None]})).to_pylist():
        expected = oracle.embedding(model, store, row["adapter_id"], row["text"], normalize=False)
        oracle.assert_close(row["embedding"], expected, what=str(row["adapter_id"]))


@pytest.mark.parametrize("mode", ["lasttoken", "max", "weightedmean"])
def test_a_row_does_not_depend_on_its_batch(bert_embed, tmp_path, mode):
    model, store = bert_embed
    p = Predictor(model=model, adapters=store, task="embed", pooling=mode, canary=False)
    short, long = "the cat", SENTENCES[10] + " " + SENTENCES[11]
    alone = p(pa.table({"text": [short], "adapter_id": ["emb-a"]})).to_pylist()[0]["embedding"]
    padded = p(pa.table({"text": [long, short, long], "adapter_id": ["emb-b", "emb-a", None]})).to_pylist()[1]
    oracle.assert_close(padded["embedding"], alone, atol=1e-5, what=mode)


def test_rows_over_max_seq_length_are_too_long(bert, tmp_path):
    folder = _st_folder(bert[0], tmp_path / "st", **{"sentence_bert_config.json": {"max_seq_length": 8}})
    p = Predictor(model=folder, task="embed", canary=False)
    out = p(pa.table({"text": ["the cat", SENTENCES[10]]})).to_pylist()
    assert out[0]["error"] is None
    assert out[1]["error"].startswith("too_long:") and "max_seq_length of 8" in out[1]["error"]


def test_the_job_refuses_a_folder_it_cannot_reproduce_up_front(bert, tmp_path, capsys):
    import pyarrow.parquet as pq

    from pipeline.job import main

    folder = _st_folder(bert[0], tmp_path / "st", modules=_dense_modules())
    pq.write_table(pa.table({"text": ["the cat"]}), tmp_path / "in.parquet")
    argv = ["--model", folder, "--task", "embed", "--input", str(tmp_path / "in.parquet"), "--output",
            str(tmp_path / "out")]
    assert main(argv) == 2  # before Ray starts or any model loads
    assert "sentence_transformers.models.Dense" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_lasttoken_on_a_decoder_takes_each_rows_last_real_token(gpt2):
    model = gpt2[0]  # GPT-2 pads with EOS: the mask, not the pad id, tells where each row ends
    p = Predictor(model=model, task="embed", pooling="lasttoken", canary=False)
    texts = _texts(5)
    for row in p(pa.table({"text": texts})).to_pylist():
        oracle.assert_close(row["embedding"], _oracle(model, None, None, row["text"], ("lasttoken",), False),
                            what=row["text"])
