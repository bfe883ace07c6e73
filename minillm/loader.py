"""load_model: a name or path -> config, weights on a backend, tokenizer and chat template."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from minillm.chat import ChatTemplate
from minillm.config import ModelConfig
from minillm.formats.gguf import GGUFFile
from minillm.kernels import get_backend
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


def read_model_files(path: Path) -> tuple[ModelConfig, ModelWeights, Tokenizer]:
    if path.is_file():
        gguf = GGUFFile(path)
        config = ModelConfig.from_gguf_metadata(gguf.metadata, "output.weight" in gguf.tensors)
        return config, load_gguf_weights(gguf, config), Tokenizer.from_gguf_metadata(gguf.metadata)
    if (path / "config.json").is_file():
        config = ModelConfig.from_hf_config(path / "config.json")
        return config, load_hf_weights(path, config), Tokenizer.from_pretrained_dir(path)
    raise FileNotFoundError(
        f"{path} is neither a .gguf file nor a Hugging Face model folder "
        "(config.json + *.safetensors + tokenizer.json)"
    )


def load_model(model: str | Path = "smollm2", backend: str = "auto") -> LoadedModel:
    t0 = time.perf_counter()
    ops = get_backend(backend)
    path = locate(model)
    config, weights, tokenizer = read_model_files(path)
    net = LlamaModel(config, weights, ops)
    template = ChatTemplate(
        tokenizer.chat_template or "", tokenizer.bos_token or "", tokenizer.eos_token or ""
    )
    return LoadedModel(
        str(model), path, config, weights, net, tokenizer, template, ops, time.perf_counter() - t0
    )
