"""`make demo`'s Ray head: its own ports and temp dir, stopped alone (other Ray instances on
the machine keep running), Ray's own message when it cannot start; the demo's task flag."""

from __future__ import annotations

import socket
import sys
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "jobs"))
import demo  # noqa: E402


def _answers(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=2):
            return True
    except OSError:
        return False


def test_the_demo_head_stops_alone(ray_cluster):
    """The session's Ray (another instance on this machine) survives the demo head's stop."""
    import ray

    with demo.local_head() as address:
        assert address != ray_cluster.dashboard_url
        assert _answers(address)
    assert not _answers(address)
    assert ray.get(ray.remote(lambda: 41).remote()) + 1 == 42  # the session's Ray still runs tasks


@pytest.mark.slow  # Ray retries a taken port for about 40 s before it gives up
def test_a_taken_port_shows_rays_own_message(monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    real = demo.free_ports
    monkeypatch.setattr(demo, "free_ports", lambda n: [port, *real(n - 1)])
    try:
        with pytest.raises(SystemExit, match=r"demo: `ray start --head` failed \(exit \d+\); Ray said:\n(.|\n)*"
                                             rf"{port}"):
            with demo.local_head():
                pass
    finally:
        taken.close()


def test_the_demo_takes_a_task_only_with_a_model(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--task", "classify"])
    assert "the built-in demo model is a generate model: give --model, --input" in capsys.readouterr().err
    args = demo.parse_args(["--task", "embed", "--model", "m", "--input", "in.parquet"])
    job = demo.job_arguments({"model": args.model, "input": args.input, "adapters": None}, args.task, Path("out"))
    assert job[job.index("--task") + 1] == "embed" and "--max-new-tokens" not in job and "--adapters" not in job
