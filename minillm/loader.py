"""load_model: a name or path -> config, weights on a backend, tokenizer and chat template."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from minillm.chat import ChatTemplate
from minillm.config import ModelConfig
from minillm.formats.gguf import GGUFError, GGUFFile
from minillm.formats.gguf_check import check_model_header
from minillm.kernels import activations_mode, get_backend
from minillm.model.gemma3 import Gemma3Model
from minillm.model.llama import LlamaModel
from minillm.model.weights import ModelWeights, load_gguf_weights, load_hf_weights
from minillm.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    name: str
    path: Path
    config: ModelConfig
    weights: ModelWeights
    model: LlamaModel
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    backend: ModuleType
    load_seconds: float


def locate(model: str | Path) -> Path:
    """A file or folder on disk, else whatever the hub resolves the name to."""
    p = Path(model).expanduser()
    if p.exists():
        return p
    from minillm.hub import resolve

    return Path(resolve(str(model)).path)


def _gguf_tokenizer(gguf: GGUFFile) -> Tokenizer:
    """The tokenizer a GGUF describes; a vocabulary the builder rejects names the file."""
    try:
        return Tokenizer.from_gguf_metadata(gguf.metadata)
    except Exception as e:  # `tokenizers` rejects a bad vocabulary or merge with a bare Exception
        why = " ".join(str(e).split())  # its messages can span lines; an Error: line must not
        raise GGUFError(
            f"{gguf.path}: the tokenizer cannot be built from its metadata: {why}"
        ) from e


def read_model_files(path: Path) -> tuple[ModelConfig, ModelWeights, Tokenizer]:
    """Config, weights and tokenizer; a GGUF is checked whole before any weight is used."""
    if path.is_file():
        gguf = GGUFFile(path)
        config = check_model_header(gguf.path, gguf.metadata, gguf.tensor_infos)
        return config, load_gguf_weights(gguf, config), _gguf_tokenizer(gguf)
    if (path / "config.json").is_file():
        config = ModelConfig.from_hf_config(path / "config.json")
        return config, load_hf_weights(path, config), Tokenizer.from_pretrained_dir(path)
    raise FileNotFoundError(
        f"{path} is neither a .gguf file nor a Hugging Face model folder "
        "(config.json + *.safetensors + tokenizer.json)"
    )


def model_class(config: ModelConfig) -> type[LlamaModel]:
    """The forward pass an architecture needs: Gemma 3's, or the Llama family's."""
    return Gemma3Model if config.gemma3 is not None else LlamaModel


def load_model(
    model: str | Path = "smollm2",
    backend: str = "auto",
    build: Callable[[ModelConfig, ModelWeights, ModuleType], LlamaModel] | None = None,
    activations: str | None = None,
) -> LoadedModel:
    """build: how the model is made from config, weights and backend; None: the class the
    architecture needs (tensor parallelism builds one rank's shard instead,
    minillm/parallel/executor.py). activations: "int8" | "fp32" for the cpu backend's
    matmuls (None: its default, int8 for quantized weights; see kernels/cpu.py)."""
    t0 = time.perf_counter()
    ops = get_backend(backend)
    mode = activations_mode(ops, activations)  # checked before the files are read
    path = locate(model)
    config, weights, tokenizer = read_model_files(path)
    if build is not None and config.gemma3 is not None:
        raise ValueError(
            f"{path}: Gemma 3 runs in one process only (tensor, pipeline and context "
            "parallelism build Llama-family shards)"
        )
    with mode:
        net = (build or model_class(config))(config, weights, ops)
    try:
        template = ChatTemplate(
            tokenizer.chat_template or "", tokenizer.bos_token or "", tokenizer.eos_token or ""
        )
    except ValueError as e:  # a template that does not compile: say whose it is
        raise ValueError(f"{path}: {e}") from e
    return LoadedModel(
        str(model), path, config, weights, net, tokenizer, template, ops, time.perf_counter() - t0
    )
