"""A tiny randomly initialised T5 encoder and a locally built word-level tokenizer, saved to a
directory that ``engine.text.TextEncoder`` (and ``--text-encoder``) reads. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

WORDS = ("<pad>", "</s>", "<unk>", "a", "an", "red", "blue", "green", "cat", "dog", "ring", "disk", "on", "the",
         "grass", "sky", "over", "sea", "small", "big", "photo", "of", "blurry", "dark")


def write_tiny_t5(path: str | Path, d_model: int = 32, seed: int = 0) -> Path:
    """Save the encoder (``d_model`` channels: infinity-micro reads 32) and its tokenizer to ``path``."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    path = Path(path)
    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    cfg = transformers.T5Config(vocab_size=len(WORDS), d_model=d_model, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path
