"""`--help` of the job and of Serve: one line of its own per flag (no text copied between
flags), and the task's choices listed."""

from __future__ import annotations

import collections

import pytest

from actors.config import TASKS


def _parsers():
    from actors.serve.launch import build_parser as serve_parser
    from pipeline.config import build_parser as job_parser

    return {"job": job_parser(), "serve": serve_parser()}


@pytest.mark.parametrize("name", ["job", "serve"])
def test_every_flag_has_help_of_its_own(name):
    parser = _parsers()[name]
    helps = {a.option_strings[0]: (a.help or "").split(" (default")[0].split(" (repeat")[0]
             for a in parser._actions if a.option_strings and a.option_strings[0] != "-h"}
    assert all(helps.values()), [flag for flag, text in helps.items() if not text]
    repeated = {t: [f for f, h in helps.items() if h == t] for t, n in collections.Counter(helps.values()).items()
                if n > 1}
    assert not repeated, repeated


@pytest.mark.parametrize("name", ["job", "serve"])
def test_the_task_flag_lists_its_choices(name):
    text = _parsers()[name].format_help()
    assert "{" + ",".join(TASKS) + "}" in text.replace("\n", "").replace(" ", "")
