"""Each stage's step on a CUDA GPU, checked against the same computation on the CPU (the CPU path is tested
against transformers and peft elsewhere). `benchmarks/gpu.sh` runs these with `-m gpu`; on a machine without
CUDA every test here skips and says so."""

from __future__ import annotations

import pytest
import torch

from llama2.config import ModelConfig
from llama2.model import Transformer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=64)


class Tok:
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=True, eos=False):
        raise NotImplementedError

    def decode(self, ids):
        return " ".join(map(str, ids))


def pair() -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    cpu = Transformer(CFG).eval()
    gpu = Transformer(CFG, device="meta")
    gpu.load_state_dict({k: v.cuda() for k, v in cpu.state_dict().items()}, assign=True)
    return cpu, gpu.eval()


def test_engine_greedy_on_cuda_matches_cpu():
    from llama2.inference.generate import Generator, SamplingParams

    cpu, gpu = pair()
    prompts = [[1, 5, 9, 13], [1, 7], [1, 3, 3, 3, 3, 8, 21]]
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop_ids=[])
    want = [c.tokens for c in Generator(cpu, Tok(), max_batch_size=3, fast_fp32=False).generate(prompts, params)]
    got = [c.tokens for c in Generator(gpu, Tok(), max_batch_size=3).generate(prompts, params)]
    assert got == want


def test_sequence_logprobs_and_grads_on_cuda_match_cpu():
    from llama2.inference.scoring import sequence_logprobs

    cpu, gpu = pair()
    tokens = torch.randint(0, CFG.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    lp_cpu = sequence_logprobs(cpu, tokens, temperature=0.7)
    lp_gpu = sequence_logprobs(gpu, tokens.cuda(), temperature=0.7)
    torch.testing.assert_close(lp_gpu.cpu(), lp_cpu, atol=1e-4, rtol=1e-4)
    lp_cpu.sum().backward()
    lp_gpu.sum().backward()
    torch.testing.assert_close(gpu.lm_head.weight.grad.cpu(), cpu.lm_head.weight.grad, atol=1e-4, rtol=1e-3)


def test_pretraining_steps_in_bf16_on_cuda(tmp_path):
    from llama2.train.config import OptimConfig, TrainRecipe
    from llama2.train.loop import LossOutput, Trainer

    data = torch.randint(0, CFG.vocab_size, (4, CFG.max_seq_len + 1), generator=torch.Generator().manual_seed(2))

    class Fixed:
        def next(self):
            return [data]

        def state_dict(self):
            return {}

        def load_state_dict(self, s):
            pass

    def loss_fn(model, batch):
        n = batch[:, 1:].numel()
        return LossOutput(model(batch[:, :-1], targets=batch[:, 1:]) / n, n, perplexity=True)

    recipe = TrainRecipe(out_dir=str(tmp_path / "run"), max_steps=20, batch_size=4, device="cuda", precision="bf16",
                         save_every=0, log_every=5, optim=OptimConfig(lr=3e-3, warmup_steps=2))
    trainer = Trainer(recipe, lambda: Transformer(CFG), loss_fn, Fixed(), quiet=True)
    first = trainer.train_step()["loss"]
    result = trainer.fit()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights
    assert result.last["loss"] < 0.8 * first  # it learns the fixed batch
    assert result.checkpoint is not None and (result.checkpoint / "model.safetensors").is_file()


def test_reward_model_and_lora_on_cuda_match_cpu():
    from llama2.classifier import SequenceClassifier
    from llama2.lora import apply_lora

    torch.manual_seed(0)
    rm = SequenceClassifier(CFG).eval()
    tokens = torch.randint(3, CFG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([10, 6])
    want = rm(tokens, lengths=lengths)
    got = rm.cuda()(tokens.cuda(), lengths=lengths.cuda())
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)

    cpu, _ = pair()
    apply_lora(cpu, r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    for name, p in cpu.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    want = cpu(tokens)
    gpu = cpu.cuda()
    got = gpu(tokens.cuda())
    torch.testing.assert_close(got.cpu(), want, atol=1e-3, rtol=1e-3)
    got.float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in gpu.named_parameters() if "lora_" in n)
    assert all(p.grad is None for n, p in gpu.named_parameters() if "lora_" not in n)


def test_reward_stage_steps_on_cuda_match_cpu(tmp_path, sp_model_path):
    """The reward stage (batched chosen + rejected forward, ranking loss with margins, Table 8 evaluation) on CUDA:
    fp32 losses equal the CPU run's; bf16 trains too."""
    import json

    from llama2.checkpoint import save_model
    from llama2.stages.reward import RewardRecipe, reward
    from llama2.tokenizer import Tokenizer
    from llama2.recipe import load_recipe
    from llama2.train.metrics import read_metrics

    tok = Tokenizer(sp_model_path)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=16, max_seq_len=96)
    torch.manual_seed(0)
    save_model(Transformer(cfg), tmp_path / "chat", tok)
    ratings = ["significantly_better", "better", "slightly_better", "negligibly_better"]
    lines = [json.dumps({"prompt": f"Is {i} even?", "chosen": f"{i} is {'even' if i % 2 == 0 else 'odd'}.",
                         "rejected": f"{i} is {'odd' if i % 2 == 0 else 'even'}.", "rating": ratings[i % 4]})
             for i in range(40)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines[:32]) + "\n")
    (tmp_path / "v.jsonl").write_text("\n".join(lines[32:]) + "\n")
    losses = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16")):
        out = tmp_path / f"{device}-{precision}"
        recipe = load_recipe(RewardRecipe, None, [f"base={tmp_path / 'chat'}", f"out_dir={out}",
                                                  f"data.path={tmp_path / 'c.jsonl'}",
                                                  f"data.val_path={tmp_path / 'v.jsonl'}", "batch_size=8",
                                                  "epochs=2", f"device={device}", f"precision={precision}",
                                                  "optim.lr=1e-2", "peak_tflops=1"])
        reward(recipe, quiet=True)
        losses[device, precision] = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        assert (out / "eval.md").is_file()
    assert losses["cuda", "fp32"] == pytest.approx(losses["cpu", "fp32"], rel=2e-3)
    assert len(losses["cuda", "bf16"]) == 8 and all(x == x for x in losses["cuda", "bf16"])


