"""The models of one artifact version, written and loaded as `service.artifacts` lays out."""

from dataclasses import dataclass, field, replace
from pathlib import Path

from safetensors.torch import load_file as load_tensors
from safetensors.torch import save_file as save_tensors
from torch import nn

from service.artifacts import (
    FORMAT,
    RankerVariantChoice,
    ranker_variant_figures,
    ranker_variant_serves,
    read_manifest,
    resolve_version,
    write_version,
)
from service.data.feature_space import FeatureSpace
from service.data.histories import UserHistories
from service.embeddings.store import TableConfig
from service.embeddings.tables import table_configs
from service.ranking.compression import CompressionPlan, compressed_shape
from service.ranking.models import RankerVariant, build_ranker, ranker_name, trained_variant
from service.retrieval.index import Device, ItemIndex, SearchParams
from service.retrieval.index_versions import load_index_version, newest_index_file
from service.retrieval.item_to_item import ItemNeighbours
from service.retrieval.knn_embed import ItemClusters, KnnEmbedConfig, UserMixtures
from service.retrieval.popular import PopularItems, version_namespace
from service.retrieval.two_tower import TwoTower, TwoTowerConfig


@dataclass(frozen=True)
class RankingParts:
    """What ranking needs from an artifact version: the feature map and the ranker (with the
    retrieval-score scale its training used); no index, histories or retrieval models."""

    version: str
    features: FeatureSpace
    ranker: nn.Module
    ranker_variant: str
    score_scale: float  # 1 / the two-tower temperature: retrieval cosines as the ranker saw them
    figures: dict[str, str] = field(default_factory=dict)  # `ranker_variant_figures`

    @classmethod
    def load(
        cls, path: str | Path, ranker_variant: RankerVariantChoice | str | None = None
    ) -> "RankingParts":
        """From the newest version under `path` (or `path` itself), the named ranker variant
        (None: as trained); the ranking tier loads only this."""
        folder = resolve_version(path)
        manifest = read_manifest(folder, path)
        ranker, variant = load_ranker(folder, manifest, ranker_variant)
        temperature = TwoTowerConfig(**manifest["models"]["two_tower"]).temperature
        return cls(
            manifest["version"],
            FeatureSpace.load(folder),
            ranker.eval(),
            variant,
            1.0 / temperature,
            ranker_variant_figures(manifest, variant),
        )


