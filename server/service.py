"""Orchestration: uploads, inference and the readiness probe, over validation, metering and the model.

Knows neither HTTP nor the wire encoding: it takes numpy arrays by tensor name and returns numpy
arrays by output name. ``plan.py`` validates (every bound on the work is checked there, before the
request waits for the model), ``metering.py`` reserves and commits, ``replies.py`` keeps answers for
retried request ids, ``admission.py`` gives out the device. Errors are ``shared.errors`` classes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from bptvlm.shared import protocol as p
from bptvlm.shared.errors import InvalidTensorError, NotReadyError

from .admission import Admission, OverloadedError
from .cache import ByteLRU, text_bytes
from .config import Settings
from .health import Readiness
from .images import ImageBatch, ImageStore
from .ledger import KeyRecord, Ledger
from .metering import Metering
from .model import PromptedCLIP
from .outputs import Degradation, derive_outputs
from .plan import Planner, RequestPlan
from .policy import OutputPolicy, apply_policy, parse_policy, stricter
from .replies import Replies, check_same_request

log = logging.getLogger(__name__)

PREPROCESS_PIXELS = 2**24  # input pixels preprocessed at once (bounds the processor's float copies)
PROBE_SCOPE = -1  # the probe's images live apart from every key's


@dataclass
class InferenceResult:
    outputs: dict[str, np.ndarray]
    usage: p.Usage
    replayed: bool = False  # answered from the idempotency cache, charged nothing this time
    queue_s: float = 0.0  # waiting for the model
    forward_s: float = 0.0  # running it
    binary: dict[str, bool] = field(default_factory=dict)  # output name -> binary on the wire
    total: p.UsageReport | None = None  # the key's totals after this request


def _tensor(array: np.ndarray | None, model: PromptedCLIP) -> torch.Tensor | None:
    """A float32 (wire: FP32 or FP16) array as a tensor in the served dtype, on the model's device."""
    return None if array is None else torch.from_numpy(array.astype(np.float32)).to(model.device, model.dtype)


def _replayed(kept: InferenceResult) -> InferenceResult:
    return InferenceResult(kept.outputs, kept.usage, replayed=True, binary=kept.binary)


