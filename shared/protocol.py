"""Open Inference Protocol (KServe V2) messages, plus what bptvlm publishes in them.

An inference request in JSON form::

    {"id": "gen-3",
     "inputs": [{"name": "text_context", "shape": [30, 8, 128], "datatype": "FP32", "data": [...]},
                {"name": "image_batch", "shape": [1], "datatype": "BYTES", "data": ["sha256:..."]},
                {"name": "labels", "shape": [160], "datatype": "INT64", "data": [...]},
                {"name": "class_names", "shape": [10], "datatype": "BYTES", "data": ["zero.", ...]}],
     "outputs": [{"name": "loss"}]}

With the binary tensor data extension an input carries ``"parameters": {"binary_data_size": n}``
instead of ``data`` and its bytes follow the JSON header in the body (``shared.tensors``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = "1"
"""bptvlm's own protocol revision, published in server metadata and checked by the client."""

DEFAULT_MODEL_NAME = "clip"

# Names of the tensors: the contract between client and server.
TEXT_CONTEXT = "text_context"  # FP32/FP16 [P, n_ctx_text, D_text] shared, or [P, C, n_ctx_text, D_text] one per class
VISUAL_PROMPT = "visual_prompt"  # FP32/FP16 [P, n_ctx_vision, D_vision]
# Deep prompts (VPT-deep): layer l's vectors replace the context positions / appended prompt tokens at the
# input of layer l = 1 .. Ld (Ld <= layers - 1; fewer: the first ones), beside the shallow prompt of the same length.
TEXT_DEEP_PROMPT = "text_deep_prompt"  # FP32/FP16 [P, Ld_text, n_ctx_text, D_text], shared by every class
VISUAL_DEEP_PROMPT = "visual_deep_prompt"  # FP32/FP16 [P, Ld_vision, n_ctx_vision, D_vision]
IMAGES = "images"  # UINT8 [N, H, W, 3], inline
IMAGE_BATCH = "image_batch"  # BYTES [1], id of an uploaded batch
LABELS = "labels"  # INT64 [N]
CLASS_NAMES = "class_names"  # BYTES [C]
LOSS = "loss"  # FP32 [P]
LOGITS = "logits"  # FP32 [P, N, C]
PROBS = "probs"  # FP32 [P, N, C]: softmax of the logits
LABEL = "label"  # INT64 [P, N]: argmax of the logits (ties: the lowest class index)
TOPK = "topk"  # BYTES [P, N, K]: "<score>:<index>" of the K most probable classes (Triton's classification)

INPUT_NAMES = (TEXT_CONTEXT, VISUAL_PROMPT, IMAGES, IMAGE_BATCH, LABELS, CLASS_NAMES, TEXT_DEEP_PROMPT,
               VISUAL_DEEP_PROMPT)
OUTPUT_NAMES = (LOSS, LOGITS, PROBS, LABEL, TOPK)
# Output parameter of the V2 classification extension: {"name": "probs", "parameters": {"classification": K}}
# returns that output as its top K, BYTES [P, N, K] of "<value>:<index>" (as Triton does).
PARAM_CLASSIFICATION = "classification"
# Output policies a server or a key may have (server/policy.py): which outputs a caller may receive.
OUTPUT_POLICIES = ("logits", "probs", "loss", "topk:K", "label")

# Request parameters the server understands.
PARAM_LOSS = "loss"  # "ce" (default) or "focal"
PARAM_FOCAL_GAMMA = "focal_gamma"  # float, default 2.0
# Where the visual prompt enters the vision tower: "pre_ln" (the paper: appended tokens before the
# pre-layer-norm), "post_ln" (ours: appended after it) or "add" (ours: one vector added to each of the
# tower's positions after the pre-layer-norm, so a zero prompt is exactly no prompt).
PARAM_VISUAL_PROMPT_POSITION = "visual_prompt_position"
# Text whose token embeddings the server adds to text_context (zero-padded to n_ctx), so that a
# context of zeros reproduces the hand-written template without the client ever seeing an embedding.
PARAM_CONTEXT_INIT = "context_init"
# A caller may ask for outputs degraded beyond the server's own (--output-noise, --output-decimals), never less:
# the noisier and the coarser of the two apply (to simulate a stricter service without restarting one).
PARAM_OUTPUT_NOISE = "output_noise"  # float >= 0: std of Gaussian noise on the logits
PARAM_OUTPUT_DECIMALS = "output_decimals"  # int >= 0: float outputs rounded to this many decimals
# How deep prompts enter layers 1..: "replace" (the paper's: they replace the prompt positions' states) or
# "add" (ours: they are added to those states, so a zero deep prompt is exactly the shallow prompt).
PARAM_DEEP_PROMPT_MODE = "deep_prompt_mode"

Parameters = dict[str, Any]


