"""Infer stage: `actors.Predictor` as a callable class in a Ray Data actor pool."""

from __future__ import annotations

from pipeline.config import JobConfig


def infer(dataset, config: JobConfig):
    """Map every batch through a pool of `config.concurrency` Predictor actors."""
    import ray

    from actors.predictor import Predictor

    return dataset.map_batches(
        Predictor,
        fn_constructor_kwargs=config.predictor_kwargs(),
        compute=ray.data.ActorPoolStrategy(size=config.concurrency),
        batch_size=config.batch_size,
        batch_format="pyarrow",
        num_cpus=config.actor_cpus,
        num_gpus=config.num_gpus,
    )
