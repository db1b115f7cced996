"""Pydantic models of the HTTP API and of a dataset manifest: the API's documentation.

The server validates requests with these and the trainer parses responses with them, so the two
sides cannot drift apart.
"""

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Dtype = Literal["float16", "bfloat16", "float32"]
Packing = Literal["concatenate", "document"]
JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
ACTIVE_STATUSES: frozenset[str] = frozenset({"queued", "running"})

_HOOK_NAME = r"^[A-Za-z0-9_.]{1,200}$"


class HookSpec(BaseModel):
    """One hook to harvest and how to reshape it to ``[item, neuron]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=_HOOK_NAME, examples=["blocks.0.hook_resid_post"])]
    concat_dims: Annotated[int, Field(ge=1, le=4, strict=True)] = Field(
        1,
        description="1: keep the last axis as neurons (reshape_to_last_dimension); "
        "n>1: concatenate the last n axes, e.g. 2 for the heads of attn.hook_z "
        "(reshape_concat_last_dimensions).",
    )


_DATASET_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(/[A-Za-z0-9][A-Za-z0-9._-]{0,99})?$"


class HFDataset(BaseModel):
    """A Hugging Face dataset, as SAELens' ``dataset_path`` names one."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(pattern=_DATASET_NAME, description=(
        "A folder in the server's --corpora-dir (save_to_disk output, or parquet / JSONL / arrow files), "
        "or a dataset on the hub ('org/name'). A name, never a path."))
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,100}$", description="The dataset's configuration.")
    split: str = Field("train", pattern=r"^[A-Za-z0-9._-]{1,100}$")
    column: str = Field("text", pattern=r"^[A-Za-z0-9._-]{1,100}$", description=(
        "Text, or token ids (a list of ints a row, as SAELens' pretokenize runner writes: used as they are)."))
    revision: str | None = Field(None, pattern=r"^[A-Za-z0-9._/-]{1,100}$", description="Hub datasets: a branch, tag or commit.")


class DatasetRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hf: HFDataset


