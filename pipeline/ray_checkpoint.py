"""Ray Data's checkpoint manager as the job uses it (imported only once Ray runs)."""

from __future__ import annotations

from ray.data.checkpoint.checkpoint_filter import IdColumnCheckpointManager


class SwitchyardCheckpointManager(IdColumnCheckpointManager):
    """Ray Data's checkpoint manager without its id filter: `pipeline.resume.load_done` has
    already recovered the staging folder (deleting what uncommitted write tasks wrote), and
    `pipeline.resume.filter_done` filters by (id, adapter), which keeps fan-out rows whole."""

    def load_checkpoint(self, data_file_dir=None, data_file_filesystem=None):
        """No filter operator in the plan: (None, 0) as when there is nothing to restore."""
        return None, 0
