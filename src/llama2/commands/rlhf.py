"""`llama2 rlhf rejection-sampling | ppo | dpo | grpo | distill-safety --config RECIPE.yaml [key=value ...]`: RLHF
stages (paper sections 6 and 8; DPO and GRPO beyond it)."""

from __future__ import annotations

from ._options import add_stage_command


def register(subparsers) -> None:
    p = subparsers.add_parser("rlhf", help="RLHF: rejection-sampling fine-tuning, PPO, DPO, GRPO, safety context "
                                           "distillation",
                              description="RLHF stages of Llama 2-Chat (paper sections 6 and 8), and DPO and GRPO.")
    sub = p.add_subparsers(dest="rlhf_command", required=True, metavar="STAGE")
    add_stage_command(sub, "rejection-sampling", example="configs/tiny/rejection.yaml",
                      help="iterative rejection-sampling fine-tuning with the two reward models (resumes)",
                      description="For each prompt draw K answers from the policy, score them with the combined "
                                  "reward of the helpfulness and safety RMs, keep the best, fine-tune on them through "
                                  "the SFT stage; iterations V1..Vn in one run directory (e.g. iterations=3 "
                                  "samples_per_prompt=8 temperature=sweep pool=all).")
    add_stage_command(sub, "ppo", example="configs/tiny/ppo.yaml",
                      help="PPO against the combined reward with a KL penalty to the initial policy (resumes)",
                      description="Proximal policy optimisation (RLHF-V5): rollouts from the policy, the combined "
                                  "reward of the two RMs whitened after LOGIT, a per-token KL penalty to the frozen "
                                  "initial policy, GAE, clipped policy and value losses, a value model from the "
                                  "helpfulness RM (e.g. max_steps=200 beta=0.01 batch_size=512 mini_batch=64).")
    add_stage_command(sub, "dpo", example="configs/world/dpo.yaml",
                      help="DPO: preference optimisation on the comparisons directly, against the frozen start "
                           "(resumes)",
                      description="Direct preference optimisation (beyond the paper): on the comparison files the "
                                  "reward stage reads, the chosen answer's log-ratio to the frozen starting model "
                                  "must exceed the rejected one's; the sigmoid (DPO) or squared (IPO) loss, the "
                                  "paper's rating margins as an option, LoRA with the adapters disabled as the "
                                  "reference (e.g. beta=0.1 loss=ipo margin=small length_normalize=true).")
    add_stage_command(sub, "grpo", example="configs/world/grpo.yaml",
                      help="GRPO: K answers per prompt, advantages relative to the group, no value model (resumes)",
                      description="Group-relative policy optimisation (beyond the paper): each prompt answered "
                                  "group_size times, each answer's advantage its reward against its group's mean "
                                  "and standard deviation, the clipped objective with a k3 KL penalty to the "
                                  "initial policy in the loss; rewards from the two RMs (reward=rm) or the world's "
                                  "gold judge (reward=gold) (e.g. group_size=8 beta=0.04 loss=grpo).")
    add_stage_command(sub, "distill-safety", example="configs/tiny/distill-safety.yaml",
                      help="safety context distillation: answers with a safety pre-prompt, kept where the safety "
                           "RM prefers them, fine-tuned in without it (resumes)",
                      description="For each adversarial prompt the model answers plainly and with a safety "
                                  "pre-prompt (generic, per risk category with its answer template, or a text); the "
                                  "pre-prompted answer is kept where the safety RM scores it higher, and the SFT "
                                  "stage fine-tunes the model on the kept answers without the pre-prompt; red-team "
                                  "evaluation before and after (e.g. preprompt=per_category prefill=true).")

