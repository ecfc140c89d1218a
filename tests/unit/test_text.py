"""engine.text: a tiny randomly initialised T5 encoder and a locally built tokenizer, end to end
into the micro Infinity model. Nothing is downloaded."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<pad>", "</s>", "<unk>", "a", "red", "cat", "dog", "on", "the", "grass", "blue", "sky"]
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    cfg = transformers.T5Config(vocab_size=len(words), d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(cfg)
    path = tmp_path_factory.mktemp("t5")
    model.save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path


def test_prompts_encode_per_prompt_and_drive_infinity(encoder_dir):
    from engine.infinity_reference import TextImageRequest, generate_infinity_reference
    from engine.models.registry import build_infinity
    from engine.text import TextEncoder

    enc = TextEncoder(encoder_dir)
    assert enc.channels == 32
    out = enc.encode(["a red cat", "a blue dog on the grass"])
    assert [tuple(t.shape) for t in out] == [(4, 32), (7, 32)]  # words + EOS, padding dropped
    alone = enc.encode(["a red cat"])[0]
    torch.testing.assert_close(alone, out[0], atol=1e-5, rtol=1e-5)  # padding never leaks in
    loaded = build_infinity("infinity-micro", random_init=True)
    res = generate_infinity_reference(loaded, [TextImageRequest(text=t, seed=i) for i, t in enumerate(out)])
    assert [r.image.shape for r in res] == [(8, 8, 3), (8, 8, 3)]


def test_missing_directory_never_downloads(tmp_path):
    from engine.text import TextEncoder

    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        TextEncoder(tmp_path / "flan-t5-xl")
