"""Validation: a decoded request (numpy arrays by tensor name) becomes a typed ``RequestPlan``.

Everything a request will cost is bounded here, before it waits for the model: tensor shapes, image
sides and aspect ratio (preprocessing scales the short edge to the model's size), class-name bytes
(checked before tokenizing), positions in the text tower and the size of the response. Every
rejection is an ``InvalidTensorError`` (422), a ``PayloadTooLargeError`` (413) or a ``ProtocolError``
(400) whose message names the tensor, what was expected and what arrived.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args

import numpy as np

from bptvlm.shared import protocol as p
from bptvlm.shared.errors import InvalidTensorError, PayloadTooLargeError, ProtocolError
from bptvlm.shared.tensors import datatype_of

from .config import Settings
from .deep import DEEP_MODES
from .images import ImageBatch
from .model import PromptedCLIP, TextBatch
from .policy import classification_counts, degradation_parameters

# Accepted datatypes and ranks of every input (text_context: shared [P, n, D] or per class [P, C, n, D]).
_INPUT_TYPES: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    p.TEXT_CONTEXT: (("FP32", "FP16"), (3, 4)),
    p.VISUAL_PROMPT: (("FP32", "FP16"), (3,)),
    p.IMAGES: (("UINT8",), (4,)),
    p.IMAGE_BATCH: (("BYTES",), (1,)),
    p.LABELS: (("INT64", "INT32"), (1,)),
    p.CLASS_NAMES: (("BYTES",), (1,)),
    p.TEXT_DEEP_PROMPT: (("FP32", "FP16"), (4,)),
    p.VISUAL_DEEP_PROMPT: (("FP32", "FP16"), (4,)),
}
JSON_BYTES_PER_FLOAT = 24  # "-1.2345678901234567e-05," : the longest a float32 prints as in a JSON list
_KNOWN_PARAMETERS = {p.PARAM_LOSS, p.PARAM_FOCAL_GAMMA, p.PARAM_VISUAL_PROMPT_POSITION, p.PARAM_CONTEXT_INIT,
                     "binary_data_output", p.PARAM_OUTPUT_NOISE, p.PARAM_OUTPUT_DECIMALS, p.PARAM_DEEP_PROMPT_MODE}


@dataclass
class RequestPlan:
    """A validated request: everything the forward needs, and nothing left to check.

    ``images`` (inline uint8 ``[N, H, W, 3]``, preprocessed inside admission) or ``batch`` (uploaded).
    """

    population: int
    num_images: int
    class_texts: list[str]
    tokens: TextBatch
    context: np.ndarray | None  # [P, n, D_t] or [P, C, n, D_t]
    prompt: np.ndarray | None  # [P, m, D_v]
    labels: np.ndarray | None  # [N]
    wanted: set[str]
    params: dict[str, Any]
    binary: dict[str, bool] = field(default_factory=dict)  # output name -> binary on the wire
    images: np.ndarray | None = None
    batch: ImageBatch | None = None
    classify: dict[str, int] = field(default_factory=dict)  # output name -> K of a top-K (server/policy.py)
    request_id: str | None = None  # seeds the output noise (server/outputs.py)
    text_deep: np.ndarray | None = None  # [P, Ld_t, n, D_t]
    visual_deep: np.ndarray | None = None  # [P, Ld_v, m, D_v]


def describe(array: np.ndarray) -> str:
    return f"{datatype_of(array)} {list(array.shape)}"


def checked(arrays: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    """The input ``name`` if present, after datatype and rank checks."""
    array = arrays.get(name)
    if array is None:
        return None
    datatypes, ranks = _INPUT_TYPES[name]
    if datatype_of(array) not in datatypes or array.ndim not in ranks:
        raise InvalidTensorError(
            f"input '{name}': expected {' or '.join(datatypes)} with {' or '.join(map(str, ranks))} dimensions, "
            f"received {describe(array)}"
        )
    return array


def _finite_prompt(arrays: dict[str, np.ndarray], name: str, width: int, max_len: int) -> np.ndarray | None:
    array = checked(arrays, name)
    if array is None:
        return None
    pop, *classes, length, dim = array.shape  # classes: [C] for a class-specific text context
    if pop < 1 or dim != width or length > max_len or (classes and classes[0] < 1):
        expected = ", ".join(["P >= 1", *(["C"] if classes else []), f"n <= {max_len}", str(width)])
        raise InvalidTensorError(f"input '{name}': expected [{expected}], received {describe(array)}")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InvalidTensorError(f"input '{name}': {bad} values are NaN or infinite")
    return array


def texts(array: np.ndarray, name: str, max_bytes: int) -> list[str]:
    """UTF-8 elements of a BYTES tensor, each non-empty and at most ``max_bytes`` (checked before decoding)."""
    out = []
    for i, raw in enumerate(array.reshape(-1)):
        size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
        if size > max_bytes:
            raise PayloadTooLargeError(f"input '{name}': element {i} has {size} bytes, at most {max_bytes}")
        try:
            text = raw if isinstance(raw, str) else raw.decode("utf-8")
            text.encode("utf-8")  # a str may hold a lone surrogate
        except UnicodeError:
            raise InvalidTensorError(f"input '{name}': element {i} is not valid UTF-8") from None
        if not text.strip():
            raise InvalidTensorError(f"input '{name}': element {i} is empty")
        out.append(text)
    return out


class Planner:
    """Builds ``RequestPlan``s against one model's limits and the server's settings."""

    def __init__(self, model: PromptedCLIP, settings: Settings) -> None:
        self.model, self.settings, self.limits = model, settings, model.limits

    def check_images(self, array: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` within the count, side and aspect-ratio limits."""
        array = checked({p.IMAGES: array}, p.IMAGES)
        assert array is not None
        n, h, w, c = array.shape
        s = self.settings
        if n < 1 or h < 1 or w < 1 or c != 3:
            raise InvalidTensorError(f"input '{p.IMAGES}': expected UINT8 [N >= 1, H, W, 3], received {describe(array)}")
        if n > s.max_images:
            raise PayloadTooLargeError(f"input '{p.IMAGES}': {n} images, at most {s.max_images} per batch")
        if max(h, w) > s.max_image_side:
            raise PayloadTooLargeError(
                f"input '{p.IMAGES}': images of {h} x {w} pixels; at most {s.max_image_side} per side: resize them first"
            )
        if max(h, w) > s.max_image_aspect * min(h, w):
            raise InvalidTensorError(
                f"input '{p.IMAGES}': images of {h} x {w} pixels have an aspect ratio over {s.max_image_aspect:g}; "
                f"crop them first (the model sees a centred {self.limits.image_size} x {self.limits.image_size} square)"
            )
        return array

    def plan(self, request: p.InferenceRequest, arrays: dict[str, np.ndarray],
             batch_of: Callable[[str], ImageBatch]) -> RequestPlan:
        """Validate ``arrays``; ``batch_of(id)`` resolves an uploaded ``image_batch`` to its ``ImageBatch``."""
        unknown = sorted(set(arrays) - set(p.INPUT_NAMES))
        if unknown:
            raise InvalidTensorError(f"unknown input {unknown[0]!r}; inputs are {', '.join(p.INPUT_NAMES)}")
        context, prompt, population = self._prompts(arrays)
        class_texts = self._class_texts(arrays)
        if context is not None and context.ndim == 4 and context.shape[1] != len(class_texts):
            raise InvalidTensorError(
                f"input '{p.TEXT_CONTEXT}': a class-specific context [P, C, n, D] needs C = {len(class_texts)} "
                f"(one per class name), received {describe(context)}"
            )
        images, batch = self._images(arrays, batch_of)
        num_images = int(images.shape[0]) if images is not None else batch.num_images  # type: ignore[union-attr]
        labels = self._labels(arrays, num_images, len(class_texts))
        wanted = self._outputs(request, labels is not None)
        params = self.parameters(request.parameters or {}, context)
        self._check_visual_prompt(prompt, params["visual_prompt_position"])
        text_deep, visual_deep = self._deep_prompts(arrays, context, prompt, params["visual_prompt_position"])
        n_ctx = 0 if context is None else context.shape[-2]
        tokens = self._tokens(class_texts, n_ctx)
        binary = self._binary(request, wanted)
        classify = classification_counts(request)
        self._check_response_size(population, num_images, len(class_texts), wanted, binary, classify)
        return RequestPlan(population, num_images, class_texts, tokens, context, prompt, labels, wanted, params,
                           binary, images, batch, classify, request.id, text_deep, visual_deep)

    def _prompts(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None, int]:
        lim = self.limits
        context = _finite_prompt(arrays, p.TEXT_CONTEXT, lim.text_width, lim.max_text_context)
        # an 'add' prompt has one vector per vision position, which may be more than appended prompts may
        prompt = _finite_prompt(arrays, p.VISUAL_PROMPT, lim.vision_width, max(lim.max_visual_prompt, p.vision_positions(lim)))
        if context is not None and context.shape[-2] < 1:
            raise InvalidTensorError(
                f"input '{p.TEXT_CONTEXT}': needs at least one context vector, received {describe(context)}"
            )
        pops = {a.shape[0] for a in (context, prompt) if a is not None}
        if len(pops) > 1:
            raise InvalidTensorError(
                f"inputs '{p.TEXT_CONTEXT}' and '{p.VISUAL_PROMPT}' disagree on the population: {sorted(pops)}"
            )
        population = pops.pop() if pops else 1
        if population > self.settings.max_population:
            raise PayloadTooLargeError(f"population {population} is over the limit of {self.settings.max_population}")
        return context, prompt, population

    def _deep_prompts(self, arrays: dict[str, np.ndarray], context: np.ndarray | None, prompt: np.ndarray | None,
                      placement: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``text_deep_prompt [P, Ld, n, D_t]`` and ``visual_deep_prompt [P, Ld, m, D_v]``: each beside its
        shallow prompt (same P and length), ``1 <= Ld <= layers - 1``, finite."""
        lim = self.limits
        out = []
        for name, shallow_name, shallow, width, depth in (
            (p.TEXT_DEEP_PROMPT, p.TEXT_CONTEXT, context, lim.text_width, lim.text_layers),
            (p.VISUAL_DEEP_PROMPT, p.VISUAL_PROMPT, prompt, lim.vision_width, lim.vision_layers),
        ):
            array = checked(arrays, name)
            out.append(array)
            if array is None:
                continue
            if shallow is None:
                raise InvalidTensorError(f"input '{name}' needs the shallow prompt '{shallow_name}' (layer 0) beside it")
            if name == p.VISUAL_DEEP_PROMPT and placement == "add":
                raise InvalidTensorError(f"input '{name}' replaces appended prompt tokens; visual_prompt_position 'add' "
                                         "appends none: use 'pre_ln' or 'post_ln'")
            pop, layers, length, dim = array.shape
            n = shallow.shape[-2]
            if pop != shallow.shape[0] or not 1 <= layers <= depth - 1 or length != n or dim != width:
                raise InvalidTensorError(
                    f"input '{name}': expected [P={shallow.shape[0]}, 1 <= layers <= {depth - 1}, n={n}, {width}] "
                    f"(layers 1.. of the {depth}-layer tower, as many vectors as '{shallow_name}'), received {describe(array)}")
            if not np.isfinite(array).all():
                raise InvalidTensorError(f"input '{name}': {int((~np.isfinite(array)).sum())} values are NaN or infinite")
        return out[0], out[1]

    def _class_texts(self, arrays: dict[str, np.ndarray]) -> list[str]:
        names = checked(arrays, p.CLASS_NAMES)
        if names is None:
            raise InvalidTensorError(f"input '{p.CLASS_NAMES}' (BYTES [C]) is required")
        if names.shape[0] < 1:
            raise InvalidTensorError(f"input '{p.CLASS_NAMES}': expected BYTES [C >= 1], received {describe(names)}")
        if names.shape[0] > self.settings.max_classes:
            raise PayloadTooLargeError(f"{names.shape[0]} classes, at most {self.settings.max_classes}")
        return texts(names, p.CLASS_NAMES, self.settings.max_text_bytes)

    def _tokens(self, class_texts: list[str], n_ctx: int) -> TextBatch:
        """Token ids (the texts' bytes were bounded first); every sequence must fit the text tower."""
        tokens = self.model.tokenize(class_texts)
        need = [len(ids) + n_ctx + 2 for ids in tokens.token_ids]  # BOS, context, text, EOS
        longest = max(range(len(need)), key=need.__getitem__)
        if need[longest] > self.limits.context_length:
            raise InvalidTensorError(
                f"input '{p.CLASS_NAMES}': class text {longest} needs {need[longest]} positions with {n_ctx} "
                f"context vectors; the model has {self.limits.context_length}"
            )
        return tokens

    def _images(self, arrays: dict[str, np.ndarray],
                batch_of: Callable[[str], ImageBatch]) -> tuple[np.ndarray | None, ImageBatch | None]:
        inline, ref = checked(arrays, p.IMAGES), checked(arrays, p.IMAGE_BATCH)
        if (inline is None) == (ref is None):
            raise InvalidTensorError(f"give exactly one of '{p.IMAGES}' (inline) or '{p.IMAGE_BATCH}' (uploaded id)")
        if ref is not None:
            if ref.shape != (1,):
                raise InvalidTensorError(f"input '{p.IMAGE_BATCH}': expected BYTES [1], received {describe(ref)}")
            return None, batch_of(texts(ref, p.IMAGE_BATCH, 256)[0])
        assert inline is not None
        return self.check_images(inline), None

    @staticmethod
    def _labels(arrays: dict[str, np.ndarray], num_images: int, num_classes: int) -> np.ndarray | None:
        labels = checked(arrays, p.LABELS)
        if labels is None:
            return None
        if labels.shape != (num_images,):
            raise InvalidTensorError(f"input '{p.LABELS}': expected [{num_images}] (one per image), received {describe(labels)}")
        bad = (labels < 0) | (labels >= num_classes)
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidTensorError(
                f"input '{p.LABELS}': label {int(labels[i])} at index {i} is not a class index in [0, {num_classes})"
            )
        return labels

    @staticmethod
    def _outputs(request: p.InferenceRequest, have_labels: bool) -> set[str]:
        if not request.outputs:
            return {p.LOSS} if have_labels else {p.LOGITS}
        wanted = {o.name for o in request.outputs}
        unknown = sorted(wanted - set(p.OUTPUT_NAMES))
        if unknown:
            raise InvalidTensorError(f"unknown output {unknown[0]!r}; outputs are {', '.join(p.OUTPUT_NAMES)}")
        if p.LOSS in wanted and not have_labels:
            raise InvalidTensorError(f"output '{p.LOSS}' needs the input '{p.LABELS}' (INT64 [N])")
        return wanted

    @staticmethod
    def _binary(request: p.InferenceRequest, wanted: set[str]) -> dict[str, bool]:
        """Which outputs go as binary tensor data (``binary_data_output``, or per output ``binary_data``)."""
        binary_all = bool((request.parameters or {}).get("binary_data_output", False))
        asked = {o.name: bool((o.parameters or {}).get("binary_data", False)) for o in request.outputs or []}
        return {name: binary_all or asked.get(name, False) for name in wanted}

    def _check_response_size(self, pop: int, n: int, c: int, wanted: set[str], binary: dict[str, bool],
                             classify: dict[str, int] | None = None) -> None:
        """Refuse (413, before any work) a response over ``max_response_bytes``: logits are P x N x C floats."""
        size, limit = 4096, self.settings.max_response_bytes  # 4096: the JSON header
        per = {name: (8 if name == p.LABEL else 4) if binary[name] else JSON_BYTES_PER_FLOAT for name in wanted}
        classify = classify or {}
        for name in wanted:  # a top-K element: "0.123456:999" with its 4-byte length or JSON quotes
            count = {p.LOSS: pop, p.LABEL: pop * n}.get(name, pop * n * c)
            if name in classify:
                count, per[name] = pop * n * min(classify[name], c), 32
            size += count * per[name]
        if size > limit:
            encoding = "binary" if binary.get(p.LOGITS, True) else "JSON"
            raise PayloadTooLargeError(
                f"output '{p.LOGITS}' [P={pop}, N={n}, C={c}] = {pop * n * c} values would make a {encoding} response "
                f"of about {size} bytes, over the limit of {limit} bytes (--max-response-bytes); ask for "
                f"'{p.LOSS}' only, or split the candidates, images or classes over several requests"
            )

    def _check_visual_prompt(self, prompt: np.ndarray | None, placement: str) -> None:
        """Appended prompts: at most ``max_visual_prompt`` tokens; ``add``: exactly one vector per position."""
        if prompt is None:
            return
        positions = p.vision_positions(self.limits)
        if placement != "add" and prompt.shape[1] > self.limits.max_visual_prompt:
            raise InvalidTensorError(
                f"input '{p.VISUAL_PROMPT}': at most {self.limits.max_visual_prompt} appended tokens "
                f"(visual_prompt_position {placement!r}), received {prompt.shape[1]}"
            )
        if placement == "add" and prompt.shape[1] != positions:
            raise InvalidTensorError(
                f"input '{p.VISUAL_PROMPT}': visual_prompt_position 'add' needs one vector per vision position "
                f"({positions} = class token + patches), received {prompt.shape[1]}"
            )

    def parameters(self, params: dict[str, Any], context: np.ndarray | None) -> dict[str, Any]:
        unknown = sorted(set(params) - _KNOWN_PARAMETERS)
        if unknown:
            raise ProtocolError(f"unknown request parameter {unknown[0]!r}; known are {', '.join(sorted(_KNOWN_PARAMETERS))}")
        loss = params.get(p.PARAM_LOSS, "ce")
        if loss not in ("ce", "focal"):
            raise ProtocolError(f"parameter '{p.PARAM_LOSS}' must be 'ce' or 'focal', received {loss!r}")
        gamma = params.get(p.PARAM_FOCAL_GAMMA, 2.0)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 10:
            raise ProtocolError(f"parameter '{p.PARAM_FOCAL_GAMMA}' must be a number in [0, 10], received {gamma!r}")
        placement = params.get(p.PARAM_VISUAL_PROMPT_POSITION, "pre_ln")
        if placement not in get_args(p.Placement):
            raise ProtocolError(
                f"parameter '{p.PARAM_VISUAL_PROMPT_POSITION}' must be 'pre_ln', 'post_ln' or 'add', received {placement!r}"
            )
        init = params.get(p.PARAM_CONTEXT_INIT)
        if init is not None:
            self._check_context_init(init, context)
        deep_mode = params.get(p.PARAM_DEEP_PROMPT_MODE, "replace")
        if deep_mode not in DEEP_MODES:
            raise ProtocolError(f"parameter '{p.PARAM_DEEP_PROMPT_MODE}' must be 'replace' or 'add', received {deep_mode!r}")
        return {"loss": loss, "focal_gamma": float(gamma), "visual_prompt_position": placement, "context_init": init,
                "deep_prompt_mode": deep_mode, **degradation_parameters(params)}

    def _check_context_init(self, init: Any, context: np.ndarray | None) -> None:
        name = p.PARAM_CONTEXT_INIT
        if not isinstance(init, str) or context is None:
            raise ProtocolError(f"parameter '{name}' must be a string and needs '{p.TEXT_CONTEXT}'")
        try:
            size = len(init.encode("utf-8"))
        except UnicodeEncodeError:
            raise ProtocolError(f"parameter '{name}' is not valid UTF-8 (a lone surrogate)") from None
        if size > self.settings.max_text_bytes:
            raise ProtocolError(f"parameter '{name}' has {size} bytes, at most {self.settings.max_text_bytes}")
        n_tokens = len(self.model.tokenize([init]).token_ids[0])
        if n_tokens > context.shape[-2]:
            raise ProtocolError(
                f"parameter '{name}' {init!r} has {n_tokens} tokens, "
                f"more than the {context.shape[-2]} context vectors of '{p.TEXT_CONTEXT}'"
            )