class HarvestRequest(BaseModel):
    """What to harvest. Everything here but ``batch_size`` is part of the dataset's identity."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=200, examples=["all-MiniLM-L6-v2"])]
    hooks: Annotated[list[HookSpec], Field(min_length=1, max_length=64)] = Field(
        description='Hook names, or {"name", "concat_dims"} objects.',
        examples=[["blocks.0.hook_resid_post", {"name": "blocks.0.attn.hook_z", "concat_dims": 2}]],
    )
    corpus: Annotated[str, Field(min_length=1, max_length=100)] | DatasetRef = Field(
        "default", description="A corpus_id or name from GET /v1/corpora, 'default' (built-in), or "
        '{"hf": {...}}: a Hugging Face dataset (a folder in the server\'s --corpora-dir, or the hub).'
    )
    # strict: true is not 1 and "yes" is not true
    n_tokens: Annotated[int, Field(gt=0, strict=True, description="Rows to store (one per token).")]
    context_size: Annotated[int, Field(ge=2, le=1_000_000, strict=True)] = 128
    dtype: Dtype = "float16"
    batch_size: Annotated[int, Field(ge=1, le=4096, strict=True)] = 16
    prepend_bos: bool | None = Field(None, strict=True, description=(
        "Start every sequence with the BOS/CLS token. Unset: yes for text, no for a pre-tokenized corpus "
        "(its ids are used as they are)."))
    packing: Packing = Field("concatenate", description=(
        "How documents fill context windows. 'concatenate': back to back, the model's separator (EOS/SEP) "
        "between them, every window full (the field's usual choice). 'document': a window holds one "
        "document only, a long one going on in the next windows; padding is masked in the forward pass "
        "and stores no rows."))

    @field_validator("hooks", mode="before")
    @classmethod
    def _names_are_specs(cls, hooks: object) -> object:
        if isinstance(hooks, list):
            return [{"name": h} if isinstance(h, str) else h for h in hooks]
        return hooks

    @field_validator("hooks")
    @classmethod
    def _unique_hooks(cls, hooks: list[HookSpec]) -> list[HookSpec]:
        if len({h.name for h in hooks}) != len(hooks):
            raise ValueError("hooks must be distinct")
        return hooks

    def hook_specs(self) -> list[HookSpec]:
        """Hooks sorted by name: hook order does not change the dataset."""
        return sorted(self.hooks, key=lambda s: s.name)


class HarvestAccepted(BaseModel):
    job_id: str | None = Field(description="None when the dataset was already complete.")
    dataset_id: str
    status: JobStatus


class HarvestJob(BaseModel):
    """A harvest job and its progress."""

    job_id: str
    dataset_id: str
    status: JobStatus
    request: HarvestRequest
    tokens_done: int = 0
    tokens_total: int
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    error: str | None = None
    created_at: datetime
    updated_at: datetime


class CorpusInfo(BaseModel):
    corpus_id: str
    name: str
    format: Literal["text", "jsonl", "npy", "dataset"] = Field(description=(
        "text: one document; jsonl: a {\"text\": ...} document a line; npy: token ids, pre-tokenized "
        "(a 1-D or 2-D int32/int64 array, used as it is); dataset: a Hugging Face dataset's column, a "
        "document (or a row of ids) a row."))
    n_bytes: int
    builtin: bool = False
    n_tokens: int | None = Field(None, description="Pre-tokenized corpora: how many ids.")
    max_token_id: int | None = Field(None, description="Pre-tokenized corpora: the largest id (checked against "
                                     "a model's vocabulary when a harvest asks for it).")
    @property
    def pretokenized(self) -> bool:
        """Its tokens are ids to use as they are (an .npy, or a dataset column of id lists)."""
        return self.format == "npy" or bool(self.source and self.source.get("ids"))

    source: dict | None = Field(None, description="Datasets: where it is read from (kind, path, name, split, "
                                "column, revision) and the fingerprint its id covers (the resolved commit, or "
                                "the files' hash).")


class HookStats(BaseModel):
    """Running statistics of one hook's rows, over every committed row (the mean vector, d floats,
    is at ``GET /v1/datasets/{id}/hooks/{hook}/mean``: it would make the manifest kilobytes long)."""

    count: int = 0
    mean_norm: float = 0.0
    mean_squared_norm: float = 0.0


class CodecInfo(BaseModel):
    """How one array's chunks are stored. Activations are stored raw (``none``): float16 rows
    compress 1.00x with zstd's fast mode and 1.08x at level 1, so a codec would only cost the
    reader a decode pass; raw chunks go from the socket straight into the loader's buffer. The
    tokens array (small integers) is zstd in its fast mode, which any level decodes with the same
    call."""

    name: Literal["none", "zstd"] = "zstd"
    level: int = -1
    endian: Literal["little"] = "little"


class ArrayInfo(BaseModel):
    """One stored array: ``[n_items, d]``, chunked along rows only."""

    name: str = Field(description="Zarr array name inside the dataset group.")
    d: int
    storage_dtype: str = Field(description="Dtype of the stored bytes (uint16 holds bfloat16 bits).")
    logical_dtype: str
    codec: CodecInfo = Field(default_factory=CodecInfo)


class HookInfo(ArrayInfo):
    concat_dims: int = 1
    stats: HookStats = Field(default_factory=HookStats)


class ModelInfo(BaseModel):
    name: str
    fingerprint: str = Field(description="Weights/revision hash: part of the dataset id.")
    n_layers: int
    d_model: int
    n_ctx: int


class ModelList(BaseModel):
    """``GET /v1/models``: what a harvest may name without asking a hub."""

    builtin: list[str] = Field(description="Built into the server (MiniLM under each of its names).")
    models_dir: list[str] = Field(description="Folders in the server's --models-dir (Hugging Face layout).")
    loaded: list[ModelInfo] = Field(description="Loaded now (the most recently used are kept).")
    hub: bool = Field(description="Whether other names are looked up on the Hugging Face hub.")


class DatasetManifest(BaseModel):
    """Everything a reader needs to stream a dataset: shapes, codec, progress, statistics."""

    dataset_id: str
    model: ModelInfo
    corpus_id: str
    context_size: int
    prepend_bos: bool
    packing: Packing = "concatenate"
    dtype: Dtype
    hooks: list[HookInfo]
    tokens: ArrayInfo = Field(
        description="int32 [n_items, 3]: token id, sequence index, position in the sequence."
    )
    chunk_rows: int
    n_items_total: int
    n_items: int = Field(description="Committed rows: readers never see rows past this.")
    n_chunks_total: int
    n_chunks: int = Field(description="Committed chunks.")
    complete: bool
    missing_files: list[str] = Field(default_factory=list, description=(
        "Files of committed chunks, or array metadata, not in the store (the first 100): a damaged "
        "dataset, reported not complete; submitting its harvest again re-harvests them."))
    batch_size: int
    created_at: datetime
    store_url: str | None = Field(None, description="The dataset's Zarr group in an S3 bucket "
                                  "(s3://bucket/prefix/<id>), when it is in one: trainers with read "
                                  "credentials may read chunks from there instead of through the server.")

    def hook(self, name: str) -> HookInfo | None:
        return next((h for h in self.hooks if h.name == name), None)

    def rows_in_chunk(self, index: int) -> int:
        return min(self.chunk_rows, self.n_items_total - index * self.chunk_rows)


class DatasetSummary(BaseModel):
    dataset_id: str
    model: str
    hooks: list[str]
    d: dict[str, int] = Field(default_factory=dict, description="Each hook's row width.")
    n_items: int
    n_items_total: int
    complete: bool


DENSE_DENSITY = 0.1
"""A latent is dense when it fires on more than this share of rows: one definition for the
trainer's eval.json, its table and the feature browser."""


