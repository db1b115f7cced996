"""Text a researcher chooses, through a registered SAE, transcoder or CLT: what fires on it, the
features of one stored token, steering a feature, and which features a prediction rests on.

Text is tokenized as the SAE's dataset was (BOS first where its windows have it) and may be no
longer than the dataset's windows, the positions the SAE was trained on. BOS and the separator
are left alone, as the downstream evaluation leaves them: never encoded, steered or attributed.

A feature's writes: an SAE's and a transcoder's decoder row at the hook it writes (its own hook,
or the target); a CLT latent of layer ``l`` writes its decoder block to every output ``j >= l``.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import zarr

from cache_server.saes.downstream import not_causal_reason
from cache_server.errors import ServiceError
from cache_server.saes.features import AFTER, BEFORE, FeatureJobs, _side_by_side, _spell
from cache_server.models import ModelRegistry, SourceModel
from cache_server.saes.registry import CltWeights, SaeStore, SaeWeights
from cache_server.store.dataset_store import TOKENS_ARRAY, DatasetStore
from shared.reshape import reshape_hook
from shared.schemas import (ActivationsRequest, ActiveFeature, Attribution, AttributionRequest, Continuation, DatasetManifest,
                            FeatureAttribution, HookSpec, RowFeatures, SaeInfo, Steering, SteerRequest, TextActivations,
                            TextInput, TokenFeatures)


class ProbeError(ServiceError):
    pass


@dataclass
class _Text:
    """One request's SAE and tokens, with what it runs on."""

    sae: SaeInfo
    weights: SaeWeights | CltWeights
    model: SourceModel
    manifest: DatasetManifest
    ids: torch.Tensor
    """``[n]`` token ids."""

    @property
    def keep(self) -> torch.Tensor:
        return _keep(self.model, self.ids)

    def spelled(self, ids: torch.Tensor | list[int] | None = None) -> list[str]:
        return self.model.tokenizer.convert_ids_to_tokens([int(i) for i in (self.ids if ids is None else ids)])


