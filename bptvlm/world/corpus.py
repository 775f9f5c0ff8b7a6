"""Captioned pretraining pairs: scene sampling, caption language, hard-negative groups, tokenizer.

Captions always describe what is drawn, with some attributes left out at random so that short
phrases ("a photo of a red shape.") are also in the language the model learns:

    "a large red circle on brick."   "three blue stars."   "a photo of a green digit 7 on dots."
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from bptvlm.server.bpe import assemble_bpe
from bptvlm.world.render import BACKGROUNDS, COLOURS, COUNT_WORDS, SHAPES, Scene, digit_pool, render

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<start_of_text>", "<end_of_text>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0..3: eos is 3, never the legacy 2

_PLURAL = {"cross": "crosses"}
N_DIGIT_VOCAB = 10  # digit labels used when sampling captions for the tokenizer


@dataclass(frozen=True)
class CorpusConfig:
    """Mixture of pretraining scenes and caption dropout rates."""

    p_digit: float = 0.2
    p_single: float = 0.75  # among shape scenes; the rest show 2-4 copies
    p_large: float = 0.75  # among single shapes: 45% of all scenes are one large shape, which teaches shape
    p_drop_colour: float = 0.15
    p_drop_shape: float = 0.1  # "shape"/"shapes" instead of the shape name
    p_drop_background: float = 0.2
    p_photo_prefix: float = 0.5  # "a photo of ..."
    hard_negative_fraction: float = 0.25  # of each batch, in groups of `group_size` minimal pairs
    group_size: int = 4
    # which attribute a minimal pair changes (background, shape, count, colour): shape is the hardest
    vary_weights: tuple[float, float, float, float] = (0.2, 0.4, 0.2, 0.2)


def sample_scene(rng: np.random.Generator, cfg: CorpusConfig, n_digits: int) -> tuple[Scene, int]:
    """A random pretraining scene and the index of its digit glyph (-1 for shape scenes)."""
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    if rng.random() < cfg.p_digit:
        idx = int(rng.integers(n_digits))
        return Scene(kind="digit", colour=colour, background=bg), idx
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    if rng.random() < cfg.p_single:
        size = "large" if rng.random() < cfg.p_large else "small"
        return Scene(kind="shapes", colour=colour, background=bg, shape=shape, count=1, size=size), -1
    return Scene(kind="shapes", colour=colour, background=bg, shape=shape, count=int(rng.integers(2, 5))), -1


def caption(scene: Scene, rng: np.random.Generator, cfg: CorpusConfig, digit: int = 0) -> str:
    """One caption for `scene` (lower case, words and a final full stop)."""
    colour = "" if rng.random() < cfg.p_drop_colour else scene.colour + " "
    if scene.kind == "digit":
        obj = f"a {colour}digit {digit}"
    else:
        generic = rng.random() < cfg.p_drop_shape
        if scene.count == 1:
            noun = "shape" if generic else scene.shape
            obj = f"a {scene.size} {colour}{noun}"
        else:
            noun = "shapes" if generic else _PLURAL.get(scene.shape, scene.shape + "s")
            obj = f"{COUNT_WORDS[scene.count - 1]} {colour}{noun}"
    if rng.random() < cfg.p_photo_prefix:
        obj = "a photo of " + obj
    if rng.random() >= cfg.p_drop_background:
        obj += f" on {scene.background}"
    return obj + "."


def _vary(scene: Scene, rng: np.random.Generator, n_digits: int,
          weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)) -> tuple[Scene, int | None]:
    """A minimal pair of `scene`: one attribute changed (digit index None = keep the glyph)."""
    if scene.kind == "digit":
        if rng.random() < 0.5:
            return dataclasses.replace(scene, background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]), None
        return scene, int(rng.integers(n_digits))
    attr = ("background", "shape", "count", "colour")[int(rng.choice(4, p=np.asarray(weights) / sum(weights)))]
    if attr == "background":
        return dataclasses.replace(scene, background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]), None
    if attr == "shape":
        return dataclasses.replace(scene, shape=SHAPES[int(rng.integers(len(SHAPES)))]), None
    if attr == "colour":
        return dataclasses.replace(scene, colour=list(COLOURS)[int(rng.integers(len(COLOURS)))]), None
    count = int(rng.integers(1, 5))
    return dataclasses.replace(scene, count=count, size="small" if count == 1 else scene.size), None


class PairSampler:
    """Draws batches of (uint8 images [B, 32, 32, 3], captions) from its own seeded generator."""

    def __init__(self, seed: int, cfg: CorpusConfig | None = None) -> None:
        self.cfg = cfg or CorpusConfig()
        self.rng = np.random.default_rng([seed, 7])
        self.digits, self.digit_labels = digit_pool("pretrain")

    def _one(self, scene: Scene, idx: int) -> tuple[np.ndarray, str]:
        glyph = self.digits[idx] if scene.kind == "digit" else None
        digit = int(self.digit_labels[idx]) if scene.kind == "digit" else 0
        return render(scene, self.rng, "pretrain", glyph), caption(scene, self.rng, self.cfg, digit)

    def batch(self, size: int) -> tuple[np.ndarray, list[str]]:
        images, texts = [], []
        n_group = int(size * self.cfg.hard_negative_fraction) // self.cfg.group_size
        for _ in range(n_group):
            base, idx = sample_scene(self.rng, self.cfg, len(self.digits))
            for k in range(self.cfg.group_size):
                scene, new_idx = ((base, None) if k == 0
                                  else _vary(base, self.rng, len(self.digits), self.cfg.vary_weights))
                img, text = self._one(scene, idx if new_idx is None else new_idx)
                images.append(img)
                texts.append(text)
        while len(images) < size:
            scene, idx = sample_scene(self.rng, self.cfg, len(self.digits))
            img, text = self._one(scene, idx)
            images.append(img)
            texts.append(text)
        return np.stack(images), texts


# --------------------------------------------------------------------------- tokenizer


def _learn_merges(word_counts: dict[str, int], n_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned deterministically (ties broken by the pair's text).

    The `tokenizers` BPE trainer breaks ties in hash-map order, which changes from process to process,
    so the same seed gave different vocabularies; this corpus has a few dozen word types, so a plain
    Python trainer is instant and reproducible.
    """
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): c for w, c in word_counts.items()}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: dict[tuple[str, str], int] = {}
        for symbols, c in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] = pairs.get(pair, 0) + c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for symbols, c in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = c
        words = merged
    return merges