class ErrorBody(BaseModel):
    detail: str


class SkippedFile(BaseModel):
    """A stored file the server could not read at start (or later), so left out of what it serves."""

    path: str = Field(description="Where it was, relative to the store's folder (or a dataset id).")
    kind: str = Field(description="What it held: harvest-job, evaluation, feature-job, feature-stats, sae, "
                      "corpus or dataset.")
    reason: str
    moved_to: str | None = Field(None, description="Where it lies now (under quarantine/); None: left in place.")


class Health(BaseModel):
    status: Literal["ok"]
    skipped: list[SkippedFile] = Field(description="Stored files the server could not read and left out.")


# -- SAEs and their downstream evaluation -----------------------------------------------------

class SaeInfo(BaseModel):
    """An SAE registered with the server (``POST /v1/saes``), bound to the dataset and hook it
    was trained on. Its id is a hash of its file, dataset and hook: registering it twice is one."""

    sae_id: str
    dataset_id: str
    hook: str
    architecture: Literal["standard", "topk", "jumprelu", "transcoder", "skip_transcoder", "jumprelu_transcoder",
                          "jumprelu_skip_transcoder", "clt"]
    d_in: int
    d_sae: int = Field(description="Features (a CLT's: every layer's latents, layer by layer).")
    k: int | None = None
    n_bytes: int
    name: str | None = Field(None, description="What its trainer calls it (sae-train: its folder's name).")
    hook_out: str | None = Field(None, description="A transcoder's target hook (it reads `hook`, predicts this one).")
    hooks_in: list[str] | None = Field(None, description="A CLT's input hooks, in layer order (`hook` is the first).")
    hooks_out: list[str] | None = Field(None, description="A CLT's output hooks: layer l's latents write to l and later.")

    def input_hooks(self) -> list[str]:
        return self.hooks_in or [self.hook]

    def output_hooks(self) -> list[str]:
        """The hooks it predicts: none for an SAE (it reconstructs its input)."""
        return self.hooks_out or ([self.hook_out] if self.hook_out else [])

    def label(self) -> str:
        """The architecture as people name it, with its k."""
        kind = {"standard": "ReLU", "topk": "TopK", "jumprelu": "JumpReLU", "transcoder": "ReLU transcoder",
                "skip_transcoder": "ReLU skip transcoder", "jumprelu_transcoder": "JumpReLU transcoder",
                "jumprelu_skip_transcoder": "JumpReLU skip transcoder", "clt": "TopK CLT"}[self.architecture]
        if self.k and self.hook_out:  # a TopK transcoder, stored as a JumpReLU one for SAELens
            kind = kind.replace("JumpReLU", "TopK")
        if self.architecture == "clt" and not self.k:
            kind = "JumpReLU CLT"
        return f"{kind} k={self.k}" if self.k else kind


