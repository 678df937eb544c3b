"""nanochat's pre-shuffled pretraining sets, served as parquet shards by the Hugging Face hub.

FineWeb-Edu (karpathy/fineweb-edu-100b-shuffle, 1,823 shards) and ClimbMix
(karpathy/climbmix-400b-shuffle, 6,543 shards) are published as <base_url>/shard_{index:05d}.parquet:
~250M characters each, one `text` column, row groups of 1024 documents, the last shard held out
for validation. Documents were shuffled before sharding, so the first N shards are a uniform
sample of the whole set and a run simply takes shards 0..num_shards-1.

On disk they use the common corpus layout, keeping their global names: train shards in
<data_dir>/train/, the validation shard in <data_dir>/val/. The shards are fetched by
nanochat.data.download, ahead of time from the command line or on start with download=true.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from nanochat.data.corpus import ParquetCorpus, shard_name, text_parquet_problem
from nanochat.errors import UserError


class HubShardCorpus(ParquetCorpus):
    """The first num_shards train shards of a hub dataset plus its validation shard.

    name is the dataset's config in conf/data/ (e.g. fineweb_edu), used in the command that a
    missing-shard error tells the user to run; without it the error names download_corpus().
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        base_url: str,
        num_shards: int,
        total_shards: int,
        val_shard: int,
        download: bool = False,
        name: str | None = None,
    ):
        super().__init__(data_dir)
        self.base_url = base_url
        self.num_shards = num_shards
        self.total_shards = total_shards
        self.val_shard = val_shard
        self.download = download
        self.name = name

    def files(self, split: str) -> list[Path]:
        """Exactly the shards this run uses, whatever else lies in the split's directory."""
        indices = range(self.num_shards) if split == "train" else [self.val_shard]
        return [self.split_dir(split) / shard_name(index) for index in indices]

    def fetch_advice(self) -> str:
        """How to fetch this run's shards: the command line, or the function outside Hydra."""
        if self.name is None:
            return f"fetch them with nanochat.data.download.download_corpus({self.base_url!r}, ...) or download=True"
        command = [
            "python", "-m", "nanochat.data.download",
            f"data={self.name}", f"data.num_shards={self.num_shards}", f"data.data_dir={self.data_dir}",
        ]  # fmt: skip
        return f"run: {shlex.join(command)}, or set data.download=true"

    def prepare(self) -> None:
        self._check_settings()
        needed = self.files("train") + self.files("val")
        problems = _shard_problems(needed)
        if problems and self.download:
            # Imported here: a run on shards already on disk never needs the HTTP client.
            from nanochat.data.download import download_corpus

            download_corpus(self.base_url, self.data_dir, self.num_shards, self.total_shards, self.val_shard)
            problems = _shard_problems(needed)
        missing = [path for path, problem in problems.items() if problem == _MISSING]
        if missing:
            raise UserError(
                f"{len(missing)} of the {len(needed)} shards this run needs are missing "
                f"(first: {missing[0]}); {self.fetch_advice()}."
            )
        if problems:
            path, problem = next(iter(problems.items()))
            advice = "check data.base_url" if self.download else f"delete it and {self.fetch_advice()}"
            raise UserError(f"Shard {path} {problem}; {advice}.")

    def _check_settings(self) -> None:
        for key in ("num_shards", "total_shards", "val_shard"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"data.{key}={value!r} must be an integer.")
        if not 0 <= self.val_shard < self.total_shards:
            raise UserError(
                f"data.val_shard={self.val_shard} is not a shard of the dataset "
                f"(data.total_shards={self.total_shards}: indices 0 to {self.total_shards - 1})."
            )
        # Train shards are taken from the front, so only those before the validation shard count
        # (all but the last one for the hub datasets, whose validation shard is the last).
        if not 1 <= self.num_shards <= self.val_shard:
            raise UserError(
                f"data.num_shards={self.num_shards} must be between 1 and {self.val_shard}, the number of train "
                f"shards in the dataset (data.total_shards={self.total_shards}, shard {self.val_shard} is validation)."
            )


_MISSING = "is missing"


def _shard_problems(paths: list[Path]) -> dict[Path, str]:
    """{path: what is wrong with it} for each shard that is missing or not a text parquet file."""
    problems = {}
    for path in paths:
        problem = text_parquet_problem(path) if path.exists() else _MISSING
        if problem:
            problems[path] = problem
    return problems