def train_tokenizer(seed: int, vocab_size: int = 512, n_captions: int = 20000) -> PreTrainedTokenizerFast:
    """A lowercase BPE (`</w>` word ends) trained on sampled captions, with start/end/pad tokens.

    Pre-tokenisation splits on whitespace and punctuation, so tokenising "a photo of a" and
    "circle." separately and concatenating equals tokenising "a photo of a circle.". Every letter,
    digit and common punctuation mark is in the vocabulary, so unseen words (synonyms) still encode.
    Deterministic: the same seed gives the same vocabulary and ids in every process.
    """
    cfg = CorpusConfig()
    rng = np.random.default_rng([seed, 11])
    pre = pre_tokenizers.Whitespace()
    counts: dict[str, int] = {}
    for _ in range(n_captions):
        scene, _ = sample_scene(rng, cfg, N_DIGIT_VOCAB)
        for word, _ in pre.pre_tokenize_str(caption(scene, rng, cfg, digit=int(rng.integers(10)))):
            counts[word] = counts.get(word, 0) + 1
    alphabet = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'\"-_/()&+"))
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = _learn_merges(dict(sorted(counts.items())), vocab_size - len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    return assemble_bpe(vocab, merges, bos=BOS, eos=EOS, pad=PAD, unk=UNK, normalizer=normalizer)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    tokenizer.save_pretrained(out_dir)
