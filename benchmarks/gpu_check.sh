#!/usr/bin/env bash
# One prepared check for a CUDA machine (about 2-3 minutes on one H200); prints, never asserts:
#   1. the probe benchmark at the paper's size with the torch solver on the GPU (goal <= 30 s per
#      job), scikit-learn sampled on the CPU beside it (benchmarks/bench_probe.py);
#   2. the tiny models of the three architectures with device cuda + bfloat16 against the CPU in
#      float32: relative error of the kept hidden states and agreement of the answer;
#   3. extraction throughput on the GPU (bfloat16) of a widened tiny LLaVA through the extract
#      rule's code path: images/s and the share of the GPU's bf16 FLOP limit it reaches
#      (PEAK_TFLOPS, default 989: H100/H200 SXM dense bf16);
#   4. share_prefix's code paths on CUDA in bfloat16 against the CPU in float32, on the tiny models:
#      one job over three prompts (shared prefix, KV-cache continuations) writing the image pass's
#      files too, and last-token activation patching over every layer.
# Run from the repository root after `make setup` with a CUDA torch:  bash benchmarks/gpu_check.sh
# or with another Python that has a CUDA torch and the pins of envs/requirements.txt it uses:
#   PYTHONPATH=src PY=python3 bash benchmarks/gpu_check.sh
# Runs so far: two on one H200 on 2026-12-04 (parts 1-3 in 91 s, parts 1-4 in 123 s), figures in
# README; their logs were lost to an ignore rule. Keep new logs under benchmarks/results/.
set -euo pipefail
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== 1. probe benchmark, paper size, torch on cuda (sklearn sampled, 20 iterations a fit)"
timeout 300 "$PY" benchmarks/bench_probe.py --sizes paper --device cuda --threads 2 --sklearn sample \
    --sklearn-max-iter 20 | tail -n 8

echo "== 2. tiny models: cuda + bfloat16 vs cpu + float32"
timeout 150 "$PY" - <<'EOF'
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from stagelens.adapters import load_adapter
from stagelens.builders.tiny import build
from stagelens.spec import ModelSpec

rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for w, h in ((48, 48), (96, 32), (40, 80))]
question = "Does this image show an animal? The answer must be always yes or no."
with tempfile.TemporaryDirectory() as tmp:
    for recipe in ("tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"):
        path = build(recipe, Path(tmp) / recipe, seed=0)
        out = {}
        for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
            adapter = load_adapter(ModelSpec(recipe, str(path), dtype=dtype, device=device))
            layers = list(range(adapter.info.num_layers + 1))
            out[device] = [adapter.forward([im], question, layers, ["last", "image_mean"]) for im in images]
        worst = max(
            float(np.linalg.norm(np.asarray(g.vectors[p], np.float32) - np.asarray(c.vectors[p], np.float32))
                  / np.linalg.norm(np.asarray(c.vectors[p], np.float32)))
            for c, g in zip(out["cpu"], out["cuda"]) for p in ("last", "image_mean"))
        same = all(np.argmax(c.answer_probs) == np.argmax(g.answer_probs) for c, g in zip(out["cpu"], out["cuda"]))
        print(f"{recipe:<16} max relative error of kept states {worst:.4f} (bf16: ~1e-2 expected); "
              f"same answer on every image: {same}")
EOF

echo "== 3. extraction throughput on cuda, bfloat16"
timeout 150 "$PY" - <<'EOF'
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stagelens.adapters import load_adapter
from stagelens.builders.tiny import build
from stagelens.extract import Sample, extract
from stagelens.spec import ModelSpec