class EvaluationRequest(BaseModel):
    """Splice a registered SAE into the dataset's model at its hook and measure what survives."""

    model_config = ConfigDict(extra="forbid")

    sae_id: Annotated[str, Field(min_length=1, max_length=100)]
    n_tokens: Annotated[int, Field(ge=2, le=10_000_000, strict=True)] = Field(
        16_384, description="Held-out tokens to evaluate on (whole windows of the dataset's context size).")
    corpus: Annotated[str | None, Field(min_length=1, max_length=100)] = Field(
        None, description="A corpus_id (or 'default') to take the text from, from its start. None: the "
        "dataset's own corpus after the last token the harvest read (text the SAE never saw).")
    batch_size: Annotated[int, Field(ge=1, le=1024, strict=True)] = Field(16, description=(
        "Windows per forward pass; fewer where their logits would pass 2^24 floats (the server's memory "
        "is bounded whatever is asked). The figures do not depend on it."))


class DownstreamMetrics(BaseModel):
    """SAELens' ``evals.py`` definitions: next-token cross-entropy (nats, mean over predicted
    positions) clean, with the SAE's reconstruction in place of the hook's output, and with the
    hook zero-ablated and mean-ablated; ``ce_loss_score`` = (CE_zero - CE_sae) / (CE_zero - CE_clean);
    KL(clean || spliced) of the next-token distributions, mean over positions, and
    ``kl_div_score`` = (KL_zero - KL_sae) / KL_zero. BOS positions are left alone and not counted."""

    ce_loss_without_sae: float
    ce_loss_with_sae: float
    ce_loss_with_ablation: float
    ce_loss_with_mean_ablation: float
    ce_loss_score: float | None = Field(description="None when ablating changes nothing.")
    ce_loss_score_mean_ablation: float | None
    kl_div_with_sae: float
    kl_div_with_ablation: float
    kl_div_with_mean_ablation: float
    kl_div_score: float | None


class EvaluationResult(BaseModel):
    n_tokens: int = Field(description="Positions the SAE replaced (BOS positions excluded).")
    corpus_id: str
    first_token: int = Field(description="Where in the corpus' token stream the evaluated text starts.")
    l0: float = Field(description="Mean active latents per token.")
    explained_variance: float | None = Field(description="1 - sum|x - x_hat|^2 / sum|x - mean x|^2 on these tokens.")
    l2_ratio: float = Field(description="Mean of |x_hat| / |x|.")
    downstream: DownstreamMetrics | None = Field(
        None, description="None when the model is not a causal LM (its LM loss would measure nothing).")
    downstream_unavailable: str | None = Field(None, description="Why downstream is None.")
    layers: list[DownstreamMetrics] | None = Field(None, description=(
        "A CLT's figures with one layer's output replaced at a time (the others clean), in layer order; "
        "`downstream` replaces every layer's at once (the replacement model)."))


