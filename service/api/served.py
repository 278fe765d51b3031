"""What a serving process answers with, once loaded. Every transport (HTTP routes, gRPC
servicers) reads it on each call; a part still None is not loaded yet (503 / UNAVAILABLE)."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.online.parts import OnlineLearning
from service.pipeline.interface import Pipeline

if TYPE_CHECKING:  # model-side types: a gateway process never imports them
    from service.api.admin import IndexAdmin
    from service.online.trainer import OnlineTrainer
    from service.pipeline.in_process import RankingStage, RecommendPipeline


@dataclass
class Served:
    pipeline: "Pipeline | RecommendPipeline | None" = (
        None  # the embedded service, the gateway, the retrieval tier
    )
    online: OnlineLearning | None = None  # events in; recent items, update feed, background threads
    admin: "IndexAdmin | None" = (
        None  # the Admin calls (embedded service and retrieval tier, with a token)
    )
    ranking: "RankingStage | None" = None  # the ranking tier
    trainer: "OnlineTrainer | None" = None  # `recsys serve online-train`
    closers: list[Callable[[], None]] = field(default_factory=list)  # what else to close, last

    def close(self) -> None:
        """Background threads first (they use the connections), then the connections."""
        if self.online is not None:
            self.online.stop()
        if self.pipeline is not None:
            self.pipeline.close()
        for close in self.closers:
            close()
