r"""Prompt -> text conditioning, encoded the way the web-UIs encode at inference.

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
- Emphasis, as the hosts' default "Original" emphasis reads it: ``(word)`` x1.1, ``[word]``
  /1.1, ``(word:1.3)``, ``\(`` for a literal bracket, ``BREAK`` to start a new chunk; each text
  piece is tokenised on its own, and a chunk's hidden states are multiplied by their tokens'
  weights, then rescaled to the chunk's mean before weighting (per prompt: generation encodes one
  prompt at a time). ``bundle.text_options`` says which emphasis and clip skip the host uses.
- Clip skip n > 1: SD1 takes hidden layer -n through the final layer norm (both hosts); SDXL
  takes layer -max(n, 2) where the host does (Forge, standalone), else the penultimate (A1111).

transformers' tokenizer has no A1111-style chunking or emphasis, hence the small hand-written
splitter and parser (diffusers has neither; compel is a different syntax).

The flow-matching transformers are encoded as their diffusers pipelines (and the UIs, which follow
the original code) encode, with no chunking or emphasis:

- Flux: T5's last hidden state of the prompt padded to 512 tokens (the model's ``max_sequence_length``,
  or the tokenizer's ``model_max_length`` if smaller) is the context; CLIP-L's pooled output of the
  77-token prompt is the pooled vector.
- Z-Image: the prompt wrapped in the Qwen3 chat template (user turn, generation prompt, thinking on),
  the encoder's second-to-last hidden layer, real tokens only (``mask`` marks them; padding tokens
  are never seen by the model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from trainer.bundle import TextOptions

CHUNK = 75
COMMA_BACKTRACK = 20
BREAK = ("BREAK", -1.0)  # a parsed BREAK: the next piece starts a new chunk
_SPECIAL = "\\()[]"
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass
class Conditioning:
    """Encoder hidden states (B, 77*k, D) and, for SDXL, the pooled embedding (B, 1280).

    ``mask`` (B, L) bool marks the real tokens of variable-length contexts (Z-Image); None means
    every position counts."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> "Conditioning":
        return Conditioning(
            self.hidden.to(device=device, dtype=dtype),
            None if self.pooled is None else self.pooled.to(device=device, dtype=dtype),
            None if self.mask is None else self.mask.to(device=device),
        )

    def index(self, idx) -> "Conditioning":
        return Conditioning(self.hidden[idx], None if self.pooled is None else self.pooled[idx],
                            None if self.mask is None else self.mask[idx])

    @staticmethod
    def cat(items: list["Conditioning"], pad: "Conditioning | None" = None) -> "Conditioning":
        """Concatenate along the batch; shorter prompts are padded with ``pad`` (the encoded
        empty prompt, one 77-token chunk), as the hosts pad with empty chunks."""
        longest = max(c.hidden.shape[1] for c in items)
        if items[0].mask is not None:  # variable-length contexts: zero padding, masked out
            hidden, masks = [], []
            for c in items:
                extra = longest - c.hidden.shape[1]
                hidden.append(torch.nn.functional.pad(c.hidden, (0, 0, 0, extra)))
                masks.append(torch.nn.functional.pad(c.mask, (0, extra), value=False))
            pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items])
            return Conditioning(torch.cat(hidden), pooled, torch.cat(masks))
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


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """A prompt as (text, weight) pieces, read as the web-UIs read emphasis.

    ``(a)`` multiplies a's weight by 1.1, ``[a]`` divides it by 1.1, ``(a:1.3)`` multiplies it by
    1.3; brackets nest and multiply; one left open applies to the rest of the prompt; a closing
    bracket without an opening one is text. ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the
    literal characters (any other backslash is dropped). ``BREAK`` as a word becomes the
    :data:`BREAK` piece. Neighbouring pieces of equal weight are joined; "" gives ``[("", 1.0)]``.
    """
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            nxt = text[i + 1] if i + 1 < len(text) else ""
            pieces.append([nxt if nxt and nxt in _SPECIAL else "", 1.0])
            i += 2 if nxt and nxt in _SPECIAL else 1
            continue
        weight = _WEIGHT.match(text, i) if ch == ":" else None
        if ch == "(":
            round_open.append(len(pieces))
        elif ch == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open and _is_number(weight.group(1)):
            scale(round_open.pop(), float(weight.group(1)))
            i = weight.end()
            continue
        elif ch == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif ch == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        elif ch in ")]:":
            pieces.append([ch, 1.0])
        else:
            end = i
            while end < len(text) and text[end] not in "\\()[]:":
                end += 1
            for n, part in enumerate(_BREAK_WORD.split(text[i:end])):
                if n:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
            i = end
            continue
        i += 1
    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def split_chunks(units: list, comma_id: int | None) -> list[list]:
    """Split a prompt's tokens (no BOS/EOS) into chunks of at most 75, as the web-UIs do.

    A unit is one token (an id, or an ``(id, ...)`` tuple carrying more about it), ``None`` for a
    BREAK (the chunk ends there), or a list of tokens that must stay in one chunk (an
    embedding's vectors). A chunk that fills up moves what follows its last comma to the next
    chunk when that comma lies within the last 20 tokens."""
    chunks: list[list] = []
    current: list = []
    last_comma = -1

    def close() -> None:
        nonlocal current, last_comma
        chunks.append(current)
        current, last_comma = [], -1

    for unit in units:
        if unit is None:
            close()
            continue
        first = unit[0] if isinstance(unit, list) else unit
        tok = first[0] if isinstance(first, tuple) else first
        if comma_id is not None and tok == comma_id and not isinstance(unit, list):
            last_comma = len(current)
        elif len(current) == CHUNK and last_comma >= 0 and CHUNK - last_comma <= COMMA_BACKTRACK:
            carry = current[last_comma + 1:]
            current = current[: last_comma + 1]
            close()
            current = carry
        if len(current) == CHUNK or isinstance(unit, list) and len(current) + len(unit) > CHUNK:
            close()
        current += unit if isinstance(unit, list) else [unit]
    if current or not chunks:
        close()
    return chunks


