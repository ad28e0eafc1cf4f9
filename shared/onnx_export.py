"""Export all-MiniLM-L6-v2 from its local weights to ONNX (mean pooling and L2 normalisation inside the graph),
fuse it for ONNX Runtime and optionally quantise the weights to int8 per channel.

Run as a separate process by `shared.embeddings.OnnxMiniLMEmbedder` the first time a model is needed, so the
serving process never imports torch; the result is cached by content hash outside the repository.

    python -m shared.onnx_export --model DIR --out FILE [--quantize]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path

# Bump whenever the graph or the quantisation changes: it is part of the cache key and of nothing else.
RECIPE = "minilm-mean-l2/opset17/ort-bert-fusion/int8-dynamic-per-channel/v1"


def check_model(model_dir: Path) -> None:
    """Refuse models this export does not describe (pooling other than mean, no normalisation step)."""
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    modules = [m.get("type", "") for m in json.loads((model_dir / "modules.json").read_text())]
    if not pooling.get("pooling_mode_mean_tokens") or any(
            pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                     "pooling_mode_mean_sqrt_len_tokens")):
        raise ValueError(f"{model_dir}: only mean pooling is supported by the ONNX export")
    if not any(t.endswith("Normalize") for t in modules):
        raise ValueError(f"{model_dir}: the model has no Normalize module; the ONNX export always normalises")


def export(model_dir: Path, out: Path, *, quantize: bool) -> None:
    """Write the ONNX model to `out` (atomically: a half-written file never carries the final name)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    check_model(model_dir)
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic  # type: ignore[import-untyped]
    from onnxruntime.transformers.optimizer import optimize_model  # type: ignore[import-untyped]
    from transformers import AutoConfig, AutoModel

    torch.set_num_threads(1)
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    bert = AutoModel.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager")
    bert.eval()

    class Pooled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            h = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 1037, 2936, 6251, 102]], dtype=torch.long)
    mask = (ids != 0).long()
    dynamic = {n: {0: "batch", 1: "tokens"} for n in ("input_ids", "attention_mask", "token_type_ids")}
    dynamic["embedding"] = {0: "batch"}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        raw, fused = Path(tmp) / "raw.onnx", Path(tmp) / "fused.onnx"
        with warnings.catch_warnings():  # the TorchScript exporter is marked deprecated; it is the one that
            warnings.simplefilter("ignore")  # needs no extra packages and produces a graph ORT fuses fully
            torch.onnx.export(Pooled(bert), (ids, mask, torch.zeros_like(ids)), str(raw),
                              input_names=["input_ids", "attention_mask", "token_type_ids"],
                              output_names=["embedding"], dynamic_axes=dynamic, opset_version=17, dynamo=False)
        opt = optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads,
                             hidden_size=config.hidden_size, opt_level=1)
        opt.save_model_to_file(str(fused))
        final = Path(tmp) / "final.onnx"
        if quantize:
            # Per-channel int8 weights: the vectors stay within cosine ~0.99 of fp32 (per-tensor: ~0.95).
            quantize_dynamic(str(fused), str(final), weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        else:
            fused.replace(final)
        os.replace(final, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quantize", action="store_true")
    args = ap.parse_args()
    export(args.model, args.out, quantize=args.quantize)


if __name__ == "__main__":
    main()
