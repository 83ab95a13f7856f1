"""Prompt -> text conditioning, encoded the way the web-UIs encode at inference.

A network is only as good as the conditioning it was trained on, so captions are encoded
as A1111 and Forge encode prompts when the LoRA is used:

- Prompts longer than 75 tokens are split into 75-token chunks (breaking at the last comma
  when one lies within the last 20 tokens of a full chunk, as the web-UIs do); each chunk is
  wrapped in BOS/EOS, padded to 77, encoded on its own, and the chunk outputs are
  concatenated along the sequence. Prompts of a batch are padded to the same chunk count
  with empty chunks.
- SD1: the last hidden layer after the final layer norm.
- SD2: the OpenCLIP-H encoder as diffusers ships it has 23 of its 24 layers, so its final
  output after the final layer norm is the penultimate layer the hosts use.
- SDXL: the penultimate hidden layer (no final norm) of both encoders, concatenated to 2048
  features; the pooled vector is CLIP-G's projected EOS embedding of the first chunk.

transformers' tokenizer has no A1111-style chunking, hence the small hand-written splitter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 75
COMMA_BACKTRACK = 20


@dataclass
class Conditioning:
    """Encoder hidden states (B, 77*k, D) and, for SDXL, the pooled embedding (B, 1280)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> "Conditioning":
        return Conditioning(
            self.hidden.to(device=device, dtype=dtype),
            None if self.pooled is None else self.pooled.to(device=device, dtype=dtype),
        )

    def index(self, idx) -> "Conditioning":
        return Conditioning(self.hidden[idx], None if self.pooled is None else self.pooled[idx])

    @staticmethod
    def cat(items: list["Conditioning"], pad: "Conditioning | None" = None) -> "Conditioning":
        """Concatenate along the batch; shorter prompts are padded with ``pad`` (the encoded
        empty prompt, one 77-token chunk), as the hosts pad with empty chunks."""
        longest = max(c.hidden.shape[1] for c in items)
        hidden = []
        for c in items:
            h = c.hidden
            if h.shape[1] < longest:
                if pad is None:
                    raise ValueError("prompts of different chunk counts need the empty-prompt padding")
                reps = (longest - h.shape[1]) // pad.hidden.shape[1]
                h = torch.cat([h, pad.hidden.expand(h.shape[0], -1, -1).repeat(1, reps, 1)], dim=1)
            hidden.append(h)
        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items])
        return Conditioning(torch.cat(hidden), pooled)


def split_chunks(token_ids: list[int], comma_id: int | None) -> list[list[int]]:
    """Split prompt token ids (no BOS/EOS) into chunks of at most 75, as the web-UIs do."""
    chunks: list[list[int]] = []
    current: list[int] = []
    last_comma = -1
    for tok in token_ids:
        if comma_id is not None and tok == comma_id:
            last_comma = len(current)
        if len(current) == CHUNK:
            if last_comma >= 0 and CHUNK - last_comma <= COMMA_BACKTRACK:
                carry = current[last_comma + 1:]
                chunks.append(current[: last_comma + 1])
                current = carry
            else:
                chunks.append(current)
                current = []
            last_comma = -1
        current.append(tok)
    if current or not chunks:
        chunks.append(current)
    return chunks


class PromptEncoder:
    """Encodes prompts with a bundle's text encoders, chunked as the hosts do."""

    def __init__(self, bundle):
        self.family = bundle.family
        self.tokenizers = bundle.tokenizers
        self.encoders = bundle.text_encoders
        tok = self.tokenizers[0]
        self._comma = tok.convert_tokens_to_ids(",</w>")
        if self._comma == tok.unk_token_id:
            self._comma = None

    def _chunk_ids(self, tokenizer, prompt: str) -> list[list[int]]:
        ids = tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False).input_ids
        return split_chunks(ids, self._comma)

    @staticmethod
    def _wrap(tokenizer, chunk: list[int]) -> list[int]:
        pad = tokenizer.pad_token_id
        body = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
        return body + [pad] * (CHUNK + 2 - len(body))

    def _batch_ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        """(B, k, 77) token ids; shorter prompts are padded with empty chunks."""
        per_prompt = [self._chunk_ids(tokenizer, p) for p in prompts]
        k = max(len(c) for c in per_prompt)
        rows = []
        for chunks in per_prompt:
            chunks = chunks + [[]] * (k - len(chunks))
            rows.append([self._wrap(tokenizer, c) for c in chunks])
        return torch.tensor(rows, dtype=torch.long)

    def encode(self, prompts: list[str]) -> Conditioning:
        """Encode a list of prompts; gradients flow when a text-encoder network is active."""
        device = next(self.encoders[0].parameters()).device
        if self.family.name == "sdxl":
            return self._encode_sdxl(prompts, device)
        ids = self._batch_ids(self.tokenizers[0], prompts).to(device)
        b, k, n = ids.shape
        out = self.encoders[0](ids.view(b * k, n)).last_hidden_state
        return Conditioning(out.reshape(b, k * n, -1))

    def _encode_sdxl(self, prompts: list[str], device) -> Conditioning:
        hidden, pooled = [], None
        for i, (tokenizer, encoder) in enumerate(zip(self.tokenizers, self.encoders)):
            ids = self._batch_ids(tokenizer, prompts).to(device)
            b, k, n = ids.shape
            out = encoder(ids.view(b * k, n), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].reshape(b, k * n, -1))
            if i == 1:
                pooled = out.text_embeds.reshape(b, k, -1)[:, 0]
        return Conditioning(torch.cat(hidden, dim=-1), pooled)


def sdxl_time_ids(original_size, crop_top_left, target_size, device=None, dtype=None) -> torch.Tensor:
    """SDXL micro-conditioning: [orig_h, orig_w, crop_top, crop_left, target_h, target_w] in pixels."""
    return torch.tensor([[*original_size, *crop_top_left, *target_size]], device=device, dtype=dtype)
