"""Resume (`--checkpoint-dir`, `--id-column`): what an earlier run left is kept, the rest is
written, every expected row ends up exactly once and equal to the oracle. The states a
crash leaves are built on disk here (a fan-out row split across write tasks, a replayed
task's copy, an uncommitted file); tests/test_faults.py kills real processes."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import oracle
from pipeline.config import config_from_args
from pipeline.job import run
from testkit.data import SENTENCES

NAMED = [["head-a", "no-head"], [], None, ["vera"], ["head-b", "head-a", "head-a"], ["missing", "vera"], [""],
         ["no-head", None], ["head-a"], ["vera", "head-b"]]


def _fan_out_input(path: Path) -> pa.Table:
    table = pa.table({"id": [100 + i for i in range(len(NAMED))], "text": SENTENCES[: len(NAMED)],
                      "adapter_ids": pa.array(NAMED, type=pa.list_(pa.string()))})
    pq.write_table(table, path)
    return table


def _args(model, store, tmp_path, *extra) -> list[str]:
    return ["--model", model, "--adapters", store, "--task", "classify", "--input", str(tmp_path / "in.parquet"),
            "--output", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ckpt"), "--id-column", "id",
            "--concurrency", "1", "--num-cpus", "0.5", "--batch-size", "4", "--rows-per-block", "3", *extra]


def _rows(output: Path) -> list[dict]:
    return pads.dataset(str(output), format="parquet").to_table().to_pylist()


def _expected_keys() -> collections.Counter:
    return collections.Counter((100 + i, None if a in (None, "") else a)
                               for i, named in enumerate(NAMED) for a in ([x for x in named or ()] or [None]))


def _check_against_oracle(rows: list[dict], model, store) -> None:
    """Every expected (id, adapter) row exactly once, each equal to PEFT's."""
    assert collections.Counter((r["id"], r["adapter_id"]) for r in rows) == _expected_keys()
    for row in rows:
        if row["adapter_id"] == "missing":
            assert row["error"].startswith("unknown_adapter:")
            continue
        expected = oracle.scores(model, store, row["adapter_id"], "classify", SENTENCES[row["id"] - 100])
        oracle.assert_close(row["scores"], expected, what=str((row["id"], row["adapter_id"])))


def _crash_state(tmp_path: Path, keep) -> list[dict]:
    """What a crash of the finished run in `ref/` leaves: no `_SUCCESS`, nothing published,
    one staged file holding the rows `keep(row)` selects. Returns the staged rows."""
    out = tmp_path / "out"
    rows = _rows(tmp_path / "ref")
    (out / "_temporary").mkdir(parents=True)
    staged = [r for r in rows if keep(r)]
    pq.write_table(pa.Table.from_pylist(staged, schema=pq.read_schema(next(iter(_files(tmp_path / "ref"))))),
                   out / "_temporary" / "earlier_000000_000000.parquet")
    manifest = json.loads((tmp_path / "ckpt" / "switchyard-checkpoint.json").read_text())
    assert manifest["job"]["id_column"] == "id"
    return staged


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet"))


@pytest.fixture(scope="module")
def reference(ray_cluster, bert, tmp_path_factory):
    """One complete checkpointed fan-out run, for the module."""
    model, store = bert
    folder = tmp_path_factory.mktemp("resume_reference")
    _fan_out_input(folder / "in.parquet")
    summary = run(config_from_args(_args(model, store, folder)))
    assert summary.skipped == 0 and summary.rows_out == sum(_expected_keys().values())
    _check_against_oracle(_rows(folder / "out"), model, store)
    return folder


@pytest.fixture
def finished(reference, bert, tmp_path):
    """This test's copy of the reference run: its input, its checkpoint folder, and its
    complete output in `ref/`."""
    shutil.copy(reference / "in.parquet", tmp_path / "in.parquet")
    shutil.copytree(reference / "ckpt", tmp_path / "ckpt")
    shutil.copytree(reference / "out", tmp_path / "ref")
    manifest = tmp_path / "ckpt" / "switchyard-checkpoint.json"  # the same job, at this test's paths
    manifest.write_text(manifest.read_text().replace(str(reference), str(tmp_path)))
    return bert


