"""Batch inference job: `ray job submit --working-dir . -- python jobs/batch_infer.py ...`
(or plain `python jobs/batch_infer.py ...`, which starts or joins a local Ray)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.job import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