@dataclass
class ModelBundle:
    """Everything the serving pipeline needs from one artifact version."""

    version: str
    features: FeatureSpace
    two_tower: TwoTower
    index: ItemIndex
    ranker: nn.Module  # DeepFM or DCN-v2: the variant that serves
    histories: UserHistories
    clusters: ItemClusters  # kNN-Embed: item clusters, the interests
    mixtures: UserMixtures  # kNN-Embed: the artifact's users' interests
    popular: PopularItems  # cold users' candidates and the fill of a small catalogue
    manifest: dict
    neighbours: ItemNeighbours | None = None  # the item-to-item source
    folder: Path | None = None  # the version folder it was loaded from
    index_version: str = "artifact"  # which index: the artifact's own, or a rebuilt one (indexes/)
    ranker_variant: str = "full"  # full or factorised (as trained), output_features or weight_svd
    compressed_rankers: dict[str, RankerVariant] = field(
        default_factory=dict
    )  # to save beside the ranker

    @property
    def knn_embed_config(self) -> KnnEmbedConfig:
        return KnnEmbedConfig(**self.manifest["models"]["knn_embed"])

    @property
    def namespace(self) -> str:
        return version_namespace(self.version)

    def tables(self, ttl_seconds: float | None = None) -> list[TableConfig]:
        """The embedding tables its models read, sized for this artifact."""
        return table_configs(self.two_tower.config.id_dim, self.clusters.n_clusters, ttl_seconds)

    @property
    def ranking_parts(self) -> RankingParts:
        return RankingParts(
            self.version,
            self.features,
            self.ranker,
            self.ranker_variant,
            1.0 / self.two_tower.config.temperature,
            ranker_variant_figures(self.manifest, self.ranker_variant),
        )

    def save(
        self,
        root: str | Path,
        config: dict,
        schema: dict,
        metrics: dict,
        validation: dict | None = None,
    ) -> Path:
        def write(folder: Path) -> dict:
            self.features.save(folder)
            save_tensors(
                {k: v.contiguous() for k, v in self.two_tower.state_dict().items()},
                folder / "two_tower.safetensors",
            )
            save_tensors(
                {k: v.contiguous() for k, v in self.ranker.state_dict().items()},
                folder / "ranker.safetensors",
            )
            variants = {}
            for method, variant in self.compressed_rankers.items():
                file = f"ranker.{method}.safetensors"
                save_tensors(
                    {k: v.contiguous() for k, v in variant.model.state_dict().items()},
                    folder / file,
                )
                variants[method] = {"file": file, **variant.plan.to_json()}
            self.index.save(folder / "items.faiss")
            self.histories.save(folder / "histories.safetensors")
            self.clusters.save(folder / "clusters.faiss")
            self.mixtures.save(folder / "interests.safetensors")
            self.popular.save(folder)
            if self.neighbours is not None:
                self.neighbours.save(folder)
            return {
                "config": config,
                "models": {
                    "two_tower": self.two_tower.config.__dict__,
                    "ranker": {
                        "type": ranker_name(self.ranker),
                        **self.ranker.config.__dict__,
                        "variants": variants,
                    },
                    "knn_embed": {
                        **config.get("knn_embed", {}),
                        "clusters": self.clusters.n_clusters,
                    },
                },
                "data_schema": schema,
                "metrics": metrics,
                **({"validation": validation} if validation is not None else {}),
            }

        final, manifest = write_version(root, FORMAT, write)
        self.version, self.manifest, self.folder = manifest["version"], manifest, final
        self.popular = replace(self.popular, version=self.version)
        return final

    @classmethod
    def load(
        cls,
        path: str | Path,
        root: str | Path | None = None,
        index_params: SearchParams = SearchParams(),
        index_device: Device = "cpu",
        ranker_variant: RankerVariantChoice | str | None = None,
    ) -> "ModelBundle":
        """The newest version under `path` (or `path` itself), serving its newest index version
        and the named ranker variant (None: the ranker as trained; "auto": `load_ranker`)."""
        folder = resolve_version(path)
        manifest = read_manifest(folder, root if root is not None else path)
        features = FeatureSpace.load(folder)
        two_tower_config = TwoTowerConfig(**manifest["models"]["two_tower"])
        two_tower = TwoTower(
            two_tower_config, features.users.size, features.items.size, features.attribute_size
        )
        two_tower.load_state_dict(load_tensors(folder / "two_tower.safetensors"))
        ranker, variant = load_ranker(folder, manifest, ranker_variant)
        index_file, index_version = newest_index_file(folder)
        if index_version == "artifact":
            index = ItemIndex.load(index_file, index_params, index_device)
        else:
            index = load_index_version(index_file.parent, index_params, index_device)
        return cls(
            version=manifest["version"],
            features=features,
            two_tower=two_tower.eval(),
            index=index,
            ranker=ranker.eval(),
            histories=UserHistories.load(folder / "histories.safetensors"),
            clusters=ItemClusters.load(folder / "clusters.faiss"),
            mixtures=UserMixtures.load(folder / "interests.safetensors"),
            popular=PopularItems.from_folder(folder, manifest["version"]),
            manifest=manifest,
            neighbours=ItemNeighbours.from_folder(folder),
            folder=folder,
            index_version=index_version,
            ranker_variant=variant,
        )


def load_ranker(
    folder: Path, manifest: dict, choice: RankerVariantChoice | str | None
) -> tuple[nn.Module, str]:
    """The ranker as trained (`choice` None, "trained" or the trained variant's own name), a
    compressed variant rebuilt in the shape its plan records, or under "auto" the one
    `service.artifacts.ranker_variant_serves` picks."""
    variant = None if choice is None else ranker_variant_serves(manifest, choice)
    config = dict(manifest["models"]["ranker"])
    name, stored = config.pop("type"), config.pop("variants", {})
    model = build_ranker(name, config)
    trained = trained_variant(config.get("rank"))
    if variant is None or variant == trained:
        model.load_state_dict(load_tensors(folder / "ranker.safetensors"))
        return model, trained
    if variant not in stored:
        raise ValueError(
            f"artifact {manifest['version']} has no ranker variant {variant!r}; it has {[trained, *stored]}"
            " (compressed variants are made from full-table rankers: train without --ranker-rank)"
        )
    model = compressed_shape(model, CompressionPlan.from_json(stored[variant]))
    model.load_state_dict(load_tensors(folder / stored[variant]["file"]))
    return model, variant