def test_fan_out_row_split_across_write_tasks_is_finished_not_lost(finished, tmp_path):
    """Ray Data's own filter would count id 104 as done once one of its three rows was
    committed; the rerun writes exactly the two rows that are missing. The staged file is
    there twice, as a replayed write task would leave it: the copies are dropped."""
    model, store = finished
    staged = _crash_state(tmp_path, lambda r: r["id"] < 103 or (r["id"] == 104 and r["adapter_id"] == "head-b"))
    shutil.copy(tmp_path / "out/_temporary/earlier_000000_000000.parquet",
                tmp_path / "out/_temporary/earlier_000001_000000.parquet")
    summary = run(config_from_args(_args(model, store, tmp_path)))
    assert summary.skipped == 2 * len(staged) and summary.duplicates_dropped == len(staged)
    assert any(line.startswith(f"rows skipped as already done: {2 * len(staged)} ({len(staged)} copies")
               for line in summary.lines())
    rows = _rows(tmp_path / "out")
    _check_against_oracle(rows, model, store)
    assert sorted(r["adapter_id"] for r in rows if r["id"] == 104) == ["head-a", "head-a", "head-b"]
    assert (tmp_path / "out" / "_SUCCESS").is_file() and not (tmp_path / "out" / "_temporary").exists()
    assert not (tmp_path / "ckpt" / "ray").exists()  # Ray's id files go once the output is complete


@pytest.mark.slow
def test_files_of_uncommitted_write_tasks_are_deleted_and_redone(finished, tmp_path):
    """A write task that died between writing its file and committing it left a pending id
    file in Ray's checkpoint folder: its rows do not count as done."""
    model, store = finished
    _crash_state(tmp_path, lambda r: r["id"] < 103)
    ray_folder = tmp_path / "ckpt" / "ray"
    ray_folder.mkdir(exist_ok=True)
    uncommitted = [r for r in _rows(tmp_path / "ref") if r["id"] in (106, 107)]
    pq.write_table(pa.Table.from_pylist(uncommitted), tmp_path / "out/_temporary/w1_000003_000000.parquet")
    pq.write_table(pa.table({"id": [106, 107]}), ray_folder / "w1_000003_000000.pending.parquet")
    summary = run(config_from_args(_args(model, store, tmp_path)))
    assert summary.skipped == sum(1 for r in _rows(tmp_path / "ref") if r["id"] < 103)
    _check_against_oracle(_rows(tmp_path / "out"), model, store)


@pytest.mark.slow
def test_a_job_killed_while_publishing_resumes(finished, tmp_path):
    """Some files were moved into the output, `_SUCCESS` was never written."""
    model, store = finished
    _crash_state(tmp_path, lambda r: r["id"] < 104)
    (tmp_path / "out/_temporary/earlier_000000_000000.parquet").rename(tmp_path / "out/earlier_000000_000000.parquet")
    summary = run(config_from_args(_args(model, store, tmp_path)))
    assert summary.skipped > 0
    _check_against_oracle(_rows(tmp_path / "out"), model, store)


def test_a_complete_job_run_again_does_nothing(finished, tmp_path):
    model, store = finished
    shutil.copytree(tmp_path / "ref", tmp_path / "out")
    before = {p.name: p.stat().st_mtime_ns for p in _files(tmp_path / "out")}
    summary = run(config_from_args(_args(model, store, tmp_path)))
    assert summary.skipped == summary.rows_out == sum(_expected_keys().values())
    assert {p.name: p.stat().st_mtime_ns for p in _files(tmp_path / "out")} == before


@pytest.mark.slow
def test_overwrite_starts_over(finished, tmp_path):
    model, store = finished
    _crash_state(tmp_path, lambda r: r["id"] < 104)
    summary = run(config_from_args(_args(model, store, tmp_path, "--overwrite")))
    assert summary.skipped == 0
    _check_against_oracle(_rows(tmp_path / "out"), model, store)