class TextProbes:
    def __init__(self, saes: SaeStore, store: DatasetStore, models: ModelRegistry, features: FeatureJobs):
        self.saes, self.store, self.models, self.features = saes, store, models, features

    # -- the requests ---------------------------------------------------------------------------
    def activations(self, sae_id: str, request: ActivationsRequest) -> TextActivations:
        if request.feature is not None:
            self.check_feature(sae_id, request.feature)
        text = self._open(sae_id, request)
        d_sae = text.sae.d_sae
        with torch.inference_mode():
            acts = text.weights.encode(self._inputs(text)) * text.keep[:, None]
        top = acts.topk(min(request.top, d_sae), dim=-1)
        tokens = [TokenFeatures(position=p, token=t, token_id=int(i), features=_active(top.indices[p], top.values[p]))
                  for p, (t, i) in enumerate(zip(text.spelled(), text.ids))]
        values = None if request.feature is None else [round(float(v), 6) for v in acts[:, request.feature]]
        return TextActivations(sae_id=sae_id, tokens=tokens, feature=request.feature, values=values,
                               feature_max=None if request.feature is None else self.features.max_value(sae_id, request.feature))

    def row_features(self, sae_id: str, row: int, top: int) -> RowFeatures:
        """The features on a stored row, from the dataset's own activations (what the statistics read)."""
        sae = self.saes.info(sae_id)
        manifest = self._manifest(sae)
        if not 0 <= row < manifest.n_items:
            raise ProbeError(f"row {row} is out of range: dataset {sae.dataset_id} has {manifest.n_items:,} rows", 404)
        group = zarr.open_group(store=self.store.zarr_store, path=sae.dataset_id, mode="r")
        with torch.inference_mode():
            acts = self.saes.weights(sae_id).encode(_side_by_side(group, sae.input_hooks(), row, row + 1, manifest.dtype))[0]
        best = acts.topk(min(top, sae.d_sae))
        vocabulary = self.features.vocabulary(sae.dataset_id)  # the stored one: a row page loads no model
        token, window, position = (int(v) for v in group[TOKENS_ARRAY][row])
        lo, hi = max(row - position, row - BEFORE), min(row + AFTER + 1, manifest.n_items)
        around = group[TOKENS_ARRAY][lo:hi]
        same = around[:, 1] == window
        return RowFeatures(sae_id=sae_id, row=row, tokens=[_spell(vocabulary, int(t)) for t in around[same, 0]],
                           position=int(same[: row - lo].sum()), features=_active(best.indices, best.values))

    def steer(self, sae_id: str, request: SteerRequest) -> Steering:
        self.check_feature(sae_id, request.feature)
        text = self._open(sae_id, TextInput(text=request.prompt), room=request.max_new_tokens)
        self._causal(text, "steering")
        plain = self._generate(text, request, None)
        steered = self._generate(text, request, request.feature)
        differ = [i for i, (a, b) in enumerate(zip(plain, steered)) if a != b]
        if not differ and len(plain) != len(steered):
            differ = [min(len(plain), len(steered))]
        return Steering(sae_id=sae_id, request=request, prompt_tokens=text.spelled(),
                        unsteered=self._continuation(text, plain), steered=self._continuation(text, steered),
                        first_difference=differ[0] if differ else None)

    def attribution(self, sae_id: str, request: AttributionRequest) -> Attribution:
        text = self._open(sae_id, request)
        self._causal(text, "attribution of the next-token loss")
        n = len(text.ids)
        position = n - 2 if request.position is None else request.position
        if not 0 <= position < n - 1:
            raise ProbeError(f"position {position} has no next token to predict: the text has {n} tokens, "
                             f"so a position from 0 to {n - 2}", 422)
        acts, loss = _attribute(text, position)
        grads = torch.autograd.grad(loss, acts)
        scores = torch.cat([a.detach() * g for a, g in zip(acts, grads)], -1)[0] * text.keep[:, None]  # [n, d_sae]
        values = torch.cat([a.detach() for a in acts], -1)[0]
        summed = scores.sum(0)
        order = summed.abs().argsort(descending=True)[: request.top]
        features = [FeatureAttribution(feature=int(f), attribution=float(summed[f]), activation=float(values[position, f]),
                                       strongest_position=int(scores[:, f].abs().argmax()))
                    for f in order if summed[f] != 0]
        return Attribution(sae_id=sae_id, tokens=text.spelled(), position=position, target=text.spelled()[position + 1],
                           loss=float(loss.detach()), total=float(summed.sum()), features=features)

    def check_feature(self, sae_id: str, feature: int) -> None:
        """404 for a feature index the SAE does not have (a CLT's count every layer's)."""
        d_sae = self.saes.info(sae_id).d_sae
        if not 0 <= feature < d_sae:
            raise ProbeError(f"feature {feature} is out of range: SAE '{sae_id}' has {d_sae} (0..{d_sae - 1})", 404)

    def causal(self, sae_id: str) -> bool:
        """Whether the SAE's model is a causal LM (steering and attribution apply): stored with the
        vocabulary, so a page that only shows the steer form loads no model."""
        return self.features.causal(self.saes.info(sae_id).dataset_id)  # 409 there if the dataset is gone

    def max_tokens(self, sae_id: str) -> int:
        return self._manifest(self.saes.info(sae_id)).context_size

    # -- shared steps ---------------------------------------------------------------------------
    def _manifest(self, sae: SaeInfo) -> DatasetManifest:
        manifest = self.store.manifest(sae.dataset_id)
        if manifest is None:
            raise ProbeError(f"the SAE's dataset {sae.dataset_id} is no longer in the store", 409)
        return manifest

    def _open(self, sae_id: str, request: TextInput, room: int = 0) -> _Text:
        sae = self.saes.info(sae_id)
        manifest = self._manifest(sae)
        model = self.models.get(manifest.model.name, ask_hub=False)
        if request.text is not None:
            ids = model.tokenizer(request.text, add_special_tokens=False, truncation=False)["input_ids"]
            bos = model.bos_token_id if manifest.prepend_bos else None
            ids = ([bos] if bos is not None else []) + list(ids)
        else:
            ids = request.token_ids
            bad = [i for i in ids if not 0 <= i < len(model.tokenizer)]
            if bad:
                raise ProbeError(f"token ids {bad[:10]} are not in the vocabulary of '{manifest.model.name}' "
                                 f"(0..{len(model.tokenizer) - 1})", 422)
        limit = manifest.context_size - room
        if not ids or len(ids) > limit:
            what = f"with the {room} tokens to generate, " if room else ""
            raise ProbeError(f"the text is {len(ids)} tokens; {what}it must be 1 to {limit} (this SAE's dataset "
                             f"windows hold {manifest.context_size} tokens, the positions it was trained on)", 422)
        return _Text(sae, self.saes.weights(sae_id), model, manifest, torch.tensor(ids, dtype=torch.long))

    @staticmethod
    def _causal(text: _Text, what: str) -> None:
        reason = not_causal_reason(text.model)
        if reason is not None:
            raise ProbeError(f"{what} does not apply: '{text.model.info.name}' is not a causal LM, so it "
                             "generates nothing and has no next-token loss", 422)

    def _inputs(self, text: _Text) -> torch.Tensor:
        """``[n, L * d_in]``: the input hooks' rows side by side, in float32."""
        specs = [_spec(text.manifest, h) for h in text.sae.input_hooks()]
        cache = text.model.run(text.ids[None].to(text.model.device), specs)
        return torch.cat([reshape_hook(cache[s.name], s.concat_dims).float().cpu() for s in specs], -1)

    @torch.inference_mode()
    def _generate(self, text: _Text, request: SteerRequest, feature: int | None) -> list[int]:
        model, ids = text.model, text.ids.clone()
        generator = torch.Generator().manual_seed(request.seed)
        stop = model.separator_token_id
        weights = text.weights.to(model.device)
        new: list[int] = []
        for _ in range(request.max_new_tokens):
            keep = _keep(model, ids).to(model.device)
            hooks = [] if feature is None else _Steer(text.sae, weights, feature, request, keep).hooks()
            with model.lock:
                logits = model.bridge.run_with_hooks(ids[None].to(model.device), fwd_hooks=hooks)[0, -1].float().cpu()
            if request.temperature == 0:
                token = int(logits.argmax())
            else:
                token = int(torch.multinomial(F.softmax(logits / request.temperature, -1), 1, generator=generator))
            new.append(token)
            ids = torch.cat([ids, torch.tensor([token])])
            if token == stop:
                break
        return new

    @staticmethod
    def _continuation(text: _Text, ids: list[int]) -> Continuation:
        return Continuation(text=text.model.tokenizer.decode(ids), tokens=text.spelled(ids), token_ids=ids)


