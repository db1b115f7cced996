"""Server settings, from flags or ``CACHE_SERVER_*`` environment variables."""

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CACHE_SERVER_", frozen=True)

    store: str = Field("./store", description="Folder holding datasets, corpora and jobs; or an S3 URL "
                       "(s3://bucket/prefix, endpoint and credentials from AWS_* variables) for the datasets.")
    state_dir: Path = Field(Path("./cache-server-state"),
                            description="Corpora and jobs when the store is a bucket (a local folder).")
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = Field(None, pattern=r"^[!-~]*$", description=(
        "Bearer token required by mutating endpoints (visible ASCII: what an HTTP header carries)."))
    models_dir: Path | None = Field(None, description="Folder of local Hugging Face model folders.")
    corpora_dir: Path | None = Field(None, description="Folder of local Hugging Face datasets (save_to_disk "
                                     "folders, or folders of parquet / JSONL / arrow files), named by folder.")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1'...")
    max_corpus_bytes: int = Field(16 << 30, description="Largest corpus upload (streamed to disk; never held in memory).")
    corpus_check_bytes: int = Field(8 << 20, ge=0, description=(
        "Text a harvest submit may tokenise to check that its corpus holds the tokens asked for (a "
        "second or two); past it the job reads on, and fails saying so if the corpus runs out."))
    max_tokens: int = 2_000_000_000
    max_json_bytes: int = Field(1 << 20, gt=0, description="Largest JSON request body (a harvest request is a few KB).")
    min_free_bytes: int = Field(0, ge=0, description="Disk space a harvest must leave free on the store's "
                                "disk; one that would not is refused (507).")
    max_sae_bytes: int = Field(1024 * 1024 * 1024, description="Largest SAE file POST /v1/saes accepts.")
    chunk_bytes: int = Field(2 * 1024 * 1024, description="Target stored size of one chunk.")
    allow_hub: bool = Field(True, description="Let unknown model names load from the HF hub.")
    ray_address: str | None = Field(None, description=(
        "Run harvests on a Ray cluster: its address (``auto``: the cluster this machine belongs to; "
        "``host:6379``; ``local``: start a private one). Unset: harvests run in this process. The "
        "store, the corpora (and models_dir) must be where every node sees them, at the same paths."))
    ray_workers: int = Field(1, ge=1, description="Ray actors a harvest runs on, each holding the model once.")
    ray_worker_cpus: float = Field(1.0, gt=0, description=(
        "CPUs each Ray harvest actor reserves when the cluster has no GPUs (with GPUs: one GPU each)."))
    ray_idle_seconds: float = Field(300.0, ge=0, description=(
        "How long the Ray actors (and the cluster resources and models they hold) outlive the last harvest."))
    guide_dir: Path | None = Field(None, description=(
        "A built docs site (``mkdocs build``'s folder) to serve at /guide/; unset: the repository's "
        "site/ folder when it holds one."))

    def guide(self) -> Path | None:
        """The docs site to serve, if any."""
        folder = self.guide_dir or Path(__file__).resolve().parents[1] / "site"
        return folder if (folder / "index.html").is_file() else None

    @field_validator("token", "ray_address")
    @classmethod
    def _empty_means_none(cls, value: str | None) -> str | None:
        return value or None  # CACHE_SERVER_TOKEN="" (compose's default) means no token

    @property
    def store_is_bucket(self) -> bool:
        return self.store.startswith("s3://")

    @property
    def local_root(self) -> Path:
        """Where corpora and jobs live: the store folder, or ``state_dir`` beside a bucket."""
        return self.state_dir if self.store_is_bucket else Path(self.store)