@pytest.mark.slow
def test_scalar_adapter_ids_resume_with_string_ids(ray_cluster, bert, tmp_path):
    model, store = bert
    adapters = ["head-a", None, "vera", "", "no-head", "head-b", "nope", "vera"]
    ids = [f"row-{i}" for i in range(len(adapters))]
    pq.write_table(pa.table({"id": ids, "text": SENTENCES[: len(adapters)], "adapter_id": adapters}),
                   tmp_path / "in.parquet")
    run(config_from_args(_args(model, store, tmp_path)))
    shutil.move(tmp_path / "out", tmp_path / "ref")
    staged = _crash_state(tmp_path, lambda r: r["id"] in ("row-1", "row-4", "row-6"))
    summary = run(config_from_args(_args(model, store, tmp_path)))
    assert summary.skipped == len(staged) == 3
    rows = _rows(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == sorted(ids)
    for row in rows:
        i = ids.index(row["id"])
        assert row["adapter_id"] == adapters[i]
        if adapters[i] == "nope":
            assert row["error"].startswith("unknown_adapter:")
            continue
        oracle.assert_close(row["scores"], oracle.scores(model, store, adapters[i] or None, "classify", SENTENCES[i]))


def test_every_row_carries_its_adapter_version(bert, tmp_path):
    """adapter_version is a hash of the adapter's files: equal for rows of one adapter, new
    when its weights change, null for base rows; the summary read back from an output lists
    it, and warns when one adapter's rows come from two versions."""
    import safetensors.torch

    from actors.adapters import adapter_version
    from actors.predictor import Predictor
    from pipeline.job import summarize

    model, store = bert
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    batch = pa.table({"id": [0, 1, 2], "text": SENTENCES[:3], "adapter_id": ["head-a", None, "head-a"]})
    first_rows = Predictor(model, str(copy), "classify")(batch)
    first = first_rows.column("adapter_version")[0].as_py()
    assert first_rows.column("adapter_version").to_pylist() == [first, None, first] and len(first) == 12
    (tmp_path / "out").mkdir()
    pq.write_table(first_rows, tmp_path / "out" / "a.parquet")
    assert summarize(str(tmp_path / "out"), 3).versions == {"head-a": {first: 2}}
    assert f"adapter versions: head-a {first}" in summarize(str(tmp_path / "out"), 3).lines()
    weights = copy / "head-a" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name] = tensors[name] + 0.5
    safetensors.torch.save_file(tensors, str(weights))
    second = adapter_version(copy / "head-a")
    second_rows = Predictor(model, str(copy), "classify")(batch.slice(0, 1))
    assert second != first and second_rows.column("adapter_version").to_pylist() == [second]
    pq.write_table(second_rows, tmp_path / "out" / "b.parquet")
    lines = summarize(str(tmp_path / "out"), 4).lines()
    assert any(line.startswith("warning: adapter head-a's rows come from 2 versions") for line in lines)


@pytest.mark.slow
def test_rows_of_another_adapter_version_are_reported_on_resume(finished, tmp_path):
    model, store = finished
    _crash_state(tmp_path, lambda r: r["id"] < 104)
    staged = tmp_path / "out/_temporary/earlier_000000_000000.parquet"
    table = pq.read_table(staged)
    versions = ["0123456789ab" if a == "vera" else v
                for a, v in zip(table.column("adapter_id").to_pylist(), table.column("adapter_version").to_pylist())]
    pq.write_table(table.set_column(table.schema.get_field_index("adapter_version"), "adapter_version",
                                    pa.array(versions, pa.string())), staged)
    summary = run(config_from_args(_args(model, store, tmp_path)))
    assert len(summary.versions["vera"]) == 2
    assert any(line.startswith("warning: adapter vera's rows come from 2 versions") for line in summary.lines())


@pytest.mark.parametrize("case, message", [
    ("checkpoint_only", "--checkpoint-dir and --id-column go together"),
    ("limit", "--limit cannot be combined with --checkpoint-dir"),
    ("no_such_column", "input has no 'key' column .--id-column."),
    ("float_ids", "--id-column 'score' is double; it must hold integers or strings"),
    ("repeated_ids", "--id-column 'id' repeats ids .1 of them, e.g. 7 2 times."),
    ("null_ids", "--id-column 'id' holds 1 null"),
    ("inside_output", "--checkpoint-dir '.*out/ckpt' lies inside the output"),
    ("foreign_folder", "holds files of something else"),
    ("other_job", "belongs to another job: --task 'classify' .now 'embed'."),
])
def test_up_front_refusals(bert, tmp_path, case, message):
    model, store = bert
    ids = [7, 7] if case == "repeated_ids" else [1, None] if case == "null_ids" else [1, 2]
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "text": ["a", "b"], "score": [0.5, 1.5]}),
                   tmp_path / "in.parquet")
    args = _args(model, store, tmp_path)
    if case == "checkpoint_only":
        args = args[: args.index("--id-column")] + args[args.index("--id-column") + 2:]
    extra = {"limit": ["--limit", "1"], "no_such_column": ["--id-column", "key"],
             "float_ids": ["--id-column", "score"], "inside_output": ["--checkpoint-dir", str(tmp_path / "out/ckpt")]}
    args += extra.get(case, [])
    if case == "foreign_folder":
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    if case == "other_job":  # an earlier classify run's manifest, then the same command with --task embed
        from pipeline.read import open_input
        from pipeline.resume import _manifest

        (tmp_path / "ckpt").mkdir()
        manifest = _manifest(config_from_args(args), open_input(str(tmp_path / "in.parquet")))
        (tmp_path / "ckpt" / "switchyard-checkpoint.json").write_text(json.dumps(manifest))
        args[args.index("--task") + 1] = "embed"
    with pytest.raises(ValueError, match=message):
        run(config_from_args(args))
    assert not (tmp_path / "out").exists()
