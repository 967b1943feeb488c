"""Train a small Llama-style LM with one of four FFN forms, on CPU in fp32, and save it in HF format.

The model is our own ``Transformer`` (so the checkpoint is exactly what the runtime loads); only the forward
used for training differs: the runtime RMSNorm is a custom op without a backward, so ``training_logits`` runs
the same modules with a differentiable RMSNorm (same formula, fp32 statistics) and the plain causal mask.

The four variants differ only in the FFN (PAPER.md): non-gated ReLU² and ReLU with m neurons, gated ReGLU and
SwiGLU with round(2m/3) neurons, so every FFN has (almost exactly) the same number of parameters. Data order,
token count, schedule and initialisation seed are shared.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sparseinfer.model.config import ModelConfig
from sparseinfer.model.transformer import Transformer, causal_attend
from sparseinfer.training.bpe import BOS_ID, EOS_ID

# our variant name -> (config.json hidden_act, gated FFN)
VARIANTS: dict[str, tuple[str, bool]] = {
    "relu2": ("relu2", False),
    "relu": ("relu", False),
    "reglu": ("relu", True),
    "swiglu": ("silu", True),
}


@dataclass(frozen=True)
class TrainConfig:
    activation: str = "relu2"
    hidden: int = 192
    layers: int = 4
    heads: int = 3
    neurons: int = 768  # m of the non-gated variants (4d); gated ones get round(2m/3)
    context: int = 128
    batch: int = 16
    steps: int = 110
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_windows: int = 64
    threads: int = 0  # 0: leave torch's default

    def __post_init__(self) -> None:
        if self.activation not in VARIANTS:
            raise ValueError(f"activation must be one of {', '.join(VARIANTS)}, got {self.activation!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        for name in ("hidden", "layers", "heads", "neurons", "context", "batch", "steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def intermediate(self) -> int:
        return round(2 * self.neurons / 3) if VARIANTS[self.activation][1] else self.neurons


def hf_config(cfg: TrainConfig, vocab: int) -> dict:
    """config.json of the model: a LlamaForCausalLM config (tied embeddings, no biases)."""
    act, _ = VARIANTS[cfg.activation]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.intermediate,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.heads,
        "head_dim": cfg.hidden // cfg.heads,
        "hidden_act": act,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": cfg.context,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": "float32",
    }


def build_model(cfg: TrainConfig, vocab: int) -> Transformer:
    """A freshly initialised model (GPT-2 style: N(0, 0.02), residual outputs scaled by 1/sqrt(2L))."""
    hf = hf_config(cfg, vocab)
    names = ["model.layers.0.mlp.gate_proj.weight"]
    if VARIANTS[cfg.activation][1]:
        names.append("model.layers.0.mlp.up_proj.weight")
    model = Transformer(ModelConfig.from_hf(hf, names))
    gen = torch.Generator().manual_seed(cfg.seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
            continue
        std = (
            0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        )
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Differentiable twin of ops.rms_norm (HF LlamaRMSNorm)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def training_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) of a causal pass from position 0, with autograd, using ``model``'s modules."""
    T = tokens.shape[1]
    eps = model.config.rms_norm_eps
    x = model.embed_tokens(tokens)  # (B, T, d)
    cos, sin = model._rope(T)
    cos, sin = cos[None, None, :T], sin[None, None, :T]  # (1, 1, T, hd)
    attend = causal_attend(T)
    for layer in model.layers:
        x = x + layer.self_attn(_rms_norm(x, layer.input_layernorm.weight, eps), cos, sin, attend, None, None)
        x = x + layer.mlp(_rms_norm(x, layer.post_attention_layernorm.weight, eps))  # (B, T, d)
    return model.lm_head(_rms_norm(x, model.norm.weight, eps))  # (B, T, vocab)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_starts(n_tokens: int, cfg: TrainConfig) -> np.ndarray:
    """(steps, batch) window starts; depends only on the seed, the data size and the shape, never on the
    variant, so all four models see the same tokens in the same order."""
    if n_tokens <= cfg.context + 1:
        raise ValueError(
            f"train token file has {n_tokens} tokens; need more than context+1 = {cfg.context + 1}"
        )
    rng = np.random.default_rng(cfg.seed)
    return rng.integers(0, n_tokens - cfg.context - 1, size=(cfg.steps, cfg.batch))


