"""--allocator: which library the job's actors and Serve's replicas preload, and what a
process started with that environment really runs with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from actors.allocator import allocator_env, find_tcmalloc, runtime_env
from actors.serve.options import ServeOptions
from pipeline.config import JobConfig
from pipeline.infer import infer

ROOT = Path(__file__).resolve().parent.parent


def _fake_lib(tmp_path, name: str = "libtcmalloc_minimal.so.4") -> str:
    path = tmp_path / name
    path.write_bytes(b"")
    return str(path)


def test_auto_preloads_tcmalloc_in_front_of_what_is_preloaded(tmp_path, monkeypatch):
    lib = _fake_lib(tmp_path)
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    assert allocator_env("auto", (str(tmp_path),)) == {"LD_PRELOAD": f"{lib}:/opt/other.so"}
    assert allocator_env("tcmalloc", (str(tmp_path),)) == {"LD_PRELOAD": f"{lib}:/opt/other.so"}


def test_a_tcmalloc_already_preloaded_is_kept_once(tmp_path, monkeypatch):
    _fake_lib(tmp_path)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libtcmalloc.so.4")
    assert allocator_env("auto", (str(tmp_path),)) == {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}


def test_without_the_library_auto_sets_nothing_and_tcmalloc_refuses(tmp_path):
    assert allocator_env("auto", (str(tmp_path),)) == {}
    assert allocator_env("system", (str(tmp_path),)) == {}
    with pytest.raises(ValueError, match="tcmalloc is not installed.*apt-get install libtcmalloc-minimal4"):
        allocator_env("tcmalloc", (str(tmp_path),))


def test_unknown_allocator_is_refused_by_the_job_and_serve():
    with pytest.raises(ValueError, match=r"--allocator \('jemalloc'\) must be auto, tcmalloc or system"):
        JobConfig(model="m", task="embed", input="i", output="o", allocator="jemalloc")
    with pytest.raises(ValueError, match=r"allocator \('jemalloc'\) must be one of auto, tcmalloc, system"):
        ServeOptions(allocator="jemalloc")


def test_system_the_default_leaves_the_replicas_runtime_env_alone():
    assert "runtime_env" not in ServeOptions().deployment_options()["ray_actor_options"]
    assert JobConfig(model="m", task="embed", input="i", output="o").allocator == "system"
    assert runtime_env("system") == {}


@pytest.mark.skipif(find_tcmalloc() is None, reason="tcmalloc is not installed on this machine")
def test_a_process_started_with_the_environment_runs_tcmalloc():
    """What Ray does with a runtime_env's env_vars: start the worker process with them."""
    env = ServeOptions(allocator="auto").deployment_options()["ray_actor_options"]["runtime_env"]["env_vars"]
    probe = "from actors.allocator import running_allocator; print(running_allocator())"
    runs = {name: subprocess.run([sys.executable, "-c", probe], env=extra, capture_output=True, text=True,
                                 check=True, cwd=ROOT).stdout.strip() for name, extra in (("preloaded", env),
                                                                                         ("plain", {}))}
    assert runs == {"preloaded": "tcmalloc", "plain": "system"}


class _Dataset:
    """Records what the job asks of Ray Data's map_batches."""

    def map_batches(self, fn, **kwargs):
        self.kwargs = kwargs
        return self


@pytest.mark.parametrize("allocator", ["auto", "system"])
def test_the_jobs_actor_pool_gets_the_allocators_runtime_env(allocator):
    config = JobConfig(model="m", task="embed", input="i", output="o", allocator=allocator)
    dataset = infer(_Dataset(), config, ledger=None)
    assert dataset.kwargs.get("runtime_env", {}) == runtime_env(allocator)
    if allocator == "auto" and find_tcmalloc():
        assert find_tcmalloc() in dataset.kwargs["runtime_env"]["env_vars"]["LD_PRELOAD"]