class _Message(BaseModel):
    """What a client sends: unknown fields are refused, so a typo is an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")  # NaN/Infinity as json.dumps writes them


class _Reply(BaseModel):
    """What a server sends: unknown fields are ignored, so a newer server does not break older clients."""

    model_config = ConfigDict(extra="ignore", ser_json_inf_nan="constants")


class TensorData(_Message):
    """One named tensor: ``{"name", "shape", "datatype", "parameters"?, "data"?}``."""

    name: str = Field(min_length=1, max_length=128)
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class RequestedOutput(_Message):
    """``{"name": "logits", "parameters": {"binary_data": true}}``."""

    name: str
    parameters: Parameters | None = None


class InferenceRequest(_Message):
    id: str | None = Field(default=None, max_length=256)
    parameters: Parameters | None = None
    inputs: list[TensorData]
    outputs: list[RequestedOutput] | None = None


class InferenceResponse(_Reply):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[TensorData]


class MetadataTensor(_Reply):
    """Shape with ``-1`` for a free dimension."""

    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(_Reply):
    name: str
    version: str
    extensions: list[str]


class PromptLimits(_Reply):
    """What a client needs to build prompts for the served model (published on purpose).

    The statistics are the ones the paper's projection initialisation uses; publishing them leaks
    nothing a client could not estimate from the logits, and it makes the method reproducible.
    """

    text_width: int = Field(description="D_text: width of a text context vector")
    vision_width: int = Field(description="D_vision: width of a visual prompt token")
    max_text_context: int = Field(description="most context vectors that still leave room for a class name")
    max_visual_prompt: int = Field(description="most visual prompt tokens accepted")
    context_length: int = Field(description="text positions of the model (context + class name + 2)")
    image_size: int
    patch_size: int
    num_channels: int
    projection_dim: int
    token_embedding_std: float = Field(description="std of the token-embedding table (text init)")
    patch_embedding_mean: float = Field(description="mean of the patch-embedding conv weights")
    patch_embedding_std: float = Field(description="std of the patch-embedding conv weights")
    patch_token_std: float = Field(
        description="std of the vision tokens after the pre-layer-norm (scale of post_ln prompts)"
    )
    text_layers: int = Field(default=0, description="L_t: layers of the text tower (a deep text prompt has at most L_t - 1)")
    vision_layers: int = Field(default=0, description="L_v: layers of the vision tower (a deep visual prompt has at most L_v - 1)")
    text_hidden_std: list[float] = Field(
        default_factory=list,
        description="std of the text hidden states at the input of each layer (index 0: the encoder's input), values "
        "beyond 3 std from the mean left out, on a fixed probe of token ids (scale of deep text prompts)")
    vision_hidden_std: list[float] = Field(
        default_factory=list,
        description="std of the vision hidden states at the input of each layer (index 0: after the pre-layer-norm), "
        "values beyond 3 std from the mean left out, on fixed-seed noise pixels (scale of deep visual prompts)")


class OutputAccess(_Reply):
    """``parameters["outputs"]`` of the model metadata: what the caller's key may receive."""

    policy: str = Field(description="the effective output policy (server's and key's, the stricter)")
    allowed: list[str] = Field(description="outputs this key may ask for")
    topk: int | None = Field(default=None, description="largest K of a top-K output (None: no limit but C)")
    decimals: int | None = Field(default=None, description="float outputs are rounded to this many decimals")
    noise: float = Field(default=0.0, description="std of the Gaussian noise added to the logits before all else")


class ModelMetadata(_Reply):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: Parameters = Field(default_factory=dict)


class Usage(_Reply):
    """Queries charged, in the units the user pays for (one candidate = one query)."""

    candidates: int = 0
    requests: int = 0
    image_forwards: int = 0


class UsageReport(_Reply):
    """``GET /v2/usage``: the caller's totals; ``remaining`` is None without a quota."""

    usage: Usage
    remaining: int | None = None


class ImageUploadResponse(_Reply):
    image_batch: str = Field(description="content-hash id to pass as the image_batch input")
    num_images: int
    cached: bool = Field(description="the batch was already stored (upload is idempotent)")


MAX_TOKENIZE_CHARS = 1000  # per text: class names and templates are short


class TokenizeRequest(_Message):
    """Texts whose token counts a client needs, e.g. to give a template's prefix exactly its own
    number of context vectors (then a context of zeros is the template itself)."""

    texts: list[Annotated[str, Field(max_length=MAX_TOKENIZE_CHARS)]] = Field(min_length=1, max_length=1024)


class TokenizeResponse(_Reply):
    num_tokens: list[int] = Field(description="tokens of each text, without the start and end tokens")


class ErrorResponse(_Reply):
    error: str


Placement = Literal["pre_ln", "post_ln", "add"]


def vision_positions(limits: PromptLimits) -> int:
    """Tokens the vision tower sees without a prompt: the class token and one per patch. An "add"
    visual prompt has exactly this many vectors, one added to each position."""
    return (limits.image_size // limits.patch_size) ** 2 + 1
