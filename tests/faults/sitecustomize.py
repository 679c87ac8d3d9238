"""Test-only fault injection, loaded by Python at start-up in every process of a job that
tests/test_faults.py starts with this folder on PYTHONPATH.

SWITCHYARD_TEST_DIE_AT_LENGTH=N: a model call whose inputs are N tokens long ends its
process at once (exit 137, as the OOM killer or a native crash would), every time.
"""

import os

_LENGTH = os.environ.get("SWITCHYARD_TEST_DIE_AT_LENGTH")

if _LENGTH:
    import torch

    _embedding_forward = torch.nn.Embedding.forward

    def _forward(self, input):  # noqa: A002 - torch's own parameter name
        if input.dim() == 2 and input.shape[1] == int(_LENGTH):
            os._exit(137)
        return _embedding_forward(self, input)

    torch.nn.Embedding.forward = _forward