peak = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12
prompt = {"id": "anchor", "family": "anchor", "text": "Does this image show an animal? The answer must be always yes or no."}
rng = np.random.default_rng(0)
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    model = build("tiny-llava", tmp / "model", seed=0, hidden_size=2048, num_layers=16)
    rows = []
    for i in range(256):
        path = tmp / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(336, 336, 3), dtype=np.uint8)).save(path)
        rows.append(Sample(f"c/img{i}", 0, str(path)))
    spec = ModelSpec("bench", str(model), dtype="bfloat16", device="cuda", batch_size=32)
    adapter = load_adapter(spec)
    params = sum(p.numel() for p in adapter.model.parameters())
    tokens = adapter.model_kwargs(adapter.build_inputs([Image.open(rows[0].path)], prompt["text"]))["input_ids"].shape[1]
    layers = spec.layers_of(adapter.info.num_layers)
    for name, batch in (("warm-up", rows[:32]), ("timed", rows)):
        torch.cuda.synchronize()
        start = time.perf_counter()
        extract(adapter, spec, batch, prompt, [tmp / name / f"layer{l}.parquet" for l in layers],
                tmp / name / "answers.parquet", split="test", progress=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    rate = len(rows) / seconds
    flops = 2 * params * tokens * rate
    print(f"{params / 1e9:.2f} B parameters, {tokens} tokens per image: {rate:.1f} images/s, "
          f"{flops / 1e12:.1f} TFLOP/s = {flops / peak:.1%} of {peak / 1e12:.0f} TFLOP/s")
EOF

echo "== 4. share_prefix (shared prefix + folded image pass) and last-token patching: cuda bf16 vs cpu fp32"
timeout 150 "$PY" - <<'EOF'
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from stagelens.adapters import load_adapter
from stagelens.builders.tiny import build
from stagelens.extract import Sample, extract_prompts
from stagelens.patching import patch_batch
from stagelens.spec import ModelSpec
from stagelens.store import read_metadata, read_vectors

text = "Does this image show an animal? The answer must be always yes or no."
prompts = [{"id": "anchor", "family": "anchor", "expected": "yes", "text": text},
           {"id": "neg", "family": "negation", "expected": "no", "text": text.replace("an animal", "a plane")},
           {"id": "fmt", "family": "format", "expected": "1", "text": text.replace("yes or no", "1 or 0")}]
rng = np.random.default_rng(0)
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    samples = []
    for i, (w, h) in enumerate(((48, 48), (96, 32), (40, 80), (64, 64), (32, 96))):
        path = tmp / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(f"c{i % 2}/img{i}", i % 2, str(path)))
    for recipe in ("tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"):
        model = build(recipe, tmp / recipe, seed=0)
        files, patched = {}, {}
        for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
            tower = load_adapter(ModelSpec(recipe, str(model), dtype=dtype, device=device)).vision
            spec = ModelSpec(recipe, str(model), dtype=dtype, device=device, batch_size=2,
                             positions=("last", "question_last", "image_mean"),
                             vision_num_layers=tower.num_layers if tower is not None else None)
            adapter = load_adapter(spec)
            layers, out = spec.layers_of(adapter.info.num_layers), tmp / recipe / device
            emb = [out / p["id"] / f"layer{l}.parquet" for p in prompts for l in layers]
            image = [out / "image" / f"layer{l}.parquet" for l in layers]
            vision = [out / "vision" / f"layer{v}.parquet" for v in spec.vision_layers_of()]
            extract_prompts(adapter, spec, samples, prompts, emb, [out / p["id"] / "answers.parquet" for p in prompts],
                            [out / p["id"] / "readout.parquet" for p in prompts], split="test", progress=False,
                            image_paths=image, vision_paths=vision)
            files[device] = emb + image + vision
            images = [Image.open(s.path).convert("RGB") for s in samples]
            patched[device] = patch_batch(adapter, images, text, prompts[1]["text"], layers, "last", ("yes", "no"))
        worst = 0.0
        for cpu, gpu in zip(files["cpu"], files["cuda"]):
            for position in read_metadata(cpu)["positions"]:
                expected, got = read_vectors(cpu, position)[2], read_vectors(gpu, position)[2]
                worst = max(worst, float(np.linalg.norm(got - expected) / np.linalg.norm(expected)))
        spread = float(np.ptp(patched["cpu"]["anchor_to_variant"]))
        gap = max(float(np.abs(patched["cuda"][k] - patched["cpu"][k]).max()) for k in patched["cpu"])
        print(f"{recipe:<16} shared-prefix job ({len(files['cpu'])} files: 3 prompts, image pass, vision layers): "
              f"max relative error {worst:.4f}; last-token patching: max |score diff| {gap:.3f} "
              f"(scores span {spread:.3f})")
EOF
