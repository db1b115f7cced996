from typing import Literal

from fastapi import APIRouter, Depends, Query, Request

from cache_server.routes.deps import MUTATING, require_token, services
from cache_server.services import Services
from shared.schemas import CorpusInfo

router = APIRouter(prefix="/v1/corpora", tags=["corpora"])


@router.get("")
def list_corpora(svc: Services = Depends(services)) -> list[CorpusInfo]:
    """Registered corpora, the built-in default (tiny-shakespeare) first."""
    return svc.corpora.list()


@router.post("", status_code=201, dependencies=[Depends(require_token)], responses=MUTATING,
             openapi_extra={"requestBody": {"content": {"text/plain": {}, "application/jsonl": {}, "application/octet-stream": {}},
                                            "required": True}})
async def upload_corpus(
    request: Request,
    name: str = Query("uploaded", max_length=100, pattern=r"^[\w .-]+$"),
    format: Literal["text", "jsonl", "npy"] = Query("text", description=(
        "text: one document; jsonl: {\"text\": ...} per line; npy: pre-tokenized ids (np.save of a 1-D or 2-D "
        "int32/int64 array), used as they are")),
    svc: Services = Depends(services),
) -> CorpusInfo:
    """Upload a UTF-8 text or JSONL file, or an .npy of token ids, as the raw request body (streamed,
    size-limited)."""
    return await svc.corpora.upload(request.stream(), name, format)
