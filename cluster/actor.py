"""The render actor: the plain worker class as a Ray actor that can say where Ray placed it."""

from __future__ import annotations

import ray

from rendering.worker import ShardRenderer


class PlacedRenderer(ShardRenderer):
    """A ShardRenderer that can say where Ray placed it, so placement can be logged, checked and
    recorded with every row it renders."""

    def placement(self) -> dict:
        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(i) for i in context.get_accelerator_ids().get("GPU", [])]}

    def setup(self) -> dict:
        return {**super().setup(), **self.placement()}


# The one place the plain worker class becomes an actor. Two concurrent calls let the next shard
# render while the previous one finishes encoding and uploading; the worker's render lock keeps
# the GPU to one batch at a time. Ray must not restart it behind our back: the pool replaces it.
ACTOR_OPTIONS = dict(max_restarts=0, max_task_retries=0, max_concurrency=2)
RenderActor = ray.remote(**ACTOR_OPTIONS)(PlacedRenderer)
