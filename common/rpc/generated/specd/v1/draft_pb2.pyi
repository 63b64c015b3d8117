from common.rpc.generated.specd.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProposeRequest(_message.Message):
    __slots__ = ("request_id", "context_token_ids", "k", "sampling", "round", "cache_namespace", "prompt_len", "guess_next")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CACHE_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_FIELD_NUMBER: _ClassVar[int]
    GUESS_NEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context_token_ids: _containers.RepeatedScalarFieldContainer[int]
    k: int
    sampling: _common_pb2.SamplingParams
    round: int
    cache_namespace: str
    prompt_len: int
    guess_next: bool
    def __init__(self, request_id: _Optional[str] = ..., context_token_ids: _Optional[_Iterable[int]] = ..., k: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., round: _Optional[int] = ..., cache_namespace: _Optional[str] = ..., prompt_len: _Optional[int] = ..., guess_next: _Optional[bool] = ...) -> None: ...

class ProposeReply(_message.Message):
    __slots__ = ("token_ids", "dists", "cached_tokens", "compute_ms", "queue_ms", "batch_size", "guessed_token_id")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DISTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GUESSED_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    dists: _containers.RepeatedCompositeFieldContainer[_common_pb2.SparseDistribution]
    cached_tokens: int
    compute_ms: float
    queue_ms: float
    batch_size: int
    guessed_token_id: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., dists: _Optional[_Iterable[_Union[_common_pb2.SparseDistribution, _Mapping]]] = ..., cached_tokens: _Optional[int] = ..., compute_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., guessed_token_id: _Optional[int] = ...) -> None: ...
