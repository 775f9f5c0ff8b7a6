"""The service layer: validates a decoded request, meters it, runs the prompted model.

Knows neither HTTP nor the wire encoding: it takes numpy arrays by tensor name and returns numpy
arrays by output name. Every rejection is an ``InvalidTensorError`` (422) or another
``shared.errors`` class whose message names the tensor, what was expected and what arrived.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import torch

from bptvlm.shared import protocol as p
from bptvlm.shared.errors import InvalidTensorError, NotReadyError, PayloadTooLargeError, ProtocolError
from bptvlm.shared.tensors import datatype_of

from .config import Settings
from .admission import Admission, OverloadedError
from .cache import ByteLRU
from .health import Readiness
from .images import ImageBatch, ImageStore
from .ledger import KeyRecord, Ledger
from .model import PromptedCLIP, loss_per_candidate

log = logging.getLogger(__name__)

# Accepted datatypes and ranks of every input (text_context: shared [P, n, D] or per class [P, C, n, D]).
_INPUT_TYPES: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    p.TEXT_CONTEXT: (("FP32", "FP16"), (3, 4)),
    p.VISUAL_PROMPT: (("FP32", "FP16"), (3,)),
    p.IMAGES: (("UINT8",), (4,)),
    p.IMAGE_BATCH: (("BYTES",), (1,)),
    p.LABELS: (("INT64", "INT32"), (1,)),
    p.CLASS_NAMES: (("BYTES",), (1,)),
}


@dataclass
class InferenceResult:
    outputs: dict[str, np.ndarray]
    usage: p.Usage
    replayed: bool = False  # answered from the idempotency cache, charged nothing this time
    queue_s: float = 0.0  # waiting for the model
    forward_s: float = 0.0  # running it


@dataclass
class _Plan:
    """A validated request: everything the forward needs."""

    population: int
    batch: ImageBatch
    class_texts: list[str]
    context: np.ndarray | None
    prompt: np.ndarray | None
    labels: np.ndarray | None
    wanted: set[str]
    params: dict[str, Any]


def _describe(array: np.ndarray) -> str:
    return f"{datatype_of(array)} {list(array.shape)}"


def _checked(arrays: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    """The input ``name`` if present, after datatype and rank checks."""
    array = arrays.get(name)
    if array is None:
        return None
    datatypes, ranks = _INPUT_TYPES[name]
    if datatype_of(array) not in datatypes or array.ndim not in ranks:
        raise InvalidTensorError(
            f"input '{name}': expected {' or '.join(datatypes)} with {' or '.join(map(str, ranks))} dimensions, "
            f"received {_describe(array)}"
        )
    return array


def _finite_prompt(arrays: dict[str, np.ndarray], name: str, width: int, max_len: int) -> np.ndarray | None:
    array = _checked(arrays, name)
    if array is None:
        return None
    pop, *classes, length, dim = array.shape  # classes: [C] for a class-specific text context
    if pop < 1 or dim != width or length > max_len or (classes and classes[0] < 1):
        expected = ", ".join(["P >= 1", *(["C"] if classes else []), f"n <= {max_len}", str(width)])
        raise InvalidTensorError(f"input '{name}': expected [{expected}], received {_describe(array)}")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InvalidTensorError(f"input '{name}': {bad} values are NaN or infinite")
    return array


def _texts(array: np.ndarray, name: str) -> list[str]:
    out = []
    for i, raw in enumerate(array.reshape(-1)):
        try:
            text = raw if isinstance(raw, str) else raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidTensorError(f"input '{name}': element {i} is not valid UTF-8") from None
        if not text.strip():
            raise InvalidTensorError(f"input '{name}': element {i} is empty")
        out.append(text)
    return out


def _check_same_request(request_id: str, first: str, now: str) -> None:
    if first != now:
        raise InvalidTensorError(f"request id {request_id!r} was already used for a different request body")


class InferenceService:
    """Validate, meter, forward. One model; forwards take turns through ``Admission``."""

    def __init__(self, model: PromptedCLIP, settings: Settings, ledger: Ledger | None = None) -> None:
        self.model = model
        self.settings = settings
        self.limits = model.limits
        self.ledger = ledger or Ledger()
        self.images = ImageStore(settings.image_cache_bytes)
        # Unprompted text features [1, C, E] per class-text set: vision-only tuning runs the text tower once.
        self.text_features: ByteLRU[tuple[str, ...], torch.Tensor] = ByteLRU(
            settings.text_cache_bytes, lambda t: t.numel() * t.element_size()
        )
        self.admission = Admission(settings.max_queue, settings.request_timeout_s)
        # Idempotency: (key id, request id) -> (result, time answered).
        self._replies: ByteLRU[tuple[int, str], tuple[InferenceResult, float, str]] = ByteLRU(
            settings.reply_cache_bytes, lambda r: sum(a.nbytes for a in r[0].outputs.values()) + 256
        )
        self._in_flight: dict[tuple[int, str], threading.Event] = {}
        self._in_flight_lock = threading.Lock()
        self.readiness = Readiness()  # the latest forward's outcome (see health.py)

    # --- uploads ---------------------------------------------------------------------------------

    def upload(self, arrays: dict[str, np.ndarray]) -> p.ImageUploadResponse:
        unknown = sorted(set(arrays) - {p.IMAGES})
        if unknown or p.IMAGES not in arrays:
            raise InvalidTensorError(f"an upload carries exactly one input '{p.IMAGES}'; received {sorted(arrays)}")
        images = self._check_images(arrays[p.IMAGES])
        batch, cached = self.images.put(images, self._preprocess)
        return p.ImageUploadResponse(image_batch=batch.id, num_images=batch.num_images, cached=cached)

    def _check_images(self, array: np.ndarray) -> np.ndarray:
        array = _checked({p.IMAGES: array}, p.IMAGES)
        assert array is not None
        n, h, w, c = array.shape
        if n < 1 or h < 1 or w < 1 or c != 3:
            raise InvalidTensorError(f"input '{p.IMAGES}': expected UINT8 [N >= 1, H, W, 3], received {_describe(array)}")
        if n > self.settings.max_images:
            raise PayloadTooLargeError(f"input '{p.IMAGES}': {n} images, at most {self.settings.max_images} per batch")
        return array

    def _image_batch(self, arrays: dict[str, np.ndarray]) -> ImageBatch:
        inline, ref = _checked(arrays, p.IMAGES), _checked(arrays, p.IMAGE_BATCH)
        if (inline is None) == (ref is None):
            raise InvalidTensorError(f"give exactly one of '{p.IMAGES}' (inline) or '{p.IMAGE_BATCH}' (uploaded id)")
        if ref is not None:
            if ref.shape != (1,):
                raise InvalidTensorError(f"input '{p.IMAGE_BATCH}': expected BYTES [1], received {_describe(ref)}")
            return self.images.get(_texts(ref, p.IMAGE_BATCH)[0])
        assert inline is not None
        batch, _ = self.images.put(self._check_images(inline), self._preprocess)
        return batch

    def _preprocess(self, images: np.ndarray) -> torch.Tensor:
        """Pixels live on the model's device: uploaded once, never copied again per generation."""
        return self.model.preprocess(images).to(self.model.device)

    # --- inference -------------------------------------------------------------------------------

    def infer(
        self, request: p.InferenceRequest, arrays: dict[str, np.ndarray], key: KeyRecord, fingerprint: str = ""
    ) -> InferenceResult:
        """Score every candidate of the request; charge ``key`` one query per candidate, exactly once.

        A request id this key already used is not charged again: answered from the reply cache, or
        recomputed for free when the ledger remembers it but the cache does not (after a restart).
        ``fingerprint`` (a hash of the body) must then match: one id, one request.
        """
        if not request.id:
            return self._infer_once(request, arrays, key)
        slot = (key.id, request.id)
        while True:
            replay = self._replay(slot, fingerprint)
            if replay is not None:
                return replay
            with self._in_flight_lock:
                event = self._in_flight.get(slot)
                if event is None:
                    self._in_flight[slot] = threading.Event()
                    break
            event.wait(self.settings.request_timeout_s)  # the same request is running: wait for its answer
        try:
            result = self._infer_once(request, arrays, key, fingerprint)
            self._replies.put(slot, (result, time.monotonic(), fingerprint))
            return result
        finally:
            with self._in_flight_lock:
                self._in_flight.pop(slot).set()

    def _replay(self, slot: tuple[int, str], fingerprint: str) -> InferenceResult | None:
        found = self._replies.get(slot)
        if found is None or time.monotonic() - found[1] > self.settings.reply_ttl_s:
            return None
        _check_same_request(slot[1], found[2], fingerprint)
        return InferenceResult(found[0].outputs, found[0].usage, replayed=True)

    def cache_stats(self) -> dict[str, tuple[int, int]]:
        """(hits, misses) of each cache."""
        caches = {"images": self.images.lru, "text_features": self.text_features, "replies": self._replies}
        return {name: (c.hits, c.misses) for name, c in caches.items()}

    def _infer_once(
        self, request: p.InferenceRequest, arrays: dict[str, np.ndarray], key: KeyRecord, fingerprint: str = ""
    ) -> InferenceResult:
        plan = self._plan(request, arrays)
        charged = self.ledger.answered(key, request.id) if request.id else None
        if charged is not None:  # answered before a restart: recompute, do not charge again
            _check_same_request(request.id or "", charged[0], fingerprint)
            with self.admission.slot():
                outputs, _ = self._run(plan)
            return InferenceResult(outputs, p.Usage(candidates=charged[1], requests=1), replayed=True)
        reservation = self.ledger.reserve(key, plan.population)
        try:
            with self.admission.slot() as queue_s:
                start = time.perf_counter()
                outputs, forwards = self._run(plan)
                forward_s = time.perf_counter() - start
        except BaseException:
            self.ledger.release(reservation)
            raise
        self.ledger.commit(reservation, forwards, request.id, fingerprint)
        usage = p.Usage(candidates=plan.population, requests=1, image_forwards=forwards)
        return InferenceResult(outputs, usage, queue_s=queue_s, forward_s=forward_s)

    def probe(self) -> None:
        """One tiny forward through the request path (one image, one class, a one-vector prompt in each
        tower, loss), charged to nobody; readiness records the outcome, and a failure is raised.
        A full queue skips it: the server is busy, and the queued requests' forwards will tell."""
        try:
            with self.admission.slot():
                self._run(self._probe_plan())
        except OverloadedError:
            log.info("readiness probe skipped: the queue is full")
        except Exception as exc:
            self.readiness.failed(f"readiness probe failed: {type(exc).__name__}: {exc}")
            raise

    def _probe_plan(self) -> _Plan:
        lim = self.limits
        size = lim.image_size
        context = np.zeros((1, 1, lim.text_width), np.float32)  # [P=1, n=1, D_t]
        prompt = np.zeros((1, 1, lim.vision_width), np.float32) if lim.max_visual_prompt else None  # [1, 1, D_v]
        batch = ImageBatch("probe", self._preprocess(np.zeros((1, size, size, 3), np.uint8)))  # never stored
        return _Plan(1, batch, ["a probe."], context, prompt, np.zeros(1, np.int64), {p.LOSS},
                     self._parameters({}, context))

    def _plan(self, request: p.InferenceRequest, arrays: dict[str, np.ndarray]) -> _Plan:
        unknown = sorted(set(arrays) - set(p.INPUT_NAMES))
        if unknown:
            raise InvalidTensorError(f"unknown input {unknown[0]!r}; inputs are {', '.join(p.INPUT_NAMES)}")
        lim = self.limits
        context = _finite_prompt(arrays, p.TEXT_CONTEXT, lim.text_width, lim.max_text_context)
        # an 'add' prompt has one vector per vision position, which may be more than appended prompts may
        prompt = _finite_prompt(arrays, p.VISUAL_PROMPT, lim.vision_width, max(lim.max_visual_prompt, p.vision_positions(lim)))
        if context is not None and context.shape[-2] < 1:
            raise InvalidTensorError(
                f"input '{p.TEXT_CONTEXT}': needs at least one context vector, received {_describe(context)}"
            )
        pops = {a.shape[0] for a in (context, prompt) if a is not None}
        if len(pops) > 1:
            raise InvalidTensorError(
                f"inputs '{p.TEXT_CONTEXT}' and '{p.VISUAL_PROMPT}' disagree on the population: {sorted(pops)}"
            )
        population = pops.pop() if pops else 1
        if population > self.settings.max_population:
            raise PayloadTooLargeError(f"population {population} is over the limit of {self.settings.max_population}")

        names_arr = _checked(arrays, p.CLASS_NAMES)
        if names_arr is None:
            raise InvalidTensorError(f"input '{p.CLASS_NAMES}' (BYTES [C]) is required")
        class_texts = _texts(names_arr, p.CLASS_NAMES)
        if len(class_texts) > self.settings.max_classes:
            raise PayloadTooLargeError(f"{len(class_texts)} classes, at most {self.settings.max_classes}")
        if context is not None and context.ndim == 4 and context.shape[1] != len(class_texts):
            raise InvalidTensorError(
                f"input '{p.TEXT_CONTEXT}': a class-specific context [P, C, n, D] needs C = {len(class_texts)} "
                f"(one per class name), received {_describe(context)}"
            )
        batch = self._image_batch(arrays)
        labels = self._labels(arrays, batch.num_images, len(class_texts))
        wanted = self._outputs(request, labels is not None)
        params = self._parameters(request.parameters or {}, context)
        self._check_visual_prompt(prompt, params["visual_prompt_position"])
        return _Plan(population, batch, class_texts, context, prompt, labels, wanted, params)

    def _run(self, plan: _Plan) -> tuple[dict[str, np.ndarray], int]:
        """Forward with out-of-memory recovery: free the cache, halve the micro-batch, try again."""
        model = self.model
        while True:
            try:
                logits, forwards = self._forward(plan)
                break
            except torch.OutOfMemoryError:
                if model.device.type == "cuda":
                    torch.cuda.empty_cache()
                if model.max_batch_images <= 1:
                    message = "out of memory even one image at a time; the server is not ready"
                    self.readiness.failed(message)
                    raise NotReadyError(message, 5.0) from None
                model.max_batch_images = max(1, model.max_batch_images // 2)
                log.warning("out of memory: micro-batch halved to %d images", model.max_batch_images)
        self.readiness.succeeded()
        outputs: dict[str, np.ndarray] = {}
        if p.LOSS in plan.wanted:
            assert plan.labels is not None
            labels = torch.from_numpy(plan.labels.astype(np.int64)).to(logits.device)
            loss = loss_per_candidate(logits, labels, plan.params["loss"], plan.params["focal_gamma"])
            outputs[p.LOSS] = loss.cpu().numpy().astype(np.float32)
        if p.LOGITS in plan.wanted:
            outputs[p.LOGITS] = logits.float().cpu().numpy()
        return outputs, forwards

    def _forward(self, plan: _Plan) -> tuple[torch.Tensor, int]:
        """Logits ``[P, N, C]`` and the number of images that went through the vision tower."""
        model, batch, class_texts = self.model, plan.batch, plan.class_texts
        context, prompt, params = plan.context, plan.prompt, plan.params
        ctx = None
        if context is not None:
            ctx = torch.from_numpy(context.astype(np.float32)).to(model.device, model.dtype)
            if params["context_init"]:
                ctx = ctx + model.context_init(params["context_init"], ctx.shape[-2])  # every class's context
        text = self.text_features.get(tuple(class_texts)) if ctx is None else None
        if text is None:
            try:
                text = model.encode_text(model.tokenize(class_texts), ctx)
            except ValueError as exc:
                raise InvalidTensorError(f"input '{p.CLASS_NAMES}': {exc}") from None
            if ctx is None:
                self.text_features.put(tuple(class_texts), text)
        if prompt is not None:
            vp = torch.from_numpy(prompt.astype(np.float32))
            image = model.encode_images(batch.pixel_values, vp, params["visual_prompt_position"])
            forwards = image.shape[0] * batch.num_images
        elif batch.features is not None:
            image, forwards = batch.features, 0
        else:
            image, forwards = model.encode_images(batch.pixel_values), batch.num_images
            self.images.remember_features(batch, image)
        return model.logits(image, text), forwards

    @staticmethod
    def _labels(arrays: dict[str, np.ndarray], num_images: int, num_classes: int) -> np.ndarray | None:
        labels = _checked(arrays, p.LABELS)
        if labels is None:
            return None
        if labels.shape != (num_images,):
            raise InvalidTensorError(f"input '{p.LABELS}': expected [{num_images}] (one per image), received {_describe(labels)}")
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

    def _parameters(self, params: dict[str, Any], context: np.ndarray | None) -> dict[str, Any]:
        known = {p.PARAM_LOSS, p.PARAM_FOCAL_GAMMA, p.PARAM_VISUAL_PROMPT_POSITION, p.PARAM_CONTEXT_INIT,
                 "binary_data_output"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ProtocolError(f"unknown request parameter {unknown[0]!r}; known are {', '.join(sorted(known))}")
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
            if not isinstance(init, str) or context is None:
                raise ProtocolError(f"parameter '{p.PARAM_CONTEXT_INIT}' must be a string and needs '{p.TEXT_CONTEXT}'")
            n_tokens = len(self.model.tokenize([init]).token_ids[0])
            if n_tokens > context.shape[-2]:
                raise ProtocolError(
                    f"parameter '{p.PARAM_CONTEXT_INIT}' {init!r} has {n_tokens} tokens, "
                    f"more than the {context.shape[-2]} context vectors of '{p.TEXT_CONTEXT}'"
                )
        return {"loss": loss, "focal_gamma": float(gamma), "visual_prompt_position": placement, "context_init": init}