def _keep(model: SourceModel, ids: torch.Tensor) -> torch.Tensor:
    """``[n]``: positions the SAE acts on (not BOS or the separator)."""
    special = [t for t in {model.bos_token_id, model.separator_token_id} if t is not None]
    return ~torch.isin(ids, torch.tensor(special, dtype=torch.long))


def _spec(manifest: DatasetManifest, hook: str) -> HookSpec:
    info = manifest.hook(hook)
    return HookSpec(name=hook, concat_dims=info.concat_dims)


def _active(indices: torch.Tensor, values: torch.Tensor) -> list[ActiveFeature]:
    return [ActiveFeature(feature=int(i), activation=round(float(v), 6)) for i, v in zip(indices, values) if v > 0]


def _flat(activation: torch.Tensor) -> torch.Tensor:
    return activation.reshape(activation.shape[0], activation.shape[1], -1).float()


def _layers(weights: SaeWeights | CltWeights) -> int:
    return weights.n_layers if isinstance(weights, CltWeights) else 1


def _encode(weights: SaeWeights | CltWeights, x: torch.Tensor, layer: int) -> torch.Tensor:
    return weights.encode_layer(x, layer) if isinstance(weights, CltWeights) else weights.encode(x)


def _writes(weights: SaeWeights | CltWeights, feature: int) -> tuple[int, int, list[tuple[int, torch.Tensor]]]:
    """(its layer, its index there, [(output j, its decoder row into j)])."""
    if isinstance(weights, CltWeights):
        layer, index = divmod(feature, weights.W_enc.shape[2])
        return layer, index, [(j, weights.W_dec[layer][index, j - layer]) for j in range(layer, weights.n_layers)]
    return 0, feature, [(0, weights.W_dec[feature])]


