"""The frozen captioner in torch: a learned projection of CLIP image features to the decoder's input
space and a T5-family encoder-decoder built with transformers' own T5 modules from the bundle's
tensors. Soft prompts [N,P,d] are prepended to the projected image tokens on the encoder side, so
gradients reach them through the frozen T5 (training on the device); generation on the device runs
in onnxruntime (`edge_client.caption_onnx`), and `TorchStepper` gives the same decoding steps in
torch for comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

# The T5Config fields that determine the network (the rest are generation defaults or unused).
T5_FIELDS = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "feed_forward_proj",
    "layer_norm_epsilon",
    "tie_word_embeddings",
    "scale_decoder_outputs",  # transformers 5: the d_model**-0.5 scaling before the LM head
    "pad_token_id",
    "eos_token_id",
    "decoder_start_token_id",
)


def t5_spec(config: T5Config) -> dict[str, Any]:
    """The manifest's description of a T5 network (what rebuilds it)."""
    spec = {name: getattr(config, name) for name in T5_FIELDS if hasattr(config, name)}
    spec["decoder_start_token_id"] = int(
        config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
    )
    return spec


def build_t5(spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A T5ForConditionalGeneration from its spec, eval mode, fp32, with `tensors` loaded (strict)."""
    config = T5Config(**dict(spec), dropout_rate=0.0, use_cache=True, is_encoder_decoder=True)
    model = T5ForConditionalGeneration(config)
    if tensors is not None:
        model.load_state_dict(dict(tensors), strict=False)
        missing = set(model.state_dict()) - set(tensors)
        if missing - tied_names(model):
            raise ValueError(f"decoder tensors lack {sorted(missing)[:3]}")
    return model.float().eval().requires_grad_(False)


def tied_names(model: nn.Module) -> set[str]:
    """Names that share storage with the shared embedding (loaded through it)."""
    return {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} | (
        {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    )


def t5_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The T5's own tensors without the tied copies (safetensors refuses shared storage)."""
    skip = tied_names(model)
    return {k: v.detach().float().contiguous() for k, v in model.state_dict().items() if k not in skip}


@dataclass(frozen=True)
class ProjectionSpec:
    """CLIP image features [N,D] and patch tokens [N,T,Wv] -> 1 + T tokens of width d_model."""

    image_dim: int
    patch_width: int
    patch_tokens: int
    d_model: int

    def to_manifest(self) -> dict[str, int]:
        return {k: int(v) for k, v in vars(self).items()}

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> ProjectionSpec:
        return cls(**{k: int(entry[k]) for k in ("image_dim", "patch_width", "patch_tokens", "d_model")})


class CaptionProjection(nn.Module):
    """One token from the pooled image feature, one per patch token (with a learned position), each
    a linear map into the decoder's input space."""

    def __init__(self, spec: ProjectionSpec) -> None:
        super().__init__()
        self.spec = spec
        self.pooled = nn.Linear(spec.image_dim, spec.d_model)
        self.patches = nn.Linear(spec.patch_width, spec.d_model)
        self.position = nn.Parameter(torch.zeros(spec.patch_tokens, spec.d_model))

    def forward(self, image_features: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(image_features)[:, None]
        return torch.cat([pooled, self.patches(patch_tokens) + self.position], dim=1)


class Captioner(nn.Module):
    """Projection + T5: `encoder_states(prompt, features, patches)`, `loss(...)`, `logits(...)`."""

    def __init__(self, projection: CaptionProjection, t5: nn.Module) -> None:
        super().__init__()
        self.projection = projection
        self.t5 = t5

    @property
    def d_model(self) -> int:
        return int(self.t5.config.d_model)

    def encoder_inputs(
        self, prompt: torch.Tensor | None, image_features: torch.Tensor, patch_tokens: torch.Tensor
    ) -> torch.Tensor:
        """[prompt tokens, pooled token, patch tokens] -> [N, P+1+T, d] (prompt [N,P,d] or None)."""
        image = self.projection(image_features, patch_tokens)
        return image if prompt is None else torch.cat([prompt, image], dim=1)

    def encoder_states(
        self, prompt: torch.Tensor | None, image_features: torch.Tensor, patch_tokens: torch.Tensor
    ) -> torch.Tensor:
        embeds = self.encoder_inputs(prompt, image_features, patch_tokens)
        return self.t5.encoder(inputs_embeds=embeds).last_hidden_state

    def loss(
        self,
        prompt: torch.Tensor | None,
        image_features: torch.Tensor,
        patch_tokens: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Mean token cross-entropy of `labels` [N,L] (padding = -100, each ends with EOS)."""
        embeds = self.encoder_inputs(prompt, image_features, patch_tokens)
        return self.t5(inputs_embeds=embeds, labels=labels).loss

    def label_logits(
        self,
        prompt: torch.Tensor | None,
        image_features: torch.Tensor,
        patch_tokens: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced logits [N,L,V] of `labels` [N,L] (what `loss` averages)."""
        embeds = self.encoder_inputs(prompt, image_features, patch_tokens)
        return self.t5(inputs_embeds=embeds, labels=labels).logits

    def logits(self, encoder_states: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [N,L,V] for decoder inputs [N,L] (starting with the start token)."""
        return self.t5(encoder_outputs=(encoder_states,), decoder_input_ids=decoder_input_ids).logits


class DecoderStep(nn.Module):
    """One decoding step with self-attention past keys/values as plain tensors (the ONNX decoder's
    signature): (input_ids [N,1], encoder_states [N,S,d], past_key_0, past_value_0, ...) ->
    (logits [N,1,V], present_key_0, present_value_0, ...). Past length t >= 0; cross-attention keys
    and values are recomputed from the encoder states every step."""

    def __init__(self, t5: nn.Module) -> None:
        super().__init__()
        self.t5 = t5
        self.layers = int(t5.config.num_decoder_layers)

    def forward(
        self, input_ids: torch.Tensor, encoder_states: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        for layer in range(self.layers):
            cache.self_attention_cache.update(past[2 * layer], past[2 * layer + 1], layer)
        position = torch.arange(input_ids.shape[1]) + past[0].shape[2]
        out = self.t5(
            encoder_outputs=(encoder_states,),
            decoder_input_ids=input_ids,
            cache=cache,
            use_cache=True,
            cache_position=position,
        )
        present = out.cache.self_attention_cache.layers
        return (out.logits, *[t for layer in present[: self.layers] for t in (layer.keys, layer.values)])

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        config = self.t5.config
        shape = (batch, config.num_heads, 0, config.d_kv)
        return [torch.zeros(shape) for _ in range(2 * self.layers)]


class TorchStepper:
    """The decoding steps of `edge_client.caption_search` in torch (the reference for onnxruntime)."""

    def __init__(self, captioner: Captioner) -> None:
        self.captioner = captioner
        self.step_module = DecoderStep(captioner.t5)

    @torch.no_grad()
    def start(self, prompt: np.ndarray | None, image_features: np.ndarray, patch_tokens: np.ndarray) -> Any:
        states = self.captioner.encoder_states(
            None if prompt is None else torch.from_numpy(prompt),
            torch.from_numpy(image_features),
            torch.from_numpy(patch_tokens),
        )
        return states, self.step_module.empty_past(len(states))

    @torch.no_grad()
    def step(self, tokens: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        states, past = state
        logits, *present = self.step_module(torch.from_numpy(tokens)[:, None], states, *past)
        return logits[:, -1].numpy(), (states, present)

    @staticmethod
    def select(state: Any, rows: np.ndarray) -> Any:
        index = torch.from_numpy(rows)
        states, past = state
        return states[index], [t[index] for t in past]
