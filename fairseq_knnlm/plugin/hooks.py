"""Key capture with forward hooks: which hidden state of a fairseq Transformer LM is f(c).

The paper's best key (Table 5) is the input of the last layer's feed-forward block after its
LayerNorm; the other states stay selectable for the ablation. A key type may name a layer:
``ffn_input_after_ln`` is the last layer, ``ffn_input_after_ln:2`` the third (0-based, negative
counts from the end). No fairseq source is edited: hooks are registered on the modules of
``TransformerDecoderLayer`` (fc1, fc2, self_attn, the layer norms) and removed afterwards.

fairseq decoder layers work time-major (T, B, C); ``KeyCapture.pop()`` returns (B, T, C).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

from fairseq_knnlm.errors import FlagError
from fairseq_knnlm.flags import DEFAULT_KEYTYPE, parse_keytype

logger = logging.getLogger(__name__)

def find_decoder(model: nn.Module) -> nn.Module:
    """The TransformerDecoder of a fairseq LM (model.decoder), or the model itself."""
    dec = getattr(model, "decoder", model)
    if not hasattr(dec, "layers"):
        raise ValueError(f"{type(model).__name__} has no decoder.layers: kNN-LM keys need a "
                         "fairseq Transformer language model")
    return dec


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


class KeyCapture:
    """Registers one forward hook that records the chosen hidden state of each forward pass."""

    def __init__(self, model: nn.Module, keytype: str = DEFAULT_KEYTYPE) -> None:
        self.spec = keytype
        self.name, self.layer_idx = parse_keytype(keytype)
        dec = find_decoder(model)
        layers = dec.layers
        try:
            layer = layers[self.layer_idx]
        except IndexError:
            raise ValueError(f"key type {keytype!r}: the model has {len(layers)} layers") from None
        pre_norm = bool(getattr(layer, "normalize_before", True))
        self._value: Optional[torch.Tensor] = None
        module: nn.Module
        kind: str
        if self.name == "ffn_input_after_ln":
            module, kind = layer.fc1, "input"
        elif self.name == "ffn_input_before_ln":
            # pre-norm: the FFN LayerNorm is final_layer_norm; post-norm: the FFN input is the
            # output of self_attn_layer_norm, whose input is the un-normalised stream.
            module, kind = (layer.final_layer_norm if pre_norm else layer.self_attn_layer_norm,
                            "input")
        elif self.name == "ffn_output":
            module, kind = layer.fc2, "output"
        elif self.name == "attn_input_after_ln":
            if pre_norm:
                module, kind = layer.self_attn_layer_norm, "output"
            else:  # post-norm: the layer input already went through the previous layer's LN
                module, kind = layer, "input"
        elif self.name == "attn_input_before_ln":
            module, kind = layer, "input"
        elif self.name == "attn_output":
            module, kind = layer.self_attn, "output"
        elif self.name == "model_output":
            module, kind = layer, "output"
        else:  # model_output_after_ln
            ln = getattr(dec, "layer_norm", None)
            if ln is None:
                raise ValueError("model_output_after_ln: this model has no final LayerNorm "
                                 "(decoder_normalize_before=False); use model_output")
            module, kind = ln, "output"
        self.layer_index = self.layer_idx % len(layers)
        if kind == "input":
            self._handle = module.register_forward_pre_hook(self._pre_hook)
        else:
            self._handle = module.register_forward_hook(self._post_hook)
        self.dim = self._infer_dim(layer, dec)

    def _infer_dim(self, layer: nn.Module, dec: nn.Module) -> int:
        if self.name == "ffn_output":
            return int(layer.fc2.out_features)
        return int(layer.fc1.in_features)

    def _store(self, x: torch.Tensor) -> None:
        self._value = x.detach()

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        self._store(_first(args))

    def _post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._store(_first(output))

    def pop(self) -> torch.Tensor:
        """The state of the last forward pass as (B, T, C); raises if none was recorded."""
        if self._value is None:
            raise RuntimeError("no hidden state captured: did the model run a forward pass?")
        x, self._value = self._value, None
        return x.transpose(0, 1)

    def take(self) -> Optional[torch.Tensor]:
        """The state of the last forward pass as recorded, time-major (T, B, C), or None;
        cleared (generation reads it after every decoder step)."""
        x, self._value = self._value, None
        return x

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> KeyCapture:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def capture_keys(model: nn.Module, keytype: str,
                 run: Callable[[], Any]) -> torch.Tensor:
    """Run ``run()`` (a forward pass) and return the captured keys (B, T, C)."""
    with KeyCapture(model, keytype) as cap:
        run()
        return cap.pop()


def attach_key_capture(model: nn.Module, keytype: str) -> tuple[KeyCapture, int]:
    """The key hook of ``keytype`` on ``model`` and its decoder's layer count; a layer or
    state the model does not have is a FlagError naming --knn-keytype."""
    try:
        capture = KeyCapture(model, keytype)
    except ValueError as e:
        raise FlagError(f"--knn-keytype: {e}") from None
    return capture, len(find_decoder(model).layers)