EMBEDDING_FILES = (".pt", ".bin", ".safetensors")


def load_embeddings(folder, widths: list[int]) -> tuple[dict[str, list[torch.Tensor]], list[str]]:
    """Textual-inversion embeddings under ``folder`` (and its sub-folders), as the web UIs read
    them: name = file stem; a file holds one (n, width) tensor (A1111's ``string_to_param``, a
    single-tensor ``emb_params``/diffusers file) or, for SDXL, ``clip_l`` and ``clip_g``.

    ``widths`` are the text encoders' embedding widths. Returns ({name: one (n, width) tensor per
    encoder}, notes on files that were skipped and why). ``.pt`` files are read with
    ``weights_only`` (no code runs); one that needs more is skipped with a note.
    """
    from pathlib import Path

    found: dict[str, list[torch.Tensor]] = {}
    notes: list[str] = []
    root = Path(folder)
    if not folder or not root.is_dir():
        return found, notes
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in EMBEDDING_FILES and p.is_file()):
        try:
            if path.suffix.lower() == ".safetensors":
                from safetensors.torch import load_file

                data = load_file(str(path))
            else:
                data = torch.load(str(path), map_location="cpu", weights_only=True)
            vectors = _embedding_vectors(data, widths)
        except Exception as error:  # one bad file must not stop the others (the hosts skip it too)
            notes.append(f"embedding {path.name} skipped: {type(error).__name__}: {error}")
            continue
        if vectors is None:
            notes.append(f"embedding {path.name} skipped: made for another model (its width does not fit)")
            continue
        found[path.stem] = vectors
    return found, notes


def _embedding_vectors(data, widths: list[int]) -> list[torch.Tensor] | None:
    if isinstance(data, dict) and "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        tensors = list(params.values())
    elif isinstance(data, dict) and "clip_l" in data and "clip_g" in data:
        tensors = [data["clip_l"], data["clip_g"]]
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        tensors = list(data.values())
    else:
        raise ValueError("not a textual-inversion embedding")
    tensors = [t.detach().float().reshape(-1, t.shape[-1]) for t in tensors]
    if len(tensors) != len(widths) or any(t.shape[-1] != w for t, w in zip(tensors, widths)):
        return None
    return tensors