def _hook_names(sae: SaeInfo) -> tuple[list[str], list[str]]:
    """(input hook per layer, output hook per layer): an SAE writes back to the hook it reads."""
    return sae.input_hooks(), sae.output_hooks() or sae.input_hooks()


class _Steer:
    """Hooks adding the feature's decoder rows at its outputs: ``strength`` times them (``add``), or
    (``strength`` - its activation) times them (``clamp``: its activation read from its input hook
    in the same pass)."""

    def __init__(self, sae: SaeInfo, weights, feature: int, request: SteerRequest, keep: torch.Tensor):
        self.weights, self.request, self.keep = weights, request, keep
        self.layer, self.index, self.writes = _writes(weights, feature)
        self.inputs, self.outputs = _hook_names(sae)
        self.activation: torch.Tensor | None = None

    def hooks(self) -> list:
        reads = []
        if self.request.mode == "clamp" and self.inputs[self.layer] not in self.outputs:
            reads = [(self.inputs[self.layer], self._read)]
        return reads + [(self.outputs[j], self._write(row)) for j, row in self.writes]

    def _read(self, activation: torch.Tensor, hook) -> torch.Tensor:
        self.activation = _encode(self.weights, _flat(activation), self.layer)[..., self.index]
        return activation

    def _write(self, row: torch.Tensor):
        def write(activation: torch.Tensor, hook) -> torch.Tensor:
            y = _flat(activation)
            if self.request.mode == "add":
                amount = torch.full(y.shape[:2], self.request.strength, device=y.device)
            else:
                if self.activation is None:  # an SAE: it reads the hook it writes
                    self._read(activation, hook)
                amount = self.request.strength - self.activation
            return (y + (amount * self.keep)[..., None] * row).reshape(activation.shape).to(activation.dtype)
        return write


def _attribute(text: _Text, position: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The latents of each layer as leaves of the graph, and the next-token loss at ``position``.
    Each output keeps its own value: the latents' write is added and its value taken away again
    (the SAE's error term), so only the gradient flows through them."""
    model, weights = text.model, text.weights.to(text.model.device)
    inputs, outputs = _hook_names(text.sae)
    latents: dict[int, torch.Tensor] = {}

    def read(layer: int):
        def hook_fn(activation: torch.Tensor, hook) -> torch.Tensor:
            latents[layer] = _encode(weights, _flat(activation).detach(), layer).requires_grad_()
            return activation
        return hook_fn

    def write(j: int):
        def hook_fn(activation: torch.Tensor, hook) -> torch.Tensor:
            if j not in latents:  # an SAE: it reads the hook it writes
                read(j)(activation, hook)
            if isinstance(weights, CltWeights):
                out = sum(latents[l] @ weights.W_dec[l][:, j - l] for l in range(j + 1))
            else:
                out = latents[0] @ weights.W_dec
            y = _flat(activation)
            return (y + out - out.detach()).reshape(activation.shape).to(activation.dtype)
        return hook_fn

    hooks = [(h, read(l)) for l, h in enumerate(inputs) if h not in outputs]
    hooks += [(h, write(j)) for j, h in enumerate(outputs)]
    ids = text.ids.to(model.device)
    with model.lock, torch.enable_grad():
        logits = model.bridge.run_with_hooks(ids[None], fwd_hooks=hooks)
        loss = -F.log_softmax(logits[0, position].float(), -1)[ids[position + 1]]
    return [latents[l] for l in range(_layers(weights))], loss