@torch.no_grad()
def perplexity(model: Transformer, ids: np.ndarray, context: int, max_windows: int) -> float:
    """exp(mean next-token NLL) over consecutive non-overlapping windows of ``ids``."""
    n = min(max_windows, (len(ids) - 1) // context)
    if n <= 0:
        raise ValueError(f"validation needs more than {context + 1} tokens, has {len(ids)}")
    total, count = 0.0, 0
    for i in range(0, n, 8):
        rows = range(i, min(n, i + 8))
        win = torch.from_numpy(
            np.stack([ids[r * context : r * context + context + 1] for r in rows]).astype(np.int64)
        )
        logits = training_logits(model, win[:, :-1])  # (b, T, V)
        nll = F.cross_entropy(logits.flatten(0, 1), win[:, 1:].flatten(), reduction="sum")
        total, count = total + float(nll), count + win[:, 1:].numel()
    return math.exp(total / count)


def save_checkpoint(
    model: Transformer, cfg: TrainConfig, vocab: int, out: Path, tokenizer_json: Path
) -> None:
    """config.json + model.safetensors (HF names, tied lm_head omitted) + tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"model.{name}": p.detach().contiguous().clone()
        for name, p in model.named_parameters()
        if name != "lm_head.weight"  # tied: shares embed_tokens, which named_parameters lists once
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, vocab), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": True, "temperature": 0.8})
    )
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")


STATE_FILE = "train_state.pt"  # in the output directory while a run is unfinished


@dataclass(frozen=True)
class RunControl:
    """How one invocation runs, apart from what it trains (``TrainConfig``): long runs are split.

    ``save_every`` steps the model, optimizer and position are written to ``out/train_state.pt`` (0: only
    when stopping early); ``stop_after`` ends this invocation after that many steps, with the state saved
    (None: run to the end); ``resume`` continues from a saved state of the same configuration. The data
    order is a function of the seed alone and training has no other randomness, so a run resumed any
    number of times ends with the same weights as one that was never interrupted."""

    save_every: int = 0
    stop_after: int | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if self.save_every < 0:
            raise ValueError(f"--save-every must be >= 0, got {self.save_every}")
        if self.stop_after is not None and self.stop_after <= 0:
            raise ValueError(f"--stop-after must be positive, got {self.stop_after}")


def train(
    cfg: TrainConfig,
    corpus: Path,
    out: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    control: RunControl = RunControl(),
) -> dict:
    """Train on ``corpus/train.npy`` (written by ``sparseinfer corpus``), save to ``out``; return the log
    (``{"stopped_at": step}`` when ``control.stop_after`` ended the run before its last step)."""
    for f in ("train.npy", "validation.npy", "tokenizer.json"):
        if not (corpus / f).is_file():
            raise FileNotFoundError(f"{corpus / f} missing: run `sparseinfer corpus {corpus}` first")
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, corpus, out, progress, log, control)
    finally:
        torch.set_num_threads(previous_threads)  # a library call must not leave the process changed


def _load_state(cfg: TrainConfig, out: Path) -> dict:
    path = out / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: nothing to resume (run without --resume to start)")
    state = torch.load(path, weights_only=True)
    saved = state["config"]
    changed = sorted(k for k, v in asdict(cfg).items() if saved.get(k) != v and k != "threads")
    if changed:
        raise ValueError(
            f"{path} was saved with other settings ({', '.join(changed)}); resume with the same ones"
        )
    return state


def _save_state(
    out: Path, cfg: TrainConfig, step: int, model: Transformer, opt: Any, losses: list, wall: float
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "config": asdict(cfg),
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "losses": losses,
        "wall_s": wall,
    }
    tmp = out / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out / STATE_FILE)  # atomic: an interruption while saving keeps the previous state


def _train(
    cfg: TrainConfig,
    corpus: Path,
    out: Path,
    progress: bool,
    log: Callable[[str], None],
    control: RunControl,
) -> dict:
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    train_ids = np.load(corpus / "train.npy", mmap_mode="r")
    val_ids = np.load(corpus / "validation.npy")
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(corpus / "tokenizer.json")).get_vocab_size()
    model = build_model(cfg, vocab)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    starts = batch_starts(len(train_ids), cfg)
    offsets = np.arange(cfg.context + 1)
    losses: list[float] = []
    first, wall_before = 0, 0.0
    if control.resume:
        state = _load_state(cfg, out)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        first, losses, wall_before = state["step"], list(state["losses"]), state["wall_s"]
        log(f"{cfg.activation}: resuming at step {first} of {cfg.steps}")
    last = cfg.steps if control.stop_after is None else min(cfg.steps, first + control.stop_after)
    t0 = time.perf_counter()
    bar = tqdm(
        range(first, last),
        desc=cfg.activation,
        disable=not progress,
        mininterval=2.0,
        initial=first,
        total=cfg.steps,
    )
    for step in bar:
        win = torch.from_numpy(train_ids[starts[step][:, None] + offsets].astype(np.int64))  # (B, T+1)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        logits = training_logits(model, win[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), win[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        tok_s = (step + 1 - first) * cfg.batch * cfg.context / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        done = step + 1
        if done < cfg.steps and control.save_every and done % control.save_every == 0:
            _save_state(out, cfg, done, model, opt, losses, wall_before + time.perf_counter() - t0)
    wall = wall_before + time.perf_counter() - t0
    if last < cfg.steps:
        _save_state(out, cfg, last, model, opt, losses, wall)
        log(f"{cfg.activation}: stopped at step {last} of {cfg.steps}; continue with --resume")
        return {"stopped_at": last}
    model.eval()
    ppl = perplexity(model, val_ids, cfg.context, cfg.eval_windows)
    save_checkpoint(model, cfg, vocab, out, corpus / "tokenizer.json")
    n_params = sum(p.numel() for p in model.parameters())
    ffn_params = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    record = {
        "config": asdict(cfg),
        "intermediate_size": cfg.intermediate,
        "params": n_params,
        "ffn_params": ffn_params,
        "tokens_seen": cfg.steps * cfg.batch * cfg.context,
        "wall_s": round(wall, 1),
        "tokens_per_s": round(cfg.steps * cfg.batch * cfg.context / wall, 1),
        "threads": torch.get_num_threads(),
        "val_perplexity": ppl,
        "val_tokens": min(cfg.eval_windows, (len(val_ids) - 1) // cfg.context) * cfg.context,
        "loss_first": float(np.mean(losses[: max(1, len(losses) // 20)])),
        "loss_last": float(np.mean(losses[-max(1, len(losses) // 20) :])),
        "loss_curve": [round(float(np.mean(losses[i : i + 20])), 4) for i in range(0, len(losses), 20)],
    }
    (out / "train_log.json").write_text(json.dumps(record, indent=2))
    (out / STATE_FILE).unlink(missing_ok=True)  # finished: the checkpoint is the result
    log(
        f"{cfg.activation}: {n_params:,} params, {record['tokens_seen']:,} tokens, {wall:.0f} s, "
        f"val ppl {ppl:.2f}"
    )
    return record
