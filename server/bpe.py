"""One BPE tokenizer assembly for the project's own vocabularies (``tiny-random`` and the embedded model).

Lowercase after ``normalizer``, split on whitespace and punctuation, ``</w>`` word ends, ``[BOS] text
[EOS]``: so the tokens of "a photo of a" followed by those of "dog." equal the tokens of "a photo of a
dog.", which the prompted text path relies on.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


def assemble_bpe(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    *,
    bos: str,
    eos: str,
    pad: str,
    unk: str,
    normalizer: normalizers.Normalizer,
    model_max_length: int = 32,
) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` over ``vocab``/``merges`` with the special tokens given."""
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, end_of_word_suffix="</w>"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
                                   model_max_length=model_max_length)  # fmt: skip
