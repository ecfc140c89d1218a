"""Prompt -> text encoder states for Infinity (the Flan-T5 encoder), from a local directory only.

The released models read Flan-T5-XL's encoder (2048 channels) at up to 512 tokens. A prompt is
tokenized (EOS appended, truncated to ``max_length``), encoded with its attention mask, and the
padding is dropped: each prompt gives a tensor [T_i, d_model], which is what
``Infinity.condition`` and ``TextImageRequest.text`` take. Nothing is downloaded: ``path`` must
hold a saved ``T5EncoderModel`` (or full T5) and its tokenizer. Needs the optional
``infinity`` extra (``transformers``).
"""

from __future__ import annotations

from pathlib import Path

import torch


class TextEncoder:
    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_length: int = 512) -> None:
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the text encoder needs transformers: pip install 'scalekv[infinity]'") from e
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder directory not found: {path} (nothing is downloaded)")
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(str(path), local_files_only=True)
        self.model = self.model.to(device=device, dtype=dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def channels(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """Prompts -> one float32 tensor [T_i, d_model] each (real tokens only, EOS included).
        A prompt's states do not depend on the others in the batch (padding is masked)."""
        if not prompts:
            return []
        batch = self.tokenizer(list(prompts), max_length=self.max_length, padding="longest", truncation=True,
                               return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        lens = mask.sum(dim=-1).tolist()
        if min(lens) < 1:
            raise ValueError("a prompt encoded to no tokens")
        return [hidden[i, :n].cpu() for i, n in enumerate(lens)]