class EvaluationJob(BaseModel):
    evaluation_id: str
    status: JobStatus
    request: EvaluationRequest
    dataset_id: str
    tokens_done: int = 0
    tokens_total: int
    result: EvaluationResult | None = None
    error: str | None = None
    created_at: datetime
    updated_at: datetime


class FeatureJob(BaseModel):
    """Computing an SAE's feature statistics (for the feature browser) over its dataset's rows."""

    sae_id: str
    status: JobStatus
    n_rows: int = Field(description="Rows the statistics cover: those of chunk_ids, or the dataset's first "
                        "max_rows.")
    chunk_ids: list[int] | None = Field(None, description="The dataset's chunks the statistics cover (e.g. "
                                        "the trainer's held-out ones); None: its first rows.")
    rows_done: int = Field(0, description="Rows read so far, over both passes (2 x n_rows in all).")
    error: str | None = None
    created_at: datetime
    updated_at: datetime


class FeatureExample(BaseModel):
    row: int = Field(description="The activating row (token) of the dataset.")
    value: float
    tokens: list[str] = Field(description="The tokens around it, in its sequence (as the vocabulary spells them).")
    values: list[float] = Field(description="The feature's activation on each of those tokens.")
    position: int = Field(description="Where the activating token is in ``tokens``.")


class FeatureDetail(BaseModel):
    """What one feature does, over the rows its statistics cover."""

    sae_id: str
    index: int
    n_rows: int
    density: float = Field(description="Fraction of rows on which it fires.")
    max_value: float
    mean_value: float = Field(description="Mean activation where it fires.")
    histogram_edges: list[float] = Field(description="Bin edges over [0, max_value].")
    histogram_counts: list[int]
    top: list[FeatureExample] = Field(description="Strongest activations, descending.")
    intervals: list[list[FeatureExample]] = Field(description="Rows sampled from each equal interval of "
                                                  "[0, max_value], lowest first.")
    neighbours: list[tuple[int, float]] = Field(description="Features of most similar decoder direction: (index, cosine).")
    dead_neighbours: list[int] = Field([], description="Those of the neighbours that never fire on these rows.")
    promoted: list[tuple[str, float]] = Field(default_factory=list, description="Logit lens: the tokens its decoder direction most "
                                              "raises through the unembedding (token, logit).")
    suppressed: list[tuple[str, float]] = Field(default_factory=list, description="Logit lens: the tokens it most lowers.")
    logit_lens_note: str | None = Field(None, description="Why there is no logit lens (an encoder, a hook "
                                        "off the residual stream).")


class FeatureRow(BaseModel):
    index: int
    density: float
    max_value: float
    mean_value: float
    top_tokens: list[str] = Field(description="The commonest activating tokens of its top examples, commonest first.")


class FeatureList(BaseModel):
    """A page of an SAE's features, filtered by a search over their top tokens and sorted."""

    sae_id: str
    total: int = Field(description="Features that match, over all pages.")
    offset: int
    features: list[FeatureRow]


class SaeSummary(BaseModel):
    """An SAE over the rows its feature statistics cover."""

    sae: SaeInfo
    n_rows: int
    chunk_ids: list[int] | None
    l0: float = Field(description="Mean active latents per row.")
    fvu: float = Field(description="sum |x - x_hat|^2 / sum |x - mean x|^2 over those rows.")
    dead: int = Field(description="Features that never fire on those rows.")
    dense: int = Field(description="Features that fire on more than a tenth of them.")
    density_edges: list[float] = Field(description="log10 density bin edges of the histogram (live features).")
    density_counts: list[int]
    evaluation: EvaluationResult | None = Field(None, description="The SAE's latest completed evaluation "
                                                "(downstream loss), if one was asked for.")


# -- custom text through an SAE (the browser's forms and their JSON) ------------------------------
MAX_TEXT_CHARS = 8000
"""Characters of a custom text; its tokens are bounded by the dataset's context size too (the
positions the SAE was trained on)."""
MAX_NEW_TOKENS = 64
MAX_STRENGTH = 1000.0


