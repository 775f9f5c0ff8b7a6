"""Where the served CLIP comes from: a seeded tiny random model, the embedded model, a directory or the hub."""

from __future__ import annotations

import importlib.util
import logging
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import normalizers, pre_tokenizers
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPImageProcessorPil,
    CLIPModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .bpe import assemble_bpe

log = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"

# Without torchvision transformers falls back to its PIL processor (identical output); ask for it directly.
ImageProcessor = CLIPImageProcessor if importlib.util.find_spec("torchvision") else CLIPImageProcessorPil

_TINY_CORPUS = (
    "a photo of a {}. a picture of the {}. an image of one small large red green blue cat dog car "
    "circle square triangle star digit zero one two three four five six seven eight nine"
)


@dataclass
class LoadedModel:
    """A frozen CLIP and the preprocessing that belongs to it."""

    model: CLIPModel
    tokenizer: PreTrainedTokenizerBase
    image_processor: CLIPImageProcessor | CLIPImageProcessorPil
    model_id: str


def build_word_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A lowercase BPE with a ``</w>`` word suffix: one merge chain per corpus word, characters otherwise.

    Built from explicit merges rather than trained, so every process gets the same ids. Words are
    split on whitespace and punctuation first, so the tokens of "a photo of a" followed by the tokens
    of "dog." equal the tokens of "a photo of a dog.".
    """
    alphabet = string.ascii_lowercase + string.digits + string.punctuation
    vocab: dict[str, int] = {}
    for token in [BOS, EOS, PAD, UNK, *alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    splitter = pre_tokenizers.Whitespace()
    words = sorted({w for text in corpus for w, _ in splitter.pre_tokenize_str(text.lower())})
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        if not all(s in vocab for s in symbols):
            continue
        left = symbols[0]
        for right in symbols[1:]:
            if left + right not in vocab:
                merges.append((left, right))
                vocab[left + right] = len(vocab)
            left = left + right
    return assemble_bpe(vocab, merges, bos=BOS, eos=EOS, pad=PAD, unk=UNK,
                        normalizer=normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()]))


def tiny_random_clip(seed: int = 0, layers: int = 2) -> LoadedModel:
    """A small random-weight CLIP (32 px, patch 8, width 32, ``layers`` per tower) for tests and smoke runs."""
    tokenizer = build_word_tokenizer([_TINY_CORPUS])
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    processor = ImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    )
    return LoadedModel(model, tokenizer, processor, model_id=f"tiny-random(seed={seed})")


def random_vit_b32(seed: int = 0) -> LoadedModel:
    """Random weights in the real ViT-B/32 CLIP shape (224 px, widths 512/768, 12+12 layers, 77 tokens).

    For measuring speed at the paper's model size where no checkpoint can be downloaded.
    """
    tokenizer = build_word_tokenizer([_TINY_CORPUS])
    tokenizer.model_max_length = 77
    config = CLIPConfig(
        text_config=dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(image_size=224, patch_size=32),
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    processor = ImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return LoadedModel(model, tokenizer, processor, model_id=f"random-vit-b32(seed={seed})")


def load_pretrained(source: str | Path) -> LoadedModel:
    """A ``save_pretrained`` directory or a hub id (the hub only where it is reachable)."""
    source = str(source)
    model = CLIPModel.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    processor = ImageProcessor.from_pretrained(source)
    _check_special_tokens(model, tokenizer, source)
    return LoadedModel(model, tokenizer, processor, model_id=source)


def _check_special_tokens(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    # Prompted text is assembled from the tokenizer's BOS/EOS; pooling happens at EOS.
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(f"{source}: the tokenizer has no bos/eos token; prompted text cannot be built")
    eos_cfg = model.config.text_config.eos_token_id
    if eos_cfg not in (2, tokenizer.eos_token_id):
        log.warning("%s: text_config.eos_token_id=%s differs from the tokenizer's %s", source, eos_cfg,
                    tokenizer.eos_token_id)


def load_model(spec: str, *, seed: int = 0) -> LoadedModel:
    """Resolve ``--model``: 'tiny-random', 'random-vit-b32', 'embedded', a local directory, or a hub id."""
    if spec == "tiny-random":
        return tiny_random_clip(seed)
    if spec == "random-vit-b32":
        return random_vit_b32(seed)
    if spec == "embedded":
        if not (EMBEDDED_DIR / "config.json").is_file():
            raise FileNotFoundError(f"the embedded model is missing from {EMBEDDED_DIR}; run `bptvlm model build`")
        loaded = load_pretrained(EMBEDDED_DIR)
        loaded.model_id = "embedded"
        return loaded
    path = Path(spec).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a save_pretrained CLIP directory")
    return load_pretrained(path if path.exists() else spec)
