"""Online server: `python jobs/serve.py --model DIR --adapters DIR --task TASK [--host H] [--port P]`
plus the model options (`--device`, `--dtype`, `--max-loaded-adapters`, ...) and the serving
options (`--max-batch-size`, `--num-replicas`, ...); `--help` lists them. Starts a local Ray
(or joins RAY_ADDRESS's), prints the URL once the endpoint answers, blocks until Ctrl-C."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.serve.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