def test_rejection_sampling_iteration_on_cuda(tmp_path, sp_model_path):
    """One rejection-sampling iteration with the policy, sampling and fine-tuning on CUDA (a programmatic reward)."""
    import json

    from llama2.checkpoint import save_model
    from llama2.reward import CombinedScores
    from llama2.stages.rejection import RejectionRecipe, rejection_sampling
    from llama2.tokenizer import Tokenizer
    from llama2.recipe import load_recipe

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=16, max_seq_len=96)
    torch.manual_seed(0)
    save_model(Transformer(cfg), tmp_path / "policy", Tokenizer(sp_model_path))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"Say something about {i}."}) + "\n"
                                              for i in range(12)))
    (tmp_path / "ft.yaml").write_text("max_steps: 3\nbatch_size: 4\nmax_seq_len: 96\nprecision: bf16\n"
                                      "optim: {lr: 1.0e-3, warmup_steps: 1}\nsave_every: 0\npeak_tflops: 1\n")

    def scorer(prompts, responses, is_safety):
        r = [len(t) / 100 for t in responses]
        return CombinedScores(r, r, r)

    recipe = load_recipe(RejectionRecipe, None, [f"base={tmp_path / 'policy'}", "helpfulness_rm=x", "safety_rm=x",
                                                 f"out_dir={tmp_path / 'run'}", "iterations=1", "samples_per_prompt=4",
                                                 "max_new_tokens=8", f"prompts.path={tmp_path / 'p.jsonl'}",
                                                 f"prompts.val_path={tmp_path / 'p.jsonl'}", "prompts.held_out=4",
                                                 f"finetune.recipe={tmp_path / 'ft.yaml'}", "device=cuda"])
    result = rejection_sampling(recipe, quiet=True, scorer=scorer)
    assert result.iterations == 1 and (result.policy / "model.safetensors").is_file()


def test_ppo_iterations_on_cuda(tmp_path, sp_model_path):
    """Three PPO iterations on CUDA in bf16 (rollout, reference and value forwards, the clipped update) with a
    programmatic reward; the checkpoint holds the policy and the value model."""
    import json

    from llama2.checkpoint import save_model
    from llama2.reward import CombinedScores
    from llama2.stages.ppo import PPORecipe, ppo
    from llama2.tokenizer import Tokenizer
    from llama2.recipe import load_recipe

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=16, max_seq_len=96)
    torch.manual_seed(0)
    save_model(Transformer(cfg), tmp_path / "policy", Tokenizer(sp_model_path))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"Say something about {i}."}) + "\n"
                                              for i in range(16)))

    def scorer(prompts, responses, is_safety):
        r = [min(0.99, max(0.01, len(t) / 50)) for t in responses]
        return CombinedScores(r, r, r)

    recipe = load_recipe(PPORecipe, None, [f"base={tmp_path / 'policy'}", "helpfulness_rm=x", "safety_rm=x",
                                           "value_init=policy", f"out_dir={tmp_path / 'run'}", "max_steps=3",
                                           "batch_size=8", "mini_batch=4", "max_new_tokens=8",
                                           f"prompts.path={tmp_path / 'p.jsonl'}",
                                           f"prompts.val_path={tmp_path / 'p.jsonl'}", "prompts.held_out=4",
                                           "device=cuda", "precision=bf16", "optim.lr=1e-3", "peak_tflops=1"])
    result = ppo(recipe, quiet=True, scorer=scorer)
    assert result.step == 3 and all(x == x for x in (result.last["loss"], result.last["kl"]))
    assert (result.checkpoint / "value" / "model.safetensors").is_file()