class TextInput(BaseModel):
    """Text the server tokenizes as the SAE's dataset did (BOS first where the dataset's windows
    have it), or token ids taken as they are."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS)
    token_ids: list[Annotated[int, Field(strict=True)]] | None = Field(None, min_length=1, max_length=4096,
                                        description="Token ids instead of text (BOS included where wanted).")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("give exactly one of text and token_ids")
        return self


class ActivationsRequest(TextInput):
    feature: int | None = Field(None, ge=0, strict=True, description="Also every token's activation of this feature.")
    top: int = Field(5, ge=1, le=100, strict=True, description="Features listed per token, strongest first.")


class ActiveFeature(BaseModel):
    feature: int
    activation: float


class TokenFeatures(BaseModel):
    position: int
    token: str = Field(description="As the vocabulary spells it.")
    token_id: int
    features: list[ActiveFeature] = Field(description="The active features, strongest first.")


class TextActivations(BaseModel):
    sae_id: str
    tokens: list[TokenFeatures]
    feature: int | None = None
    values: list[float] | None = Field(None, description="The asked feature's activation on each token.")
    feature_max: float | None = Field(None, description="That feature's maximum over the SAE's feature statistics "
                                      "(the pages shade by it), when they are computed.")


class RowFeatures(BaseModel):
    """The features active on one stored row (token) of the SAE's dataset."""

    sae_id: str
    row: int
    tokens: list[str] = Field(description="The row's token with its context, in its sequence.")
    position: int = Field(description="Where the row's token is in ``tokens``.")
    features: list[ActiveFeature] = Field(description="The active features, strongest first.")


class SteerRequest(BaseModel):
    """Generate from a prompt with one feature pushed at the SAE's hook (every position but BOS)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    feature: int = Field(ge=0, strict=True)
    strength: float = Field(10.0, ge=-MAX_STRENGTH, le=MAX_STRENGTH, strict=True, description=(
        "`add`: the feature's decoder row times this is added at every position; `clamp`: the "
        "feature's activation is set to this (its decoder row times the difference is added)."))
    mode: Literal["add", "clamp"] = "add"
    max_new_tokens: int = Field(20, ge=1, le=MAX_NEW_TOKENS, strict=True)
    temperature: float = Field(0.0, ge=0.0, le=2.0, strict=True, description="0: greedy, so the difference is the feature's.")
    seed: int = Field(0, ge=0, le=2**31 - 1, strict=True, description="Both continuations sample with this seed.")


class Continuation(BaseModel):
    text: str
    tokens: list[str]
    token_ids: list[int]


class Steering(BaseModel):
    sae_id: str
    request: SteerRequest
    prompt_tokens: list[str]
    unsteered: Continuation
    steered: Continuation
    first_difference: int | None = Field(description="The first generated position where the two differ (None: nowhere).")


class AttributionRequest(TextInput):
    position: int | None = Field(None, ge=0, strict=True, description=(
        "The position whose next-token loss is explained (it predicts the token at position + 1); "
        "default: the one before the last token."))
    top: int = Field(20, ge=1, le=500, strict=True)


class FeatureAttribution(BaseModel):
    feature: int
    attribution: float = Field(description="Its activation times the loss's gradient, summed over positions: "
                               "positive raises the loss (works against the prediction).")
    activation: float = Field(description="Its activation at the explained position.")
    strongest_position: int = Field(description="The position of its largest contribution.")


class Attribution(BaseModel):
    """Each active feature's linear effect on the next-token loss at one position, with the SAE's
    error term kept so the forward pass is the model's own (SAELens' tutorials' recipe)."""

    sae_id: str
    tokens: list[str]
    position: int
    target: str = Field(description="The token predicted (at position + 1).")
    loss: float = Field(description="-log p(target) at the position.")
    total: float = Field(description="The sum of every feature's attribution.")
    features: list[FeatureAttribution] = Field(description="The largest by absolute attribution.")
