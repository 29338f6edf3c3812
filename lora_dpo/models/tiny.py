"""The small parts every tiny random-weight pipeline shares: a byte-level CLIP tokenizer and a small CLIP text config.

No hub access. The tiny pipelines themselves (SD1.5-style and SDXL-style, for the tests and the offline demo) are
built by their families (:meth:`lora_dpo.models.families.base.ModelFamily.build_tiny_components`) and saved by
:func:`lora_dpo.models.archs.save_tiny_pipeline`.
"""

from __future__ import annotations

from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTokenizer

TOKENIZER_MAX_LENGTH = 32


def build_tokenizer(max_length: int = TOKENIZER_MAX_LENGTH) -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with a character vocabulary (516 tokens) and no download.

    Every byte is a token (with and without the ``</w>`` end-of-word suffix), plus a few merges, so any caption
    tokenizes; ids 0/1 are ``<|startoftext|>``/``<|endoftext|>`` (the end token also pads, as in CLIP).
    """
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "f</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def text_config(vocab_size: int, hidden: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    """A small ``CLIPTextConfig`` (3 layers, 4 heads, ``TOKENIZER_MAX_LENGTH`` positions)."""
    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=3, vocab_size=vocab_size,
        max_position_embeddings=TOKENIZER_MAX_LENGTH, hidden_act="gelu", projection_dim=projection_dim,
    )
