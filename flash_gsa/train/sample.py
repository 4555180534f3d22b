"""Load a trained run folder and sample text from it."""

from __future__ import annotations

from pathlib import Path

import torch

from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def load_run(run_dir: str | Path, device: torch.device | str = "cpu"):
    """(model in eval mode on `device`, tokenizer) from a run folder or one of its checkpoints."""
    from ..models import GSAForCausalLM

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} holds no model (config.json); is it a finished run folder?")
    model = GSAForCausalLM.from_pretrained(run_dir, dtype=torch.float32).to(device).eval()
    tokenizer_dir = run_dir if run_dir.parent.name != "checkpoints" else run_dir.parent.parent
    return model, load_tokenizer(tokenizer_dir)


@torch.no_grad()
def generate(
    model,
    tokenizer: ByteTokenizer | HFTokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> str:
    """The continuation of `prompt` (as a new document: BOS first when the tokenizer has one). Sampling with
    `temperature` and `top_k` (0 = no top-k cut); temperature 0 is greedy. Stops early at EOS."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or top_k < 0:
        raise ValueError(f"temperature and top_k must be >= 0, got {temperature} and {top_k}")
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if not ids:
        raise ValueError("the prompt is empty and the tokenizer has no BOS token to start from")
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k} if temperature > 0 else {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
            **(sampling or {"do_sample": False}),
        )
    return tokenizer.decode(out[0, len(ids) :].tolist())