class InferenceService:
    """Validate, meter, forward. One model; device work (preprocessing too) takes turns through ``Admission``."""

    def __init__(self, model: PromptedCLIP, settings: Settings, ledger: Ledger | None = None) -> None:
        self.model = model
        self.settings = settings
        self.ledger = ledger or Ledger()
        self.metering = Metering(self.ledger)
        self.planner = Planner(model, settings)
        self.images = ImageStore(settings.image_cache_bytes)
        # Unprompted text features [1, C, E] per class-text set: vision-only tuning runs the text tower once.
        self.text_features: ByteLRU[tuple[str, ...], torch.Tensor] = ByteLRU(
            settings.text_cache_bytes, lambda t: t.numel() * t.element_size(), text_bytes
        )
        self.admission = Admission(settings.max_queue, settings.request_timeout_s)
        self.replies: Replies[InferenceResult] = Replies(
            settings.reply_cache_bytes, settings.reply_ttl_s, settings.request_timeout_s, lambda r: r.outputs
        )
        self.readiness = Readiness()  # the latest forward's outcome (see health.py)
        self.policy = parse_policy(settings.outputs)  # server-wide; a key's own policy can only narrow it
        self.degradation = Degradation(settings.output_noise, settings.output_decimals, settings.output_noise_seed)

    @property
    def limits(self) -> p.PromptLimits:
        """The served model's prompt limits (what validation checks against)."""
        return self.planner.limits

    @limits.setter
    def limits(self, value: p.PromptLimits) -> None:
        self.planner.limits = value

    # --- keys ------------------------------------------------------------------------------------

    def authenticate(self, token: str) -> KeyRecord | None:
        return self.ledger.authenticate(token)

    def key(self, name: str) -> KeyRecord:
        return self.ledger.key(name)

    def usage_report(self, key: KeyRecord) -> p.UsageReport:
        return self.metering.report(key)

    def output_policy(self, key: KeyRecord) -> OutputPolicy:
        """The stricter of the server's output policy and the key's own (server/policy.py)."""
        return self.policy if key.outputs is None else stricter(self.policy, parse_policy(key.outputs))

    # --- uploads ---------------------------------------------------------------------------------

    def upload(self, arrays: dict[str, np.ndarray], key: KeyRecord | None = None) -> p.ImageUploadResponse:
        """Store a batch for ``key`` (its own scope: ``cached`` and the id mean nothing to other keys)."""
        unknown = sorted(set(arrays) - {p.IMAGES})
        if unknown or p.IMAGES not in arrays:
            raise InvalidTensorError(f"an upload carries exactly one input '{p.IMAGES}'; received {sorted(arrays)}")
        images = self.planner.check_images(arrays[p.IMAGES])
        scope = 0 if key is None else key.id
        batch = self.images.find(images, scope)
        cached = batch is not None
        if batch is None:
            batch, cached = self.images.put(images, self._preprocess_in_turns, scope)
        return p.ImageUploadResponse(image_batch=batch.id, num_images=batch.num_images, cached=cached)

    def _preprocess(self, images: np.ndarray, turns: bool = False) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` -> ``[N, 3, S, S]`` on the model's device, a bounded number of pixels at a
        time; with ``turns`` each chunk takes its own turn on the device (a big upload does not hold it)."""
        per = max(1, PREPROCESS_PIXELS // (images.shape[1] * images.shape[2]))
        parts = []
        for i in range(0, images.shape[0], per):
            if turns:
                with self.admission.slot():  # preprocessing is work: it takes its turn with the forwards
                    parts.append(self.model.preprocess(images[i : i + per]))
            else:
                parts.append(self.model.preprocess(images[i : i + per]))
        return torch.cat(parts).to(self.model.device)

    def _preprocess_in_turns(self, images: np.ndarray) -> torch.Tensor:
        return self._preprocess(images, turns=True)

    # --- inference -------------------------------------------------------------------------------

    def infer(
        self, request: p.InferenceRequest, arrays: dict[str, np.ndarray], key: KeyRecord, fingerprint: str = ""
    ) -> InferenceResult:
        """Score every candidate of the request; charge ``key`` one query per candidate, exactly once.

        A request id this key used within ``reply_ttl_s`` is not charged again: answered from the reply
        cache, or recomputed for free when the ledger remembers it but the cache does not (a restart, an
        eviction). ``fingerprint`` (a hash of the body) must then match: one id, one request. After
        ``reply_ttl_s`` the id is a new request, charged again: no free recomputation past the window.
        """
        if request.id:
            slot = (key.id, request.id)
            result = self.replies.once(slot, fingerprint, lambda: self._infer_new(request, arrays, key, fingerprint),
                                       _replayed)
        else:
            result = self._infer_new(request, arrays, key, fingerprint)
        result.total = self.metering.report(key)
        return result

    def _infer_new(
        self, request: p.InferenceRequest, arrays: dict[str, np.ndarray], key: KeyRecord, fingerprint: str
    ) -> InferenceResult:
        request = apply_policy(request, p.LABELS in arrays, self.output_policy(key))  # 403 before any work
        plan = self.planner.plan(request, arrays, lambda ref: self.images.get(ref, key.id))
        charged = self.metering.answered(key, request.id, self.settings.reply_ttl_s) if request.id else None
        if charged is not None:  # answered, but the reply is not kept: recompute, do not charge again
            check_same_request(request.id or "", charged[0], fingerprint)
            with self.admission.slot():
                outputs, _ = self._execute(plan, key.id)
            return InferenceResult(outputs, p.Usage(candidates=charged[1], requests=1), replayed=True,
                                   binary=plan.binary)
        with self.metering.charge(key, plan.population, request.id, fingerprint) as bill:
            with self.admission.slot() as queue_s:
                start = time.perf_counter()
                outputs, bill.image_forwards = self._execute(plan, key.id)
                forward_s = time.perf_counter() - start
        return InferenceResult(outputs, bill.usage, queue_s=queue_s, forward_s=forward_s, binary=plan.binary)

    def cache_stats(self) -> dict[str, tuple[int, int]]:
        """(hits, misses) of each cache."""
        caches = {"images": self.images.lru, "text_features": self.text_features, "replies": self.replies.cache}
        return {name: (c.hits, c.misses) for name, c in caches.items()}

    def probe(self) -> None:
        """One tiny forward through the request path (one image, one class, a one-vector prompt in each
        tower, loss), charged to nobody; readiness records the outcome, and a failure is raised.
        A full queue skips it: the server is busy, and the queued requests' forwards will tell."""
        try:
            with self.admission.slot():
                self._execute(self._probe_plan(), PROBE_SCOPE)
        except OverloadedError:
            log.info("readiness probe skipped: the queue is full")
        except Exception as exc:
            self.readiness.failed(f"readiness probe failed: {type(exc).__name__}: {exc}")
            raise

    def _probe_plan(self) -> RequestPlan:
        lim = self.limits
        context = np.zeros((1, 1, lim.text_width), np.float32)  # [P=1, n=1, D_t]
        prompt = np.zeros((1, 1, lim.vision_width), np.float32) if lim.max_visual_prompt else None  # [1, 1, D_v]
        texts = ["a probe."]
        return RequestPlan(1, 1, texts, self.model.tokenize(texts), context, prompt, np.zeros(1, np.int64), {p.LOSS},
                           self.planner.parameters({}, context),
                           images=np.zeros((1, lim.image_size, lim.image_size, 3), np.uint8))

    # --- the device section (inside admission.slot) ----------------------------------------------

    def _execute(self, plan: RequestPlan, scope: int) -> tuple[dict[str, np.ndarray], int]:
        """Outputs by name and the images that went through the vision tower. Inline images are
        preprocessed here, inside the slot: preprocessing is work like the forward."""
        batch = plan.batch
        if batch is None:
            assert plan.images is not None
            batch, _ = self.images.put(plan.images, self._preprocess, scope, must_store=False)
        logits, forwards = self._run(plan, batch, scope)
        degradation = self.degradation.stricter(plan.params["output_noise"], plan.params["output_decimals"])
        noisy = degradation.noisy(logits, scope, plan.request_id)  # before anything is derived
        return derive_outputs(noisy, plan, degradation), forwards

    def _run(self, plan: RequestPlan, batch: ImageBatch, scope: int) -> tuple[torch.Tensor, int]:
        """Forward with out-of-memory recovery: free the cache, halve the micro-batch, try again."""
        model = self.model
        while True:
            try:
                logits, forwards = self._forward(plan, batch, scope)
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
        return logits, forwards

    def _forward(self, plan: RequestPlan, batch: ImageBatch, scope: int) -> tuple[torch.Tensor, int]:
        """Logits ``[P, N, C]`` and the number of images that went through the vision tower."""
        model, context, prompt, params = self.model, plan.context, plan.prompt, plan.params
        ctx = None
        if context is not None:
            ctx = torch.from_numpy(context.astype(np.float32)).to(model.device, model.dtype)
            if params["context_init"]:
                ctx = ctx + model.context_init(params["context_init"], ctx.shape[-2])  # every class's context
        names = tuple(plan.class_texts)
        text = self.text_features.get(names) if ctx is None else None
        if text is None:
            try:
                text = model.encode_text(plan.tokens, ctx, deep=_tensor(plan.text_deep, model),
                                         deep_mode=params.get("deep_prompt_mode", "replace"))
            except ValueError as exc:
                raise InvalidTensorError(f"input '{p.CLASS_NAMES}': {exc}") from None
            if ctx is None:
                self.text_features.put(names, text)
        if prompt is not None:
            vp = torch.from_numpy(prompt.astype(np.float32))
            image = model.encode_images(batch.pixel_values, vp, params["visual_prompt_position"],
                                        deep=_tensor(plan.visual_deep, model),
                                        deep_mode=params.get("deep_prompt_mode", "replace"))
            forwards = image.shape[0] * batch.num_images
        elif batch.features is not None:
            image, forwards = batch.features, 0
        else:
            image, forwards = model.encode_images(batch.pixel_values), batch.num_images
            self.images.remember_features(batch, image, scope)
        return model.logits(image, text), forwards
