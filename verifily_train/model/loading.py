"""Load a base model of the right kind for the task, by Hub id or local folder."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from verifily_train.errors import ModelError
from verifily_train.model.registry import family

KIND_CAUSAL = "causal_lm"
KIND_SEQ2SEQ = "seq2seq_lm"
KIND_SEQ_CLS = "seq_cls"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSpec:
    """What the pipeline needs to know about a base model before loading its weights."""

    source: str  # local folder or Hub id, as given
    kind: str  # causal_lm | seq2seq_lm | seq_cls
    model_type: str  # config.model_type, e.g. llama, t5, bert
    is_local: bool


def check_model_reference(base_model: str) -> None:
    """Spec §8 rule 5, cheaply: a local folder with a config.json, or something shaped like a Hub id."""
    path = Path(os.path.expanduser(base_model))
    if path.exists():
        if path.is_file() and path.suffix.lower() == ".gguf":
            return
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelError(base_model, "base_model", "is not a model folder (no config.json)")
        return
    looks_local = base_model.startswith((".", "/", "~")) or base_model.count("/") > 1
    if looks_local or not _HUB_ID.match(base_model):
        raise ModelError(base_model, "base_model", "no such model folder, and not a HuggingFace Hub id (org/name)")


def inspect_model(base_model: str, task: str, trust_remote_code: bool = False) -> ModelSpec:
    """Read the model's config (no weights) and decide which Auto class serves the task; wrong kinds fail here."""
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto as auto

    check_model_reference(base_model)
    is_local = Path(os.path.expanduser(base_model)).exists()
    source = str(Path(os.path.expanduser(base_model)).resolve()) if is_local else base_model
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(base_model, "base_model", f"cannot load its config: {first}") from err
    model_type = getattr(config, "model_type", "")
    # BERT-style encoders also register a CausalLM class (BertLMHeadModel); they only generate when built
    # as decoders, so an encoder with a masked-LM head counts as causal only if its config says is_decoder.
    encoder_only = model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    causal = model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not encoder_only
    seq2seq = model_type in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    seq_cls = model_type in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    if task == "sft":
        if seq2seq and getattr(config, "is_encoder_decoder", False):
            kind = KIND_SEQ2SEQ
        elif causal:
            kind = KIND_CAUSAL
        else:
            raise ModelError(base_model, "base_model", f"model type {model_type!r} is neither a CausalLM nor a Seq2SeqLM, "
                                                       "so it cannot do task sft (use task: classification for encoders)")
    else:
        if not seq_cls:
            raise ModelError(base_model, "base_model", f"model type {model_type!r} has no sequence-classification head in transformers")
        kind = KIND_SEQ_CLS
    return ModelSpec(source=source, kind=kind, model_type=model_type, is_local=is_local)


def position_limit(source: str, trust_remote_code: bool = False) -> Optional[int]:
    """The most tokens the model can read in one row (its position embeddings); None when positions are
    relative (T5) or the config names no limit. A longer row crashes the forward of an absolute-position
    encoder such as BERT, whatever ``training.max_seq_length`` says."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    if getattr(config, "is_encoder_decoder", False):
        return None
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            offset = (getattr(config, "pad_token_id", None) or 0) + 1 if family(config.model_type).positions_after_padding else 0
            return value - offset
    return None


def check_weights(base_model: str) -> None:
    """A local model's weight files can be read safely and whole, checked before training: a truncated
    safetensors file (its header promises more bytes than the file holds) or a pickle checkpoint that
    ``torch.load(weights_only=True)`` refuses is one ``ModelError``, not a traceback mid-run."""
    folder = Path(os.path.expanduser(base_model))
    if not folder.is_dir():
        return  # a Hub id: its files are checked by their hashes as they download
    tensors = sorted(folder.glob("*.safetensors"))
    for path in tensors:
        _check_safetensors(path, base_model)
    if tensors:
        return
    for path in sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")):
        _check_pickle(path, base_model)


def _check_safetensors(path: Path, base_model: str) -> None:
    import json
    import struct

    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if header_len < 2 or header_len > min(size - 8, 100 * 2 ** 20):
            raise ModelError(path, "base_model", f"not a readable safetensors file ({size:,} bytes; truncated or damaged)")
        try:
            header = json.loads(handle.read(header_len))
            ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ModelError(path, "base_model", "not a readable safetensors file (its header is damaged)") from None
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        raise ModelError(path, "base_model", f"truncated: holds {size:,} of the {needed:,} bytes its header lists")


def _check_pickle(path: Path, base_model: str) -> None:
    import pickle

    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise ModelError(path, "base_model", "cannot be loaded safely: torch.load(weights_only=True) refuses it (it "
                                             "pickles more than tensors); convert it to safetensors") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ModelError(path, "base_model", f"not a readable checkpoint ({first})") from None


def load_tokenizer(spec: ModelSpec, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token guaranteed (EOS stands in when the model has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec.source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(spec.source, "base_model", f"cannot load its tokenizer: {str(err).splitlines()[0]}") from err
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(spec.source, "base_model", "tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: ModelSpec, labels: Optional[List[str]] = None, pad_token_id: Optional[int] = None,
               trust_remote_code: bool = False, quantization_config=None, device_map=None):
    """Instantiate the base model in fp32 (mixed precision is applied by autocast, not by the weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    kwargs: Dict = {"trust_remote_code": trust_remote_code, "dtype": torch.float32}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        if spec.kind == KIND_CAUSAL:
            model = AutoModelForCausalLM.from_pretrained(spec.source, **kwargs)
        elif spec.kind == KIND_SEQ2SEQ:
            model = AutoModelForSeq2SeqLM.from_pretrained(spec.source, **kwargs)
        else:
            labels = labels or []
            model = AutoModelForSequenceClassification.from_pretrained(
                spec.source, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True, **kwargs)
            # the head reads the last non-pad token of a decoder, so the model must know the pad id
            if pad_token_id is not None and model.config.pad_token_id is None:
                model.config.pad_token_id = pad_token_id
    except (OSError, ValueError) as err:
        raise ModelError(spec.source, "base_model", f"cannot load weights: {str(err).splitlines()[0]}") from err
    except Exception as err:  # a damaged safetensors file or a refused pickle, if it slipped past check_weights
        if type(err).__name__ not in ("SafetensorError", "UnpicklingError", "HeaderTooLarge"):
            raise
        raise ModelError(spec.source, "base_model", f"cannot load weights: {str(err).splitlines()[0][:200]}") from err
    return model