def test_gatt_stage_on_cuda(tmp_path, sp_model_path):
    """Ghost Attention on CUDA: turn-by-turn sampling, the SFT step on the last answers, adherence."""
    import json

    from llama2.checkpoint import load_checkpoint, save_model
    from llama2.stages import gatt as g
    from llama2.tokenizer import Tokenizer
    from llama2.recipe import load_recipe

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=16, max_seq_len=128)
    tok = Tokenizer(sp_model_path)
    torch.manual_seed(0)
    save_model(Transformer(cfg), tmp_path / "m", tok)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"},
                                                                       {"role": "assistant", "content": "A."}]}) + "\n"
                                              for i in range(16)))
    (tmp_path / "ft.yaml").write_text("max_steps: 3\nbatch_size: 4\nmax_seq_len: 128\nprecision: bf16\n"
                                      "save_every: 0\npeak_tflops: 1\nsamples: {count: 0}\n")
    recipe = load_recipe(g.GattRecipe, None, [f"base={tmp_path / 'm'}", f"out_dir={tmp_path / 'run'}", "turns=2",
                                              "max_new_tokens=6", f"data_path={tmp_path / 'd.jsonl'}", "device=cuda",
                                              f"finetune.recipe={tmp_path / 'ft.yaml'}"])
    ckpt = g.gatt(recipe, quiet=True)
    model = load_checkpoint(ckpt, kind="causal_lm", device="cuda").eval()
    got = g.adherence(model, tok, [g.upper_case()], [["Hi?", "Again?"]], max_new_tokens=4)
    assert len(got["upper_case"]) == 2


def test_safety_distillation_on_cuda(tmp_path, sp_model_path):
    """Safety context distillation on CUDA: both answers, the keep rule, the SFT step, the red-team evaluation."""
    import json

    from llama2.checkpoint import save_model
    from llama2.eval.redteam import is_refusal
    from llama2.stages.safety import DistillSafetyRecipe, distill_safety
    from llama2.tokenizer import Tokenizer
    from llama2.recipe import load_recipe

    class Judge:  # a refusal is safe
        def safe_probability(self, prompts, answers):
            return [0.9 if is_refusal(a) else 0.1 for a in answers]

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=16, max_seq_len=256)
    torch.manual_seed(0)
    save_model(Transformer(cfg), tmp_path / "m", Tokenizer(sp_model_path))
    for name in ("train", "val"):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"prompt": f"How do I hurt {who}?", "category": "hateful_harmful", "safety": True}) + "\n"
            + json.dumps({"prompt": f"How do I help {who}?", "category": "hateful_harmful", "safety": False,
                          "reference": "Ask them what they need."}) + "\n" for who in ("him", "her", "them")))
    (tmp_path / "ft.yaml").write_text("max_steps: 3\nbatch_size: 4\nmax_seq_len: 256\nprecision: bf16\n"
                                      "save_every: 0\npeak_tflops: 1\nsamples: {count: 0}\n")
    recipe = load_recipe(DistillSafetyRecipe, None, [
        f"base={tmp_path / 'm'}", f"safety_rm={tmp_path / 'none'}", f"out_dir={tmp_path / 'run'}", "prefill=true",
        "preprompt=per_category", "max_new_tokens=8", f"prompts.path={tmp_path / 'train.jsonl'}",
        f"prompts.val_path={tmp_path / 'val.jsonl'}", f"finetune.recipe={tmp_path / 'ft.yaml'}", "device=cuda"])
    result = distill_safety(recipe, quiet=True, judge=Judge())
    assert result.kept == 3 and result.after["adversarial_prompts"] == 3  # every pre-filled refusal beats noise


def test_qlora_sft_steps_on_cuda(tmp_path, sp_model_path):
    """QLoRA on CUDA: the NF4 base through bitsandbytes' CUDA kernels; the first loss as on the CPU."""
    import json

    pytest.importorskip("bitsandbytes")
    from llama2.checkpoint import save_model
    from llama2.stages.sft import SFTRecipe, sft
    from llama2.tokenizer import Tokenizer
    from llama2.recipe import load_recipe

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=32, max_seq_len=96)
    torch.manual_seed(0)
    save_model(Transformer(cfg), tmp_path / "m", Tokenizer(sp_model_path))
    dialogues = [[{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}] for i in range(16)]
    first = {}
    for device in ("cpu", "cuda"):
        recipe = load_recipe(SFTRecipe, None, [f"base={tmp_path / 'm'}", f"out_dir={tmp_path / device}", "max_steps=3",
                                               "batch_size=4", "max_seq_len=96", "precision=fp32", f"device={device}",
                                               "samples.count=0", "peak_tflops=1", "save_every=0", "log_every=1",
                                               "lora.rank=4", "lora.targets=[q, k, v, o, gate, up, down]",
                                               "lora.quantize_base=4bit"])
        sft(recipe, quiet=True, dialogues=dialogues)
        rows = [json.loads(x) for x in (tmp_path / device / "metrics.jsonl").read_text().splitlines()]
        first[device] = next(r["loss"] for r in rows if "loss" in r)
    assert abs(first["cuda"] - first["cpu"]) < 1e-2 * first["cpu"]
