"""Training throughput on MedGemma-4B's architecture (random bf16 weights) on one GPU.

    python benchmarks/gpu_train.py                 # MedGemma-4B shape, CUDA, bf16
    python benchmarks/gpu_train.py --tiny          # same code path, tiny VLM, CPU, fp32

For layers 15-19 and all layers, and for several ways to feed the recipe's 8 pairs per update
(all give the same gradient): `naive` (one pair per forward, 8 accumulated, as the reference
loop does), `micro4` (4 pairs per forward), `batched` (all 8 pairs, 16 prompts, in one
forward) and `batched-gc` (the same with activation checkpointing, for memory). Reports pairs/s
over the timed steps and peak GPU memory. Prompts are ~320 tokens, 256 of them image tokens.
Anchor (one H200, naive, one pair per step): 310 ms at 10.7 GB for 15-19, 731 ms at 14.3 GB
for all layers; goal: at least 25 pairs/s for 15-19 with a peak under 16 GB.

The model is MedGemma-4B's config with the image/boi/eoi token ids moved onto mechlora's
character tokenizer, so the real data path (processor, chat template, image features) runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mechlora.data import load_groups
from mechlora.models import wrap
from mechlora.models.presets import medgemma_4b_config, tiny_gemma3_vlm
from mechlora.models.tokenizer import build_processor, build_tokenizer
from mechlora.train import TrainConfig, train
from mechlora.training.model import remove_lora

WORDINGS = ("Is there a pleural effusion on this film?", "Is fluid seen in the pleural space?",
            "Can a pleural effusion be identified?", "Any fluid around the lung on this image?")


def medgemma_subject(device: str):
    tok = build_tokenizer()
    processor = build_processor(tok, image_size=896, image_seq_length=256)
    cfg = medgemma_4b_config()
    cfg.image_token_id = tok.image_token_id
    cfg.boi_token_id = tok.convert_tokens_to_ids(tok.boi_token)
    cfg.eoi_token_id = tok.convert_tokens_to_ids(tok.eoi_token)
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: no 17 GB fp32 detour
    try:
        with torch.device(device):
            model = Gemma3ForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():  # random init leaves the projector at zero: give the image an effect
        w = model.model.multi_modal_projector.mm_input_projection_weight
        w.normal_(0.0, w.shape[0] ** -0.5)
    return wrap(model, processor, name="medgemma-4b-random")


def tiny_subject(device: str):
    model, processor = tiny_gemma3_vlm(0)  # 34 language layers, like MedGemma
    return wrap(model.to(device), processor, name="tiny-gemma3-vlm")


def write_data(folder: Path, n_groups: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n_groups):
        image = folder / f"img{i % 16}.png"
        if not image.exists():
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(image)
        lines.append(json.dumps({"id": f"q{i}", "image": image.name, "question": WORDINGS[0],
                                 "paraphrases": list(WORDINGS[1:]), "answer": "yes"}))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


MODES = {"naive": (1, False), "micro4": (4, False), "batched": (0, False),
         "batched-gc": (0, True)}  # name: (micro_batch, activation checkpointing)


def measure(subject, groups, layers: str, mode: str, steps: int, warmup: int) -> dict:
    micro_batch, checkpointing = MODES[mode]
    cuda = subject.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(epochs=10_000, max_steps=warmup + steps, micro_batch=micro_batch,
                      gradient_checkpointing=checkpointing, save_every=0)
    t0 = time.perf_counter()
    result = train(subject, groups, layers=layers, config=cfg, progress=False)
    total = time.perf_counter() - t0
    rows = [r for r in result.metrics if r["kind"] == "train"]
    timed = rows[warmup:]
    memory = result.record["training"]["memory"] or {}  # the trainer's estimate (GPU only)
    out = {
        "layers": layers, "mode": mode,
        "pairs_per_s": sum(r["pairs"] for r in timed) / sum(r["seconds"] for r in timed),
        "step_ms_median": 1000 * statistics.median(r["seconds"] for r in timed),
        "first_step_s": rows[0]["seconds"], "wall_s": total,
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "estimate_gb": memory.get("estimate_gib"), "seq_len": memory.get("seq_len"),
        "checkpointing": result.record["config"]["gradient_checkpointing"],
        "final_loss": rows[-1]["loss"],
    }
    # the base without its LoRA layers (and checkpointing), for the next setting
    remove_lora(result.subject.model, result.record["config"]["gradient_checkpointing"])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny VLM on CPU (no GPU needed)")
    parser.add_argument("--steps", type=int, default=10, help="timed updates per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates first")
    parser.add_argument("--layers", nargs="+", default=["15-19", "all"], help="layer specs")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--threads", type=int, help="torch CPU threads (--tiny)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if not args.tiny and device == "cpu":
        sys.exit("no GPU: run with --tiny, or on a machine with CUDA")
    t0 = time.perf_counter()
    subject = tiny_subject(device) if args.tiny else medgemma_subject(device)
    print(f"model {subject.name} on {device}: {time.perf_counter() - t0:.1f}s to build",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        size = 32 if args.tiny else 896
        n_groups = 8 * (args.warmup + args.steps)  # one epoch covers every timed step
        groups = load_groups(write_data(Path(tmp), n_groups, size))
        for layers in args.layers:
            for mode in args.modes:
                subject = wrap(subject.model, subject.processor, name=subject.name)
                r = measure(subject, groups, layers, mode, args.steps, args.warmup)
                results.append(r)
                print(json.dumps(r), flush=True)
    print("\n| layers | mode | pairs/s | step (8 pairs) | peak GiB | estimate GiB |\n"
          "|---|---|---|---|---|---|")
    for r in results:
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
        estimate = f"{r['estimate_gb']:.1f}" if r["estimate_gb"] is not None else "-"
        print(f"| {r['layers']} | {r['mode']} | {r['pairs_per_s']:.2f} | "
              f"{r['step_ms_median']:.0f} ms | {peak} | {estimate} |")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "torch": torch.__version__,
                                         "gpu": torch.cuda.get_device_name() if device == "cuda"
                                         else None, "results": results}, indent=2))


if __name__ == "__main__":
    main()