class PromptEncoder:
    """Encodes prompts with a bundle's text encoders, chunked as the hosts do."""

    def __init__(self, bundle, options: TextOptions | None = None):
        self.family = bundle.family
        self.tokenizers = bundle.tokenizers
        self.encoders = bundle.text_encoders
        self.options = options or getattr(bundle, "text_options", None) or TextOptions()
        tok = self.tokenizers[0]
        self._comma = None
        self.embeddings, self.notes, self._names = {}, [], [[] for _ in self.tokenizers]
        if self.family.flow:  # T5 / Qwen3 prompts: no comma chunking, no textual-inversion embeddings
            return
        self._comma = tok.convert_tokens_to_ids(",</w>")
        if self._comma == tok.unk_token_id:
            self._comma = None
        widths = [_token_embedding(e).weight.shape[-1] for e in self.encoders]
        self.embeddings, self.notes = load_embeddings(self.options.embeddings_dir, widths)
        # name -> its token ids, per tokenizer, longest first (a longer name wins, as in the hosts)
        self._names = [sorted(((t(name, add_special_tokens=False).input_ids, name) for name in self.embeddings),
                              key=lambda item: -len(item[0])) for t in self.tokenizers]

    def _chunk_ids(self, index: int, prompt: str) -> list[list[tuple[int, float, torch.Tensor | None]]]:
        """The prompt's chunks of (token id, weight, embedding vector or None) for text encoder
        ``index``: emphasis, BREAK, embeddings and the 75-token chunks as the hosts make them (an
        embedding is never split across chunks; its positions carry placeholder id 0)."""
        tokenizer = self.tokenizers[index]
        pieces = [(prompt, 1.0)] if self.options.emphasis == "None" else parse_emphasis(prompt)
        encoded = tokenizer([text for text, _ in pieces], add_special_tokens=False, truncation=False,
                            verbose=False).input_ids
        units: list = []
        for (text, weight), ids in zip(pieces, encoded):
            if (text, weight) == BREAK:
                units.append(None)
                continue
            pos = 0
            while pos < len(ids):
                match = self._embedding_at(index, ids, pos)
                if match is None:
                    units.append((ids[pos], weight, None))
                    pos += 1
                else:
                    name_length, vectors = match
                    units.append([(0, weight, v) for v in vectors])
                    pos += name_length
        return split_chunks(units, self._comma)

    def _embedding_at(self, index: int, ids: list[int], pos: int):
        for name_ids, name in self._names[index]:
            if name_ids and ids[pos:pos + len(name_ids)] == name_ids:
                return len(name_ids), self.embeddings[name][index]
        return None

    @staticmethod
    def _wrap(tokenizer, chunk: list) -> tuple[list[int], list[float], list]:
        pad = tokenizer.pad_token_id
        body = [tokenizer.bos_token_id, *(t for t, _, _ in chunk), tokenizer.eos_token_id]
        weights = [1.0, *(w for _, w, _ in chunk), 1.0]
        vectors = [None, *(v for _, _, v in chunk), None]
        fill = CHUNK + 2 - len(body)
        return body + [pad] * fill, weights + [1.0] * fill, vectors + [None] * fill

    def _batch_ids(self, index: int, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(B, k, 77) token ids, their emphasis weights, and the (row, position, vector) of every
        embedding position; shorter prompts are padded with empty chunks."""
        tokenizer = self.tokenizers[index]
        per_prompt = [self._chunk_ids(index, p) for p in prompts]
        k = max(len(c) for c in per_prompt)
        rows, weight_rows, fixes = [], [], []
        for b, chunks in enumerate(per_prompt):
            chunks = chunks + [[]] * (k - len(chunks))
            wrapped = [self._wrap(tokenizer, c) for c in chunks]
            rows.append([ids for ids, _, _ in wrapped])
            weight_rows.append([w for _, w, _ in wrapped])
            fixes += [(b * k + c, n, v) for c, (_, _, vs) in enumerate(wrapped) for n, v in enumerate(vs)
                      if v is not None]
        return torch.tensor(rows, dtype=torch.long), torch.tensor(weight_rows, dtype=torch.float32), fixes

    def _run(self, index: int, ids: torch.Tensor, fixes: list, **kwargs):
        """Run text encoder ``index`` on (N, 77) ids, its token embeddings replaced by the
        embedding vectors at ``fixes`` (as the hosts' embedding hook does)."""
        encoder = self.encoders[index]
        if not fixes:
            return encoder(ids, **kwargs)

        def put_vectors(module, args, out):
            rows = torch.tensor([r for r, _, _ in fixes], device=out.device)
            cols = torch.tensor([c for _, c, _ in fixes], device=out.device)
            values = torch.stack([v for _, _, v in fixes]).to(out.device, out.dtype)
            return out.index_put((rows, cols), values)

        handle = _token_embedding(encoder).register_forward_hook(put_vectors)
        try:
            return encoder(ids, **kwargs)
        finally:
            handle.remove()

    def _emphasise(self, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Apply the emphasis weights to hidden states (B, k, 77, D), chunk by chunk of each prompt."""
        if self.options.emphasis in ("None", "Ignore") or bool((weights == 1.0).all()):
            return z
        weighted = z * weights.to(z.device, z.dtype)[..., None]
        if self.options.emphasis == "No norm":
            return weighted
        before = z.mean(dim=(-2, -1), keepdim=True)
        return weighted * (before / weighted.mean(dim=(-2, -1), keepdim=True))

    def encode(self, prompts: list[str]) -> Conditioning:
        """Encode a list of prompts; gradients flow when a text-encoder network is active."""
        device = next(self.encoders[0].parameters()).device
        if self.family.name == "flux":
            return self._encode_flux(prompts, device)
        if self.family.name == "zimage":
            return self._encode_zimage(prompts, device)
        if self.family.name == "sdxl":
            return self._encode_sdxl(prompts, device)
        ids, weights, fixes = self._batch_ids(0, prompts)
        b, k, n = ids.shape
        skip = self.options.clip_skip if self.family.name == "sd1" else 1
        if skip > 1:
            out = self._run(0, ids.view(b * k, n).to(device), fixes, output_hidden_states=True)
            z = _final_layer_norm(self.encoders[0])(out.hidden_states[-skip])
        else:
            z = self._run(0, ids.view(b * k, n).to(device), fixes).last_hidden_state
        z = self._emphasise(z.reshape(b, k, n, -1), weights)
        return Conditioning(z.reshape(b, k * n, -1))

    def _encode_sdxl(self, prompts: list[str], device) -> Conditioning:
        hidden, pooled = [], None
        layer = -max(self.options.clip_skip, 2) if self.options.clip_skip_sdxl else -2
        for i in range(len(self.encoders)):
            ids, weights, fixes = self._batch_ids(i, prompts)
            b, k, n = ids.shape
            out = self._run(i, ids.view(b * k, n).to(device), fixes, output_hidden_states=True)
            z = self._emphasise(out.hidden_states[layer].reshape(b, k, n, -1), weights)
            hidden.append(z.reshape(b, k * n, -1))
            if i == 1:
                pooled = out.text_embeds.reshape(b, k, -1)[:, 0]
        return Conditioning(torch.cat(hidden, dim=-1), pooled)


    def _encode_flux(self, prompts: list[str], device) -> Conditioning:
        return Conditioning(self.flux_part(prompts, "T5"), self.flux_part(prompts, "CLIP"))

    def flux_part(self, prompts: list[str], part: str) -> torch.Tensor:
        """One Flux encoder's share of the conditioning: CLIP-L's pooled embedding ("CLIP") or T5's
        hidden states ("T5"), so a run that trains one of them can cache the other's."""
        index = FLUX_ENCODERS.index(part)
        tokenizer, encoder = self.tokenizers[index], self.encoders[index]
        device = next(encoder.parameters()).device
        length = tokenizer.model_max_length if part == "CLIP" else min(FLUX_T5_LENGTH, int(tokenizer.model_max_length))
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=False)
        return out.pooler_output if part == "CLIP" else out[0]

    def _encode_zimage(self, prompts: list[str], device) -> Conditioning:
        tokenizer, encoder = self.tokenizers[0], self.encoders[0]
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the Z-Image text encoder's tokenizer has no chat template; use the tokenizer files "
                             "that come with the Qwen3 text encoder (tokenizer_config.json holds the template)")
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True) for p in prompts]
        # Right padding to the longest prompt: the encoder is causal, so the real tokens' states are
        # the same as with the pipeline's padding to 512, and the padding is dropped by the mask.
        batch = tokenizer(texts, padding="longest", max_length=ZIMAGE_TEXT_LENGTH, truncation=True,
                          padding_side="right", return_tensors="pt")
        mask = batch.attention_mask.to(device).bool()
        hidden = encoder(input_ids=batch.input_ids.to(device), attention_mask=mask,
                         output_hidden_states=True).hidden_states[-2]
        return Conditioning(hidden * mask.unsqueeze(-1).to(hidden.dtype), None, mask)


def _token_embedding(encoder):
    """A CLIP text model's token embedding (with or without transformers 4's ``text_model`` level)."""
    return getattr(encoder, "text_model", encoder).embeddings.token_embedding


def _final_layer_norm(encoder):
    """A CLIP text model's final layer norm (transformers 5 dropped the ``text_model`` level)."""
    return getattr(getattr(encoder, "text_model", encoder), "final_layer_norm")


FLUX_T5_LENGTH = 512       # FluxPipeline's max_sequence_length (dev; the longest schnell takes is 256)
FLUX_ENCODERS = ("CLIP", "T5")  # Flux's text encoders by block id, in the bundle's order
ZIMAGE_TEXT_LENGTH = 512   # ZImagePipeline's max_sequence_length


def sdxl_time_ids(original_size, crop_top_left, target_size, device=None, dtype=None) -> torch.Tensor:
    """SDXL micro-conditioning: [orig_h, orig_w, crop_top, crop_left, target_h, target_w] in pixels."""
    return torch.tensor([[*original_size, *crop_top_left, *target_size]], device=device, dtype=dtype)
